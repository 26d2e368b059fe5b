"""Offline consolidation of real training checkpoints (TP x DP x ZeRO, fp32/bf16, teacher/student).

Each case trains a tiny model for two steps through the real trainer at its layout and saves; the
consolidated decoder must compute the training model's logits (fp32), or hold exactly the weights the
bf16 engine ran with. The pipeline reader is checked on files fabricated in the shared convention.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from kforcing_dist.convert.layout import pipeline_file, split_tp, tp_split_dim
from kforcing_dist.convert.training import consolidate, consolidate_weights, read_training_checkpoint
from kforcing_dist.decode import load_decoder
from kforcing_dist.training.checkpoint import CheckpointError
from tests.distributed.ckpt_factory import VOCAB, fixed_tokens, write_checkpoint
from tests.distributed.launcher import run_distributed

TOL = 1e-5


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    return run_distributed(write_checkpoint, 2, str(out), 2, 0, "fp32")[0]


def _logits_equal(decoder_dir, result):
    dec = load_decoder(decoder_dir)
    got = dec.logits(fixed_tokens())[..., :VOCAB].numpy()
    diff = np.abs(got - result["logits"]).max()
    assert diff < TOL, diff
    return diff


def test_tp2_consolidates_to_the_training_logits(tp2, tmp_path):
    out = consolidate(tp2["path"], tmp_path / "dec")
    _logits_equal(out, tp2)
    conf = json.loads((out / "config.json").read_text())
    assert conf["kind"] == "ar" and conf["padded_vocab_size"] == 128  # padded for TP=2 as trained
    assert conf["source"]["layout"]["tp"] == 2


def test_zero3_bf16_student_keeps_the_engine_weights(tmp_path):
    # ZeRO-3 partitions over DP=2 merged by DeepSpeed (TP x DP x ZeRO-2 runs the same per-TP-rank
    # merge; a 4-process case costs more than this suite can afford)
    res = run_distributed(write_checkpoint, 2, str(tmp_path / "run"), 1, 3, "bf16", "student")[0]
    ck = read_training_checkpoint(res["path"])
    weights = consolidate_weights(ck)  # fp32 master weights, merged by DeepSpeed
    assert weights.keys() == res["weights"].keys()
    assert any(k.startswith("noise_encoder.") for k in weights)
    for name, w in weights.items():  # the bf16 copies the engine computed with are the rounded masters
        assert torch.equal(w.to(torch.bfloat16).float(), torch.from_numpy(res["weights"][name])), name
    conf = json.loads((consolidate(res["path"], tmp_path / "dec") / "config.json").read_text())
    assert conf["kind"] == "pflm" and conf["max_k"] == 2
    assert conf["tau_range"] == [ck.config.distill.tau_min, ck.config.distill.tau_max]  # trained range


def test_pipeline_files_in_the_shared_convention_are_read(tp2, tmp_path):
    """TP=2 x PP=2 layer files fabricated from the TP=2 checkpoint's weights read back identically."""
    src = read_training_checkpoint(tp2["path"])
    full = consolidate_weights(src)
    folder = tmp_path / "step-00000002"
    shutil.copytree(src.path, folder)
    engine = folder / "engine"
    for f in engine.iterdir():
        f.unlink()
    meta = json.loads((folder / "metadata.json").read_text())
    meta["layout"]["pp"] = 2
    (folder / "metadata.json").write_text(json.dumps(meta))
    L = src.config.model.num_layers
    for r in range(2):
        shard = split_tp(full, 2, r)
        layers = {0: {}, L + 1: {}}
        for name, t in shard.items():
            if name.startswith("layers."):
                i, key = name[len("layers."):].split(".", 1)
                layers.setdefault(int(i) + 1, {})[key] = t
            else:
                layers[0 if name.startswith("embed") else L + 1][name] = t
        for index, sd in layers.items():
            torch.save(sd, engine / pipeline_file(index, r))
    back = consolidate_weights(read_training_checkpoint(folder))
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    _logits_equal(consolidate(folder, tmp_path / "dec"), tp2)
    (engine / pipeline_file(L, 1)).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {pipeline_file(L, 1)}"):
        consolidate_weights(read_training_checkpoint(folder))


def test_damaged_checkpoints_are_refused(tp2, tmp_path):
    def fresh(name):
        dst = tmp_path / name / "step-00000002"
        shutil.copytree(tp2["path"], dst)
        return dst

    ck = fresh("missing")
    (ck / "engine" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing shard mp_rank_01_model_states.pt"):
        consolidate(ck, tmp_path / "d1")
    ck = fresh("truncated")
    f = ck / "engine" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        consolidate(ck, tmp_path / "d2")
    ck = fresh("kind")
    meta = json.loads((ck / "metadata.json").read_text())
    (ck / "metadata.json").write_text(json.dumps({**meta, "kind": "critic"}))
    with pytest.raises(CheckpointError, match="kind 'critic'"):
        consolidate(ck, tmp_path / "d3")
    ck = fresh("vocab")
    (ck / "metadata.json").write_text(json.dumps({**meta, "padded_vocab_size": 192}))
    with pytest.raises(CheckpointError, match="embed_tokens.weight has shape"):
        consolidate(ck, tmp_path / "d4")
    ck = fresh("incomplete")
    (ck / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="COMPLETE marker"):
        consolidate(ck, tmp_path / "d5")
    assert not any(p.name.startswith("d") for p in tmp_path.iterdir())  # nothing half-written


def test_split_table_matches_the_model(groups):
    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.model.student import PFLM

    for extra in ({}, {"activation": "swiglu", "norm": "rmsnorm", "position": "learned", "qkv_bias": True,
                       "attn_out_bias": True, "lm_head_bias": True}):
        cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=8, **extra)
        model = PFLM(cfg, 64, groups.tp_group, max_k=2)
        for name, p in model.named_parameters():
            want = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            assert tp_split_dim(name) == want, name
