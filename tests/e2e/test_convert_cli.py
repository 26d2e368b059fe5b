"""``kforcing-dist convert``: a TP=2 x PP=2 teacher checkpoint consolidates to the training run's own
export; resharded to TP=1 x PP=1 it resumes training exactly where the TP=2 x PP=2 run stood (same
data, weights and learning rate: the first resumed step's loss and gradient norm equal the source
run's), and both consolidate to decoders with the same logits; a DP change under ZeRO-0 carries the
Adam moments."""

from __future__ import annotations

import json

import torch

from kforcing_dist.convert.safeload import load_torch_file
from kforcing_dist.decode import load_decoder
from kforcing_dist.training.metrics import read_log
from tests.conftest import SMOKE, run_cli


def test_reshard_tp2_pp2_to_tp1_resumes_and_keeps_logits(smoke_shards, tmp_path):
    common = ["-c", SMOKE, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=6",
              "--set", "checkpoint.save_interval=4", "--set", "train.eval_interval=0",
              "--set", "logging.tensorboard=false", "--set", "train.log_interval=1"]
    tp2, tp1 = tmp_path / "tp2", tmp_path / "tp1"
    run_cli("--standalone", "--nproc_per_node=4", "-m", "kforcing_dist", "train-teacher", "-o", tp2, *common,
            "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1",
            module="torch.distributed.run")
    src = tp2 / "checkpoints" / "step-00000004"
    assert (src / "engine" / "layer_01-model_01-model_states.pt").is_file()  # pipeline layer files
    # offline consolidation of the pipeline checkpoint == the export the live TP2 x PP2 run gathered
    run_cli("convert", "consolidate", "--checkpoint", tp2 / "checkpoints" / "step-00000006", "--out",
            tmp_path / "last")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    live, offline = (load_decoder(f).logits(ids)[..., :512] for f in (tp2 / "export", tmp_path / "last"))
    assert (live - offline).abs().max().item() < 1e-5

    proc = run_cli("convert", "reshard", "--checkpoint", src, "-o", tp1, "--set", "parallel.tp=1",
                   "--set", "parallel.pp=1", "--set", "parallel.zero_stage=0")
    assert "optimizer state (Adam moments) is RESET" in proc.stdout
    meta = json.loads((tp1 / "checkpoints" / "step-00000004" / "metadata.json").read_text())
    assert meta["layout"]["tp"] == 1 and meta["layout"]["pp"] == 1 and "tp 2->1" in meta["optimizer_reset"]
    assert meta["resharded_from"]["layout"]["tp"] == 2 and meta["resharded_from"]["layout"]["pp"] == 2

    for name, ck in (("a", src), ("b", tp1 / "checkpoints" / "step-00000004")):
        run_cli("convert", "consolidate", "--checkpoint", ck, "--out", tmp_path / name)
    a, b = (load_decoder(tmp_path / n).logits(ids)[..., :512] for n in ("a", "b"))
    assert (a - b).abs().max().item() < 1e-5

    # a new run started from converted weights (train.init_from) begins where those weights were
    proc = run_cli("train-teacher", "-o", tmp_path / "init", *common, "--set", "train.max_steps=1",
                   "--set", f"train.init_from={tmp_path / 'a'}")
    assert "teacher initialised from" in proc.stderr
    first = {r["step"]: r for r in read_log(tmp_path / "init", "train")}[1]

    proc = run_cli("train-teacher", "-o", tp1, *common)
    assert "resumed from" in proc.stderr and "step-00000004" in proc.stderr
    ref = {r["step"]: r for r in read_log(tp2, "train")}
    new = {r["step"]: r for r in read_log(tp1, "train")}
    assert sorted(new) == [5, 6]
    # step 5 is computed before the optimizer update: same weights, data and LR schedule as TP=2
    assert abs(new[5]["loss"] - ref[5]["loss"]) < 1e-5
    assert abs(new[5]["grad_norm"] - ref[5]["grad_norm"]) < 1e-4
    assert new[5]["lr"] == ref[5]["lr"] and new[6]["lr"] == ref[6]["lr"]
    assert first["loss"] < ref[1]["loss"] - 0.05  # the same first batch, on the step-4 weights

    # ZeRO-0 at DP 1 -> 2: DeepSpeed's optimizer files fit, so the Adam moments are carried unchanged
    dp2 = tmp_path / "dp2"
    proc = run_cli("--standalone", "--nproc_per_node=2", "-m", "kforcing_dist", "convert", "reshard",
                   "--checkpoint", tp1, "-o", dp2, "--set", "train.micro_batch_size=8",
                   "--set", "train.global_batch_size=16", module="torch.distributed.run")
    assert "optimizer state was carried over" in proc.stdout
    a, b = (load_torch_file(r / "checkpoints" / "step-00000006" / "engine" / "mp_rank_00_model_states.pt",
                            deepspeed_objects=True) for r in (tp1, dp2))
    assert a["optimizer"]["state"] and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and b["global_steps"] == 6
    meta = json.loads((dp2 / "checkpoints" / "step-00000006" / "metadata.json").read_text())
    assert meta["layout"]["dp"] == 2 and "optimizer_reset" not in meta

    # and back onto a pipeline: TP=1 -> PP=2 writes pipeline layer files with the same weights
    pp2 = tmp_path / "pp2"
    run_cli("--standalone", "--nproc_per_node=2", "-m", "kforcing_dist", "convert", "reshard",
            "--checkpoint", tp1, "-o", pp2, "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1",
            module="torch.distributed.run")
    assert (pp2 / "checkpoints" / "step-00000006" / "engine" / "layer_03-model_00-model_states.pt").is_file()
    for name, ck in (("c", tp1), ("d", pp2)):
        run_cli("convert", "consolidate", "--checkpoint", ck, "--out", tmp_path / name)
    c, d = (load_decoder(tmp_path / n).logits(ids)[..., :512] for n in ("c", "d"))
    assert (c - d).abs().max().item() < 1e-5


def test_convert_refusals_exit_2(tmp_path):
    proc = run_cli("convert", "consolidate", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("convert", "from-kforcing", "--checkpoint", tmp_path / "a.ckpt", "--out", tmp_path / "y",
                   check=False)
    assert proc.returncode == 2 and "--num-heads is required" in proc.stderr
