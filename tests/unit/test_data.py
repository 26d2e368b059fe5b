"""Tests of the data pipeline: corpus, sources, tokenizers, shards, prepare-data and the sampler.

They run on CPU with a small built-in corpus and a small vocabulary; the expensive artefacts (a
corpus, a prepared shards folder) are built once per session.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kforcing_dist.config.schema import Config
from kforcing_dist.data import DataError
from kforcing_dist.data import corpus as corpus_mod
from kforcing_dist.data.corpus import build_builtin_corpus, clean_docstring, iter_corpus
from kforcing_dist.data.prepare import prepare_data, split_value
from kforcing_dist.data.shards import SPLITS
from kforcing_dist.data.sampler import TokenSampler, valid_batches
from kforcing_dist.data.shards import (TokenDataset, check_tokenizer_matches, read_metadata, sample_sha256,
                                       verify_shards, write_metadata)
from kforcing_dist.data.sources import describe_source, iter_documents
from kforcing_dist.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, build_or_load_tokenizer,
                                          load_tokenizer, train_sentencepiece)

SMALL_BYTES = 300_000
VOCAB = 512


def small_config(**data_overrides) -> Config:
    cfg = Config()
    cfg.tokenizer.vocab_size = VOCAB
    cfg.data.builtin_min_bytes = SMALL_BYTES
    cfg.data.shard_tokens = 20_000  # several shards, so windows cross shard files
    cfg.data.valid_fraction = 0.05
    cfg.data.num_workers = 2
    for k, v in data_overrides.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    build_builtin_corpus(d, SMALL_BYTES)
    return d


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A shards folder prepared from scratch (own cache: corpus and tokenizer built here)."""
    root = tmp_path_factory.mktemp("prep_a")
    prepare_data(small_config(), root / "data", progress=False, cache_dir=root / "cache")
    return root / "data"


# ---------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_clean(corpus_dir, tmp_path):
    a = json.loads((corpus_dir / corpus_mod.CORPUS_META_FILE).read_text())
    b = build_builtin_corpus(tmp_path, SMALL_BYTES, workers=1)  # other worker count, same result
    assert not b.reused
    assert b.sha256 == a["sha256"] and b.documents == a["documents"]
    assert (tmp_path / corpus_mod.CORPUS_FILE).read_bytes() == (corpus_dir / corpus_mod.CORPUS_FILE).read_bytes()
    assert b.bytes >= SMALL_BYTES
    again = build_builtin_corpus(tmp_path, SMALL_BYTES)
    assert again.reused and again.sha256 == b.sha256

    docs = list(iter_corpus(b.path))
    assert len(docs) == b.documents == len(set(docs))
    assert sum(len(d.encode()) for d in docs) == b.bytes
    for d in docs:
        assert len(d) >= corpus_mod.MIN_DOC_CHARS
        assert not any(line.lstrip().startswith(">>>") for line in d.split("\n"))
        assert "\n\n\n" not in d and "\t" not in d
    # sorted by text hash, not by package: neighbours should rarely share their first word
    firsts = [d.split()[0] for d in docs]
    assert len(set(firsts)) > len(docs) // 10


def test_corpus_cache_detects_tampering(corpus_dir, tmp_path):
    for name in (corpus_mod.CORPUS_FILE, corpus_mod.CORPUS_META_FILE):
        (tmp_path / name).write_bytes((corpus_dir / name).read_bytes())
    with open(tmp_path / corpus_mod.CORPUS_FILE, "r+b") as f:
        f.seek(20)
        f.write(b"#")
    info = build_builtin_corpus(tmp_path, SMALL_BYTES)
    assert not info.reused
    assert (tmp_path / corpus_mod.CORPUS_FILE).read_bytes() == (corpus_dir / corpus_mod.CORPUS_FILE).read_bytes()


def test_corpus_too_small_raises(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "mod.py").write_text('"""' + "A module docstring with enough plain words in it. " * 6 + '"""\n')
    monkeypatch.setattr(corpus_mod, "source_roots", lambda: [("stdlib", src)])
    with pytest.raises(DataError, match=r"only has \d+ bytes.*lower data.builtin_min_bytes"):
        build_builtin_corpus(tmp_path / "cache", 10_000_000, workers=1)


def test_clean_docstring():
    body = "This function computes a value from its arguments and returns it to the caller. " * 3
    raw = f"""
        Summary line.

        {body}
        >>> f(1)
        2
        >>> g(
        ...     3)
        4

        After the example\t\twith   odd   spacing.



        Last paragraph.
        """
    out = clean_docstring(raw)
    assert out is not None
    assert ">>>" not in out and "..." not in out and "\n2\n" not in out and "\t" not in out
    assert "After the example with odd spacing." in out
    assert "\n\nLast paragraph." in out and "\n\n\n" not in out
    assert clean_docstring("Too short.") is None
    assert clean_docstring("= " * 200) is None  # no letters
    assert clean_docstring("日本語のテキスト " * 40) is None  # not ASCII English


# ---------------------------------------------------------------- sources


def _files_cfg(paths, **kw):
    cfg = Config().data
    cfg.source = "files"
    cfg.paths = [str(p) for p in paths]
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_read_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "a.txt"
    txt.write_text("first doc line one\nline two\n\n\nsecond doc\n   \nthird doc\n")
    whole = tmp_path / "b.txt"
    whole.write_text("one document\nwith no blank line\n")
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"body": "json one", "id": 1}, {"body": "json two"},
                                                    {"body": None}, {"body": "  "}]) + "\n")
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["pq one", None, "pq two"], "n": [1, 2, 3]}), pqf)

    docs = list(iter_documents(_files_cfg([txt, whole, jl, pqf], text_field="body"), tmp_path))
    assert docs == ["first doc line one\nline two", "second doc", "third doc", "one document\nwith no blank line",
                    "json one", "json two", "pq one", "pq two"]
    limited = list(iter_documents(_files_cfg([txt, whole, jl, pqf], text_field="body", max_documents=5), tmp_path))
    assert limited == docs[:5]
    # a directory expands to its supported files in sorted order
    assert list(iter_documents(_files_cfg([tmp_path], text_field="body"), tmp_path)) == docs


def test_source_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist.*data\.paths"):
        list(iter_documents(_files_cfg([missing]), tmp_path))
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv.*unsupported extension"):
        list(iter_documents(_files_cfg([odd]), tmp_path))
    jl = tmp_path / "y.jsonl"
    jl.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"y\.jsonl:1 has no field 'text' \(it has: content\).*data\.text_field"):
        list(iter_documents(_files_cfg([jl]), tmp_path))
    bad = tmp_path / "z.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"z\.jsonl:2 is not valid JSON"):
        list(iter_documents(_files_cfg([bad]), tmp_path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "w.parquet"
    pq.write_table(pa.table({"content": ["a"]}), pqf)
    with pytest.raises(DataError, match=r"w\.parquet has no column 'text'.*content"):
        list(iter_documents(_files_cfg([pqf]), tmp_path))
    with pytest.raises(DataError, match="data.paths is empty"):
        list(iter_documents(_files_cfg([]), tmp_path))


def test_txt_one_document_per_line(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("first sentence.\nsecond sentence.\n\n  \nthird one\r\n")
    assert list(iter_documents(_files_cfg([txt], txt_documents="line"), tmp_path)) == [
        "first sentence.", "second sentence.", "third one"]
    assert list(iter_documents(_files_cfg([txt]), tmp_path)) == ["first sentence.\nsecond sentence.", "third one"]
    # a different split of the same files makes different shards: the inputs key must change
    assert (describe_source(_files_cfg([txt], txt_documents="line"), tmp_path)["corpus_sha"]
            != describe_source(_files_cfg([txt]), tmp_path)["corpus_sha"])


@pytest.mark.parametrize("suffix, prefix", [(".txt", b"a good line\n\n"), (".jsonl", b'{"text": "fine"}\n')])
@pytest.mark.parametrize("payload, bad_at", [(b"\xff\xfe\x00binary", 0), (b"ok\x00\x00\x00", 2),
                                             ("caf\u00e9 au lait".encode("latin-1"), 3)])
def test_binary_or_non_utf8_files_refused(tmp_path, suffix, prefix, payload, bad_at):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(prefix + payload + b"\n")
    offset = len(prefix) + bad_at
    with pytest.raises(DataError, match=rf"data\.paths: {path} is not UTF-8 text \(byte offset {offset}\)"):
        list(iter_documents(_files_cfg([path]), tmp_path))


def test_hf_source(tmp_path, monkeypatch):
    cfg = Config().data
    cfg.source = "hf"
    with pytest.raises(DataError, match="hf_name and data.hf_path are empty"):
        list(iter_documents(cfg, tmp_path))
    cfg.hf_name = "some/dataset"
    calls = []

    def fake_load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "some/dataset":
            raise ConnectionError("no route to host")
        return iter([{"text": "hf one"}, {"text": "hf two"}, {"other": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    with pytest.raises(DataError, match=r"some/dataset.*no route to host.*Hugging Face hub"):
        list(iter_documents(cfg, tmp_path))
    assert calls == [("some/dataset", None, "train", True)]
    cfg.hf_name, cfg.hf_config, cfg.max_documents = "ok", "cfg1", 2
    assert list(iter_documents(cfg, tmp_path)) == ["hf one", "hf two"]
    assert calls[-1] == ("ok", "cfg1", "train", True)
    cfg.max_documents = 0
    with pytest.raises(DataError, match=r"record 2 has no field 'text'"):
        list(iter_documents(cfg, tmp_path))


def test_hf_source_offline(tmp_path, monkeypatch):
    """A save_to_disk folder (hf_path) and the local cache (hf_streaming: false) need no network."""
    import datasets

    cfg = Config().data
    cfg.source = "hf"
    texts = ["saved one", "  ", "saved two", "saved three"]
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "single"))
    cfg.hf_path = str(tmp_path / "single")
    assert list(iter_documents(cfg, tmp_path)) == ["saved one", "saved two", "saved three"]
    before = describe_source(cfg, tmp_path)["corpus_sha"]

    cfg.hf_path = str(tmp_path / "dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train doc"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["valid doc"]})}).save_to_disk(cfg.hf_path)
    cfg.hf_split = "validation"
    assert list(iter_documents(cfg, tmp_path)) == ["valid doc"]
    assert describe_source(cfg, tmp_path)["corpus_sha"] != before
    cfg.hf_split = "test"
    with pytest.raises(DataError, match=r"holds the splits train, validation but data\.hf_split is 'test'"):
        list(iter_documents(cfg, tmp_path))
    cfg.hf_path = str(tmp_path)  # a folder, but not a save_to_disk one
    with pytest.raises(DataError, match=rf"data\.hf_path {tmp_path} is not a dataset folder written by .*save_to_disk"):
        list(iter_documents(cfg, tmp_path))
    cfg.hf_path = str(tmp_path / "missing")
    with pytest.raises(DataError, match=r"missing is not a folder"):
        list(iter_documents(cfg, tmp_path))
    cfg.hf_name = "lm1b"
    with pytest.raises(DataError, match=r"hf_name \('lm1b'\) and data\.hf_path .* are both set"):
        list(iter_documents(cfg, tmp_path))

    # hf_streaming: false asks load_dataset for the cached (downloaded) dataset, not a stream
    cfg.hf_path, cfg.hf_split, cfg.hf_streaming = "", "train", False
    calls = []

    def fake_load(name, config, split, streaming):
        calls.append(streaming)
        if name == "absent":
            raise ConnectionError("offline mode is enabled")
        return datasets.Dataset.from_dict({"text": ["cached doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(iter_documents(cfg, tmp_path)) == ["cached doc"] and calls == [False]
    cfg.hf_name = "absent"
    with pytest.raises(DataError, match=r"'absent'.*offline mode.*hf_streaming: false reads the local datasets cache"):
        list(iter_documents(cfg, tmp_path))


# ---------------------------------------------------------------- tokenizers


def test_sentencepiece_training_deterministic_and_lossless(corpus_dir, tmp_path):
    docs = list(iter_corpus(corpus_dir / corpus_mod.CORPUS_FILE))[:150]
    a = train_sentencepiece(docs, 400)
    b = train_sentencepiece(docs, 400)
    assert a.fingerprint == b.fingerprint and a.vocab_size == 400
    text = docs[0] + "\n\n  tabs\tand ünïcödé 漢字 \u00a0 done\n"
    ids = a.encode(text)
    assert a.decode(ids) == text  # byte fallback: any text survives
    assert max(ids) < a.vocab_size and a.eos_id not in ids and a.bos_id is not None
    assert a.encode_batch([text, "x"]) == [ids, a.encode("x")]
    a.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.fingerprint == a.fingerprint
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.model").encode(text) == ids
    import pickle

    assert pickle.loads(pickle.dumps(a)).encode(text) == ids


def test_build_or_load_tokenizer(corpus_dir, tmp_path):
    cfg = Config().tokenizer
    cfg.vocab_size = 400
    cfg.train_max_bytes = 60_000
    factory_calls = []

    def factory():
        factory_calls.append(1)
        return iter_corpus(corpus_dir / corpus_mod.CORPUS_FILE)

    tok = build_or_load_tokenizer(cfg, factory, tmp_path / "work")
    info = tmp_path / "work" / "tokenizer_train.json"
    stamp = info.stat().st_mtime_ns
    again = build_or_load_tokenizer(cfg, factory, tmp_path / "work")
    assert again.fingerprint == tok.fingerprint and info.stat().st_mtime_ns == stamp  # reused, not retrained
    cfg.vocab_size = 420
    other = build_or_load_tokenizer(cfg, factory, tmp_path / "work")
    assert other.vocab_size == 420 and other.fingerprint != tok.fingerprint
    cfg.path = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match=r"missing\.model does not exist.*tokenizer\.path"):
        build_or_load_tokenizer(cfg, factory, tmp_path / "work")
    cfg.path, cfg.kind = "", "hf"
    with pytest.raises(DataError, match="needs tokenizer.path"):
        build_or_load_tokenizer(cfg, factory, tmp_path / "work")


def _hf_folder(path: Path, eos_in_config: bool = True) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "<|end|>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if eos_in_config:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"},
                                                                "bos_token": "<s>"}))
    return path


def test_hf_tokenizer(tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok._tok.token_to_id("<|end|>") and tok.bos_id == tok._tok.token_to_id("<s>")
    ids = tok.encode("the lazy fox")
    assert ids and tok.eos_id not in ids and "lazy" in tok.decode(ids)
    tok.save(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path / "copy").fingerprint == tok.fingerprint
    no_eos = _hf_folder(tmp_path / "hf2", eos_in_config=False)
    with pytest.raises(DataError, match="names no EOS token.*eos_token"):
        load_tokenizer(no_eos)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------- prepare-data and shards


def test_prepare_deterministic(prepared, tmp_path):
    other = tmp_path / "data"
    prepare_data(small_config(), other, progress=False, cache_dir=tmp_path / "cache")  # from scratch again
    files_a = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len([f for f in files_a if f.name.endswith(".bin")]) > 2
    for rel in files_a:
        if rel.name != "metadata.json":
            assert (prepared / rel).read_bytes() == (other / rel).read_bytes(), rel
    ma, mb = read_metadata(prepared), read_metadata(other)
    assert ma["inputs_key"] == mb["inputs_key"] and ma["tokens"] == mb["tokens"]
    assert not list(tmp_path.glob("data.tmp-*"))  # the temporary folder was renamed away


def test_prepared_shards_content(prepared, corpus_dir):
    meta = read_metadata(prepared)
    tok = load_tokenizer(prepared / "tokenizer")
    assert tok.fingerprint == meta["tokenizer"]["fingerprint"] and tok.vocab_size == meta["vocab_size"] == VOCAB
    assert meta["dtype"] == "uint16" and meta["documents"]["valid"] >= 1
    docs = list(iter_corpus(corpus_dir / corpus_mod.CORPUS_FILE))
    assert meta["documents"]["train"] + meta["documents"]["valid"] == len(docs)
    expected_valid = [d for i, d in enumerate(docs) if split_value(meta["seed"], i) < meta["valid_fraction"]]
    expected_train = [d for i, d in enumerate(docs) if split_value(meta["seed"], i) >= meta["valid_fraction"]]
    for split, expected in (("train", expected_train), ("valid", expected_valid)):
        ds = TokenDataset(prepared, split)
        assert len(ds) == meta["tokens"][split] and ds.num_documents == len(expected)
        ds.verify()
        for i in (0, len(expected) // 2, len(expected) - 1):
            toks = ds.document(i)
            assert toks[-1] == tok.eos_id and tok.eos_id not in toks[:-1]
            assert tok.decode(toks[:-1]) == expected[i]
        # windows across shard boundaries equal the concatenated files
        shards = meta["splits"][split]["shards"]
        flat = np.concatenate([np.fromfile(prepared / split / s["file"], dtype=np.uint16) for s in shards])
        assert len(flat) == len(ds)
        boundary = shards[0]["tokens"]
        if len(shards) > 1:
            assert np.array_equal(ds.window(boundary - 7, 30), flat[boundary - 7:boundary + 23])
        assert np.array_equal(ds.window(0, len(ds)), flat)
        with pytest.raises(IndexError):
            ds.window(len(ds) - 3, 4)


def test_prepare_reuses_or_refuses(prepared, tmp_path):
    cache = tmp_path / "cache"
    root = prepared.parent
    before = read_metadata(prepared)
    again = prepare_data(small_config(), prepared, progress=False, cache_dir=root / "cache")
    assert again["created_at"] == before["created_at"]  # reused, not rewritten
    with pytest.raises(DataError, match=r"other inputs \(changed: valid_fraction\).*delete it or choose another"):
        prepare_data(small_config(valid_fraction=0.2), prepared, progress=False, cache_dir=root / "cache")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(DataError, match="not a complete shards folder.*delete it"):
        prepare_data(small_config(), junk, progress=False, cache_dir=cache)


def test_tokenizer_mismatch_refused(prepared, corpus_dir):
    tok = load_tokenizer(prepared / "tokenizer")
    check_tokenizer_matches(prepared, tok)  # same tokenizer: fine
    docs = list(iter_corpus(corpus_dir / corpus_mod.CORPUS_FILE))[:100]
    other = train_sentencepiece(docs, 400)
    with pytest.raises(DataError) as e:
        check_tokenizer_matches(prepared, other)
    msg = str(e.value)
    assert tok.fingerprint in msg and other.fingerprint in msg and f"vocab {VOCAB}" in msg
    assert "prepare-data" in msg and str(prepared / "tokenizer") in msg


def test_corrupt_shards_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train" / "tokens-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"tokens-00001\.bin has \d+ bytes but"):
        TokenDataset(copy, "train")
    (copy / "metadata.json").write_text("{not json")
    with pytest.raises(DataError, match=r"metadata\.json is unreadable or corrupt"):
        TokenDataset(copy, "valid")
    (copy / "metadata.json").unlink()
    with pytest.raises(DataError, match=r"metadata\.json does not exist.*prepare-data"):
        TokenDataset(copy, "valid")


def _copy(prepared, dest) -> Path:
    import shutil

    shutil.copytree(prepared, dest)
    return dest


def test_garbage_shard_of_the_right_size_refused(prepared, tmp_path):
    rng = np.random.default_rng(0)
    assert verify_shards(prepared)["unchecked"] == []
    # ids inside the vocabulary: only the checksum can tell
    copy = _copy(prepared, tmp_path / "in_vocab")
    shard = copy / "train" / "tokens-00001.bin"
    rng.integers(0, VOCAB, shard.stat().st_size // 2, dtype=np.uint16).tofile(shard)
    with pytest.raises(DataError, match=rf"shard file {shard} does not match its checksum.*re-run `kforcing-dist "
                                        rf"prepare-data`"):
        TokenDataset(copy, "train")
    with pytest.raises(DataError, match=rf"1 damaged shard file.*{shard} \(sha256 differs from metadata\.json\)"
                                        rf".*prepare-data"):
        verify_shards(copy)
    TokenDataset(copy, "valid")  # the other split is untouched
    # random bytes: ids far outside the vocabulary are a DataError, not an IndexError in the model
    copy = _copy(prepared, tmp_path / "random")
    shard = copy / "train" / "tokens-00000.bin"
    shard.write_bytes(rng.bytes(shard.stat().st_size))
    with pytest.raises(DataError, match=rf"{shard} (does not match its checksum|holds token id \d+, outside the "
                                        rf"vocabulary of {VOCAB})"):
        TokenDataset(copy, "train")


def test_verify_data_command(prepared, tmp_path, capsys):
    from kforcing_dist.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert main(["verify-data", "-c", str(config), "--set", f"data.shards_dir={prepared}"]) == 0
    assert f"{prepared}: " in capsys.readouterr().out
    copy = _copy(prepared, tmp_path / "bad")
    shard = copy / "valid" / "tokens-00000.bin"
    shard.write_bytes(bytes(shard.stat().st_size))  # zeros: ids in range, wrong content
    assert main(["verify-data", "-c", str(config), "--set", f"data.shards_dir={copy}"]) == 2
    assert f"{shard} (sha256 differs" in capsys.readouterr().err


def _strip_checksums(folder: Path, keep_full: bool) -> None:
    """Make ``folder`` look like one written before sampled checksums existed."""
    meta = read_metadata(folder)
    meta.pop("shard_sample")
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard.pop("sample_sha256")
            if not keep_full:
                shard.pop("sha256")
    write_metadata(folder, meta)


def test_old_shard_folders_still_read(prepared, tmp_path):
    copy = _copy(prepared, tmp_path / "old")
    _strip_checksums(copy, keep_full=False)
    ds, ref = TokenDataset(copy, "train"), TokenDataset(prepared, "train")
    assert np.array_equal(ds.window(0, len(ds)), ref.window(0, len(ref)))
    result = verify_shards(copy)
    assert len(result["unchecked"]) == result["files"] > 2 and result["bytes"] == 2 * (len(ds) + len(
        TokenDataset(copy, "valid")))
    # without a sample checksum, out-of-vocabulary ids in the sample are still refused at open
    shard = copy / "train" / "tokens-00002.bin"
    shard.write_bytes(np.random.default_rng(1).bytes(shard.stat().st_size))
    with pytest.raises(DataError, match=rf"{shard} holds token id \d+, outside the vocabulary of {VOCAB}"):
        TokenDataset(copy, "train")
    with pytest.raises(DataError, match=rf"{shard} \(holds token id \d+ outside the vocabulary of {VOCAB}\)"):
        verify_shards(copy)


def test_damage_outside_the_sample_caught_by_window_and_verify(prepared, tmp_path):
    copy = _copy(prepared, tmp_path / "mid")
    meta = read_metadata(copy)
    meta["shard_sample"] = {"blocks": 2, "block_bytes": 64}  # head and tail only: the middle goes unread
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            tokens = np.fromfile(copy / split / shard["file"], dtype=np.uint16)
            shard["sample_sha256"] = sample_sha256(tokens, **meta["shard_sample"])
    write_metadata(copy, meta)
    first = meta["splits"]["train"]["shards"][0]
    path = copy / "train" / first["file"]
    tokens = np.fromfile(path, dtype=np.uint16)
    middle = len(tokens) // 2
    tokens[middle] = VOCAB + 5
    tokens.tofile(path)
    ds = TokenDataset(copy, "train")  # the sampled head and tail still match
    ds.window(0, 100)
    with pytest.raises(DataError, match=rf"{path} holds token id {VOCAB + 5}, outside the vocabulary"):
        ds.window(middle - 10, 20)
    with pytest.raises(DataError, match=rf"{path} \(sha256 differs from metadata\.json, holds token id {VOCAB + 5} "):
        verify_shards(copy)


def test_tiny_source_still_gets_a_valid_document(prepared, tmp_path):
    txt = tmp_path / "tiny.txt"
    txt.write_text("\n\n".join(f"document number {i} says hello to the world." for i in range(6)))
    cfg = small_config(source="files", paths=[str(txt)], valid_fraction=0.001, num_workers=1)
    cfg.tokenizer.path = str(prepared / "tokenizer")  # too little text to train one
    meta = prepare_data(cfg, tmp_path / "data", progress=False, cache_dir=tmp_path / "cache")
    assert meta["documents"] == {"train": 5, "valid": 1}
    tok = load_tokenizer(tmp_path / "data" / "tokenizer")
    valid = TokenDataset(tmp_path / "data", "valid")
    train = TokenDataset(tmp_path / "data", "train")
    texts = [tok.decode(train.document(i)[:-1]) for i in range(5)] + [tok.decode(valid.document(0)[:-1])]
    assert sorted(texts) == sorted(f"document number {i} says hello to the world." for i in range(6))


# ---------------------------------------------------------------- sampler


@dataclasses.dataclass
class ArrayDataset:
    tokens: np.ndarray

    def __len__(self):
        return len(self.tokens)

    def window(self, start, length):
        return self.tokens[start:start + length].copy()


def test_sampler_resume_matches_uninterrupted():
    ds = ArrayDataset(np.arange(4 * 11 * 8 + 5, dtype=np.uint16))  # 4*11 windows of 8: 11 steps/epoch
    ref = TokenSampler(ds, seq_len=8, micro_batch_size=4, seed=3)
    assert ref.steps_per_epoch == 11
    expected = [ref.next_batch() for _ in range(30)]  # crosses two epoch boundaries
    first = TokenSampler(ds, seq_len=8, micro_batch_size=4, seed=3)
    got = [first.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = TokenSampler(ds, seq_len=8, micro_batch_size=4, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(25)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    b0 = expected[0]
    assert b0.dtype == torch.long and b0.shape == (4, 9)
    assert torch.equal(b0[:, 1:] - b0[:, :-1], torch.ones(4, 8, dtype=torch.long))  # contiguous windows
    assert all(int(row[0]) % 8 == 0 for row in b0)  # at offsets i * seq_len
    epoch0 = torch.cat(expected[:11])[:, 0] // 8
    epoch1 = torch.cat(expected[11:22])[:, 0] // 8
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(44))  # each window once per epoch
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    other_seed = TokenSampler(ds, seq_len=8, micro_batch_size=4, seed=4)
    assert not torch.equal(other_seed.next_batch(), expected[0])
    with pytest.raises(DataError, match="seq_len"):
        TokenSampler(ds, seq_len=16, micro_batch_size=2, seed=3).load_state_dict(state)


def test_sampler_dp_sharding_is_disjoint(prepared):
    ds = TokenDataset(prepared, "train")
    dp, micro, seq = 3, 2, 32
    samplers = [TokenSampler(ds, seq, micro, dp_rank=r, dp_size=dp, seed=7) for r in range(dp)]
    single = TokenSampler(ds, seq, micro * dp, seed=7)  # one rank with the global batch
    seen = set()
    for _ in range(min(20, single.steps_per_epoch)):
        parts = [s.next_windows() for s in samplers]
        whole = single.next_windows()
        assert np.array_equal(np.concatenate(parts), whole)
        for p in parts:
            assert not seen & set(p.tolist())
            seen |= set(p.tolist())
    batch = TokenSampler(ds, seq, micro, dp_rank=1, dp_size=dp, seed=7).next_batch()
    w = TokenSampler(ds, seq, micro, dp_rank=1, dp_size=dp, seed=7).next_windows()
    for row, idx in zip(batch, w):
        assert np.array_equal(row.numpy(), ds.window(int(idx) * seq, seq + 1).astype(np.int64))
    with pytest.raises(DataError, match="one global batch needs"):
        TokenSampler(ArrayDataset(np.zeros(100, np.uint16)), 32, 2, dp_rank=0, dp_size=2)


def test_valid_batches_fixed_and_sharded(prepared):
    ds = TokenDataset(prepared, "valid")
    first = [list(valid_batches(ds, 16, 2, 3, dp_rank=r, dp_size=2)) for r in range(2)]
    second = [list(valid_batches(ds, 16, 2, 3, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(first[0]) == len(first[1]) == 3
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # global batch b holds windows [4b, 4b + 4): rank 0 the first two, rank 1 the next two
    for b in range(3):
        for r in range(2):
            for j in range(2):
                w = ds.window((4 * b + 2 * r + j) * 16, 17).astype(np.int64)
                assert torch.equal(first[r][b][j], torch.from_numpy(w))
    many = list(valid_batches(ds, 16, 2, 10_000))
    assert 0 < len(many) < 10_000  # capped at what the split holds
    with pytest.raises(DataError, match="valid_fraction"):
        list(valid_batches(ArrayDataset(np.zeros(10, np.uint16)), 16, 2, 3))


@pytest.mark.parametrize("field,value", [("valid_fraction", 0.7), ("valid_fraction", 0.0), ("num_workers", 0),
                                         ("shard_tokens", 100)])
def test_prepare_data_refuses_what_the_config_validator_refuses(field, value, tmp_path):
    # one rule: prepare_data, called directly, raises the validator's own message before any work
    from kforcing_dist.config import validate

    cfg = small_config(source="files", paths=[str(tmp_path / "never-read.txt")], **{field: value})
    problems = [p for p in validate(cfg, check_files=False) if p.startswith(f"data.{field}=")]
    assert len(problems) == 1
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tmp_path / "data", progress=False, cache_dir=tmp_path / "cache")
    assert problems[0] in str(err.value)
