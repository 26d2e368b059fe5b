"""prepare-data: documents -> tokenizer -> parallel tokenisation -> train/valid split -> token shards.

The result is a shards folder (see :mod:`.shards`) written atomically: everything goes into a
sibling ``<name>.tmp-<pid>`` folder that is renamed into place at the end, so a crash never
leaves a folder that looks complete. A folder already made from the same inputs (documents,
tokenizer, split and shard settings, summarised by ``inputs_key`` in its metadata) is reused
without work; one made from other inputs is refused rather than overwritten.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .shards import (FORMAT_VERSION, SPLITS, TOKENIZER_DIR, ShardWriter, TokenDataset, read_metadata,
                     shard_metadata, token_dtype, write_metadata)
from .sources import describe_source, iter_documents
from .tokenizer import Tokenizer, build_or_load_tokenizer

logger = logging.getLogger(__name__)

DOCS_PER_TASK = 256

# Set once per worker process by _init_worker; a module global is the only way a Pool initializer
# can hand an object to the task function without re-sending it with every task.
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``texts`` (each followed by EOS) concatenated as int64, and each document's length."""
    ids = tokenizer.encode_batch(texts)
    eos = tokenizer.eos_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for x in ids:
        n = len(x)
        flat[pos:pos + n] = x
        flat[pos + n] = eos
        pos += n + 1
    return flat, lengths


def _encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_WORKER_TOKENIZER, texts)


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_stream(docs: Iterable[str], tokenizer: Tokenizer, num_workers: int,
                    docs_per_task: int = DOCS_PER_TASK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``encode_documents`` results for consecutive chunks of ``docs``, in order.

    With ``num_workers > 1`` the chunks are encoded by a process pool; at most a few chunks per
    worker are in flight, so memory stays bounded for a corpus of any size (``Pool.imap`` would
    read the whole input ahead).
    """
    chunks = _chunks(docs, docs_per_task)
    if num_workers <= 1:
        for chunk in chunks:
            yield encode_documents(tokenizer, chunk)
        return
    # spawn, not fork: the caller may hold threads (torch, tokenizers) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        max_pending = 3 * num_workers
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_task, (chunk,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def split_value(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, document index): the document is valid below valid_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _inputs(cfg, source: dict, tokenizer: Tokenizer) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "seed": cfg.data.seed,
        "valid_fraction": cfg.data.valid_fraction,
        "shard_tokens": cfg.data.shard_tokens,
    }


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _check_existing_is_shards(shards_dir: Path) -> dict | None:
    """The metadata of an existing ``shards_dir``; None when it is absent or an empty folder."""
    if not shards_dir.exists():
        return None
    if shards_dir.is_dir() and not any(shards_dir.iterdir()):
        return None
    try:
        return read_metadata(shards_dir)
    except DataError as e:
        raise DataError(f"{shards_dir} exists but is not a complete shards folder ({e}); delete it or choose "
                        f"another data.shards_dir.") from None


def _check_existing(shards_dir: Path, inputs: dict, key: str) -> dict | None:
    """The metadata of a reusable ``shards_dir``, None when it is absent or empty; DataError otherwise."""
    meta = _check_existing_is_shards(shards_dir)
    if meta is None:
        return None
    if meta.get("inputs_key") != key:
        changed = _diff(meta.get("inputs", {}), inputs)
        raise DataError(f"{shards_dir} holds shards made from other inputs "
                        f"(changed: {', '.join(changed) or 'unknown'}); "
                        f"delete it or choose another data.shards_dir.")
    for split in SPLITS:
        TokenDataset(shards_dir, split)  # checks every shard file: there, its size, its sampled checksum
    return meta


def _move_one_to_valid(tmp: Path, dtype, shard_tokens: int, index: int) -> tuple[dict, dict]:
    """Move train document ``index`` into the (empty) valid split, rewriting the train shards."""
    old_dir = tmp / "train"
    moved_dir = tmp / "train.old"
    os.replace(old_dir, moved_dir)
    old = _SplitReader(moved_dir, dtype)
    train = ShardWriter(old_dir, dtype, shard_tokens)
    valid = ShardWriter(tmp / "valid", dtype, shard_tokens)
    for i in range(old.num_documents):
        (valid if i == index else train).add(old.document(i))
    old.close()
    shutil.rmtree(moved_dir)
    return train.finish(), valid.finish()


class _SplitReader:
    """Documents of a split folder still being written (no metadata.json yet), read into memory.

    Only used when valid_fraction picked no document, i.e. for small corpora.
    """

    def __init__(self, split_dir: Path, dtype):
        self.offsets = np.load(split_dir / "index.npy")
        files = sorted(split_dir.glob("tokens-*.bin"))
        self.tokens = np.concatenate([np.fromfile(f, dtype=dtype) for f in files]) if files else np.empty(0, dtype)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def close(self) -> None:
        self.tokens = None


def _validate(cfg) -> None:
    # the config validator's rules, so that prepare_data called directly accepts exactly what `check` does
    from ..config.validate import data_value_problems

    problems = data_value_problems(cfg.data)
    if problems:
        raise DataError("; ".join(problems))


def prepare_data(cfg, shards_dir, progress: bool = True, cache_dir=None) -> dict:
    """Tokenise the documents of ``cfg.data`` with the tokenizer of ``cfg.tokenizer`` into ``shards_dir``.

    ``cfg`` is a :class:`~kforcing_dist.config.schema.Config`. ``cache_dir`` holds the built-in
    corpus and the trained SentencePiece model (default: ``<shards_dir parent>/cache``). Returns the
    shards' metadata (also in ``shards_dir/metadata.json``).
    """
    _validate(cfg)
    data = cfg.data
    shards_dir = Path(shards_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else shards_dir.parent / "cache"
    start = time.perf_counter()

    _check_existing_is_shards(shards_dir)  # fail before any work on a folder we would never write
    source = describe_source(data, cache_dir, progress=progress)
    tokenizer = build_or_load_tokenizer(cfg.tokenizer, lambda: iter_documents(data, cache_dir), cache_dir / "tokenizer")
    inputs = _inputs(cfg, source, tokenizer)
    key = _key(inputs)
    existing = _check_existing(shards_dir, inputs, key)
    if existing is not None:
        logger.info("reusing the token shards in %s (same inputs)", shards_dir)
        return existing

    vocab = tokenizer.vocab_size
    dtype = token_dtype(vocab)
    tmp = shards_dir.with_name(f"{shards_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writers = {s: ShardWriter(tmp / s, dtype, data.shard_tokens) for s in SPLITS}
        total_docs = None
        if data.source == "builtin":
            total_docs = source["builtin_documents"]
            if data.max_documents > 0:
                total_docs = min(total_docs, data.max_documents)
        index = 0
        n_tokens = 0
        best_train = (2.0, -1)  # (split value, train position) of the train document closest to valid
        tok_start = time.perf_counter()
        bar = tqdm(total=total_docs, unit="doc", desc="tokenising", disable=not progress)
        try:
            for flat, lengths in tokenize_stream(iter_documents(data, cache_dir), tokenizer, data.num_workers):
                if len(flat) and (int(flat.max()) >= vocab or int(flat.min()) < 0):
                    raise DataError(f"the tokenizer {tokenizer!r} produced id {int(flat.max())} outside its vocabulary "
                                    f"of {vocab}; its files are inconsistent: fix or replace tokenizer.path.")
                pos = 0
                for n in lengths:
                    u = split_value(data.seed, index)
                    if u < data.valid_fraction:
                        writers["valid"].add(flat[pos:pos + n])
                    else:
                        if u < best_train[0]:
                            best_train = (u, writers["train"].num_documents)
                        writers["train"].add(flat[pos:pos + n])
                    pos += int(n)
                    index += 1
                n_tokens += len(flat)
                bar.update(len(lengths))
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - tok_start, 1e-9) / 1e3:.0f}k tok/s")
        finally:
            bar.close()
        tok_seconds = time.perf_counter() - tok_start
        if index < 2:
            raise DataError(f"the data source gave {index} document(s) but a train/valid split needs at least 2; "
                            f"add documents (check data.paths / data.max_documents).")
        splits = {s: w.finish() for s, w in writers.items()}
        if splits["valid"]["documents"] == 0:
            # Too few documents for valid_fraction to pick any: hold out the train document whose
            # split value is lowest, which is deterministic.
            logger.info("valid_fraction %.4g selected no document of %d; holding out one", data.valid_fraction, index)
            splits["train"], splits["valid"] = _move_one_to_valid(tmp, dtype, data.shard_tokens, best_train[1])
        tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "inputs_key": key,
            "inputs": inputs,
            "tokenizer": tokenizer.describe(),
            "vocab_size": vocab,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "dtype": dtype.name,
            "source": source,
            "corpus_sha": source["corpus_sha"],
            "seed": data.seed,
            "valid_fraction": data.valid_fraction,
            "shard_tokens": data.shard_tokens,
            "tokens": {s: splits[s]["tokens"] for s in SPLITS},
            "documents": {s: splits[s]["documents"] for s in SPLITS},
            "splits": splits,
            **shard_metadata(),
            "tokenize_seconds": round(tok_seconds, 3),
            "total_seconds": round(time.perf_counter() - start, 3),
        }
        write_metadata(tmp, meta)
        if shards_dir.is_dir() and not any(shards_dir.iterdir()):
            shards_dir.rmdir()
        try:
            os.rename(tmp, shards_dir)
        except OSError:
            # Another process finished the same folder first: keep its copy if it is the same.
            existing = _check_existing(shards_dir, inputs, key)
            if existing is None:
                raise
            shutil.rmtree(tmp)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d train / %d valid tokens (%d / %d documents) to %s in %.1f s",
                meta["tokens"]["train"], meta["tokens"]["valid"], meta["documents"]["train"],
                meta["documents"]["valid"], shards_dir, meta["total_seconds"])
    return meta
