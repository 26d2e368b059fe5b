"""The decoder checkpoint folder: round trip, atomic save, and a clear DecodeError for every broken
folder (missing files, truncated weights, wrong version, keys or shapes that do not match)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from kforcing_dist.config.schema import ModelConfig
from kforcing_dist.decode import (FORMAT_VERSION, DecodeError, DecoderLM, load_decoder,
                                  read_decoder_config, save_decoder)
from kforcing_dist.decode.format import CONFIG_FILE, WEIGHTS_FILE, expected_weight_shapes

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py



def model_dict(**kw) -> dict:
    base = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=48)
    base.update(kw)
    return dataclasses.asdict(ModelConfig(**base))


def random_state(kind="ar", seed=0, **model_kw) -> tuple[dict, dict]:
    cfg = {"format": FORMAT_VERSION, "kind": kind, "model": model_dict(**model_kw),
           "padded_vocab_size": 128, "max_k": 4 if kind == "pflm" else None,
           "noise": {"max_freq": 64.0} if kind == "pflm" else None}
    model = DecoderLM(cfg).init_random_(seed, std=0.2)
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}


def save(tmp_path, name="ckpt", kind="ar", sd=None, **kw):
    cfg, state = random_state(kind)
    extra = dict(max_k=4, noise={"max_freq": 64.0}) if kind == "pflm" else {}
    extra.update(kw)
    return save_decoder(tmp_path / name, kind=kind, model_config=cfg["model"], padded_vocab_size=128,
                        state_dict=state if sd is None else sd, **extra)


def test_round_trip_and_config_contents(tmp_path):
    cfg, sd = random_state("pflm")
    folder = save_decoder(tmp_path / "pf", kind="pflm", model_config=ModelConfig(**cfg["model"]),
                          padded_vocab_size=128, state_dict=sd, max_k=4, noise={"max_freq": 64.0},
                          cdf_order="sorted", eos_id=2, masked_token_ids=[99, 5], source={"run": "x"})
    raw = json.loads((folder / CONFIG_FILE).read_text())
    assert raw["format"] == FORMAT_VERSION and raw["kind"] == "pflm" and raw["max_k"] == 4
    assert set(raw["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert raw["noise"] == {"features": "rising", "max_freq": 64.0} and raw["cdf_order"] == "sorted"
    assert raw["eos_id"] == 2 and raw["masked_token_ids"] == [5, 99] and raw["dtype"] == "float32"
    assert raw["source"] == {"run": "x"} and raw["weights_bytes"] == (folder / WEIGHTS_FILE).stat().st_size
    assert read_decoder_config(folder)["kind"] == "pflm"
    model = load_decoder(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.eos_id == 2 and model.max_k == 4
    # masked ids get -1000, padded columns -1e4
    logits = model.logits(torch.tensor([[1, 2, 3]]))
    assert torch.all(logits[..., [5, 99]] == -1000.0) and torch.all(logits[..., 100:] == -1.0e4)
    # nothing but the folder is left in its parent (no temporary folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pf"]


def test_expected_shapes_match_decoder_parameters():
    for kw in (dict(), dict(position="learned", tie_embeddings=True, norm_bias=True),
               dict(norm="rmsnorm", activation="swiglu", num_kv_heads=1, lm_head_bias=True,
                    qkv_bias=True, attn_out_bias=True, mlp_bias=False)):
        for kind in ("ar", "pflm"):
            cfg, sd = random_state(kind, **kw)
            shapes = expected_weight_shapes({**cfg, "padded_vocab_size": 128})
            assert {k: tuple(v.shape) for k, v in sd.items()} == shapes


def test_bfloat16_storage(tmp_path):
    folder = save(tmp_path, dtype="bfloat16")
    assert read_decoder_config(folder)["dtype"] == "bfloat16"
    assert load_decoder(folder).dtype == torch.bfloat16
    assert load_decoder(folder, dtype="float32").dtype == torch.float32


def test_existing_folder_is_refused_unless_overwrite(tmp_path):
    folder = save(tmp_path)
    with pytest.raises(DecodeError, match="already exists.*overwrite=True"):
        save(tmp_path)
    save(tmp_path, eos_id=7, overwrite=True)
    assert read_decoder_config(folder)["eos_id"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saved_files_follow_the_umask_and_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    # safetensors alone creates model.safetensors 0600: others on a shared cluster could not read it
    import kforcing_dist.decode.format as fmt

    synced = []
    real_fsync = fmt.fsync_tree
    monkeypatch.setattr(fmt, "fsync_tree", lambda root: (synced.append(root.name), real_fsync(root)))
    old = os.umask(0o022)
    try:
        folder = save(tmp_path)
        assert (folder / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
        assert (folder / CONFIG_FILE).stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        folder = save(tmp_path, overwrite=True)
        assert (folder / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert len(synced) == 2 and all(name.startswith(".ckpt.partial-") for name in synced)


def test_failed_save_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        eos_id = 2
        vocab_size = 100

        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_folder_without_config_is_refused(tmp_path):
    folder = save(tmp_path)
    (folder / CONFIG_FILE).unlink()  # what an interrupted (non-atomic) export would look like
    with pytest.raises(DecodeError, match=f"has no {CONFIG_FILE}.*did not finish.*re-export"):
        load_decoder(folder)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DecodeError, match="does not exist"):
        load_decoder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DecodeError, match="is a file"):
        load_decoder(tmp_path / "file")
    folder = save(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(DecodeError, match=f"no {WEIGHTS_FILE}"):
        load_decoder(folder)


def test_truncated_weights_are_refused(tmp_path):
    folder = save(tmp_path)
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        load_decoder(folder)
    # without the recorded size, safetensors' own check catches it
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    del cfg["weights_bytes"]
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DecodeError, match=f"{WEIGHTS_FILE} cannot be read.*truncated or corrupt"):
        load_decoder(folder)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        load_decoder(folder)


def edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    for k, v in changes.items():
        if k.startswith("model."):
            cfg["model"][k[6:]] = v
        else:
            cfg[k] = v
    cfg.pop("weights_bytes", None)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(format="kforcing-dist-decoder/9"), "unknown format 'kforcing-dist-decoder/9'"),
    (dict(kind="mdlm"), "'kind' must be one of"),
    (dict(**{"model.hidden_size": 64}), "embed_tokens.weight has shape .*needs"),
    (dict(**{"model.num_layers": 3}), r"missing keys \['layers\.2\."),
    (dict(**{"model.tie_embeddings": True}), r"unexpected keys \['lm_head\.weight'\]"),
    (dict(**{"model.position": "learned"}), r"missing keys \['embed_positions\.weight'\]"),
    (dict(**{"model.activation": "swiglu"}), "missing keys .*gate_proj"),
    (dict(**{"model.num_heads": 5}), "num_heads=5 must divide"),
    (dict(**{"model.new_field": 1}), "unknown model fields"),
    (dict(kind="pflm", max_k=2, noise={"max_freq": 64.0}), "noise_encoder"),
    (dict(kind="pflm"), "needs max_k"),
    (dict(max_k=4), "belong to pflm"),
    (dict(eos_id=100), "eos_id must be null or a token id"),
    (dict(masked_token_ids=[128]), "masked_token_ids"),
    (dict(padded_vocab_size=64), "padded_vocab_size must be"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(cdf_order="random"), "cdf_order"),
])
def test_invalid_config_is_refused(tmp_path, changes, match):
    folder = save(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(DecodeError, match=match):
        load_decoder(folder)


def test_missing_model_field_and_bad_json(tmp_path):
    folder = save(tmp_path)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    del cfg["model"]["rope_base"]
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DecodeError, match=r"model fields \['rope_base'\] are missing"):
        read_decoder_config(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(DecodeError, match="not valid JSON"):
        read_decoder_config(folder)


def test_weight_file_with_other_keys_is_refused(tmp_path):
    from safetensors.torch import save_file

    folder = save(tmp_path)
    _, sd = random_state()
    edit_config(folder)  # drop weights_bytes: the file is replaced on purpose below
    bad = dict(sd)
    bad["extra.weight"] = torch.zeros(3)
    save_file(bad, str(folder / WEIGHTS_FILE))
    with pytest.raises(DecodeError, match=r"unexpected keys \['extra\.weight'\]"):
        load_decoder(folder)
    bad = dict(sd)
    bad["layers.1.mlp.fc1.weight"] = torch.zeros(7, 32)
    save_file(bad, str(folder / WEIGHTS_FILE))
    with pytest.raises(DecodeError, match=r"layers\.1\.mlp\.fc1\.weight has shape \(7, 32\).*\(128, 32\)"):
        load_decoder(folder)


def test_save_validates_its_arguments(tmp_path):
    cfg, sd = random_state()
    kw = dict(kind="ar", model_config=cfg["model"], padded_vocab_size=128, state_dict=sd)
    with pytest.raises(DecodeError, match="vocab_size must be positive"):
        save_decoder(tmp_path / "a", **{**kw, "model_config": {**cfg["model"], "vocab_size": 0}})
    with pytest.raises(DecodeError, match="unknown fields"):
        save_decoder(tmp_path / "a", **{**kw, "model_config": {**cfg["model"], "colour": 1}})
    with pytest.raises(DecodeError, match="missing keys"):
        save_decoder(tmp_path / "a", **{**kw, "state_dict": {k: v for k, v in sd.items()
                                                              if k != "final_norm.weight"}})
    with pytest.raises(DecodeError, match="mixes dtypes"):
        save_decoder(tmp_path / "a", **{**kw, "state_dict": {**sd, "final_norm.weight":
                                                             sd["final_norm.weight"].bfloat16()}})
    with pytest.raises(DecodeError, match="needs max_k"):
        save_decoder(tmp_path / "a", **{**kw, "kind": "pflm"})
    with pytest.raises(DecodeError, match="JSON-serialisable"):
        save_decoder(tmp_path / "a", **kw, source={"obj": object()})
    with pytest.raises(DecodeError, match="eos_id"):
        save_decoder(tmp_path / "a", **kw, eos_id=-1)
    assert not os.listdir(tmp_path)
