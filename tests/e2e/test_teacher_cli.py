"""End-to-end runs of the CLI on the smoke config: learning, exact resume, clear refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from kforcing_dist.training.metrics import read_log
from tests.conftest import SMOKE, run_cli


def unigram_entropy(shards) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: a model that learns nothing
    beyond token frequencies cannot get a validation loss below it."""
    meta = json.loads((shards / "metadata.json").read_text())
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for f in sorted((shards / "train").glob("*.bin")):
        counts += np.bincount(np.fromfile(f, dtype=meta["dtype"]), minlength=meta["vocab_size"])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_teacher_learns_below_unigram_entropy(smoke_shards, tmp_path):
    out = tmp_path / "run"
    run_cli("train-teacher", "-c", SMOKE, "-o", out, "--set", f"data.shards_dir={smoke_shards}")
    summary = json.loads((out / "teacher_summary.json").read_text())
    h = unigram_entropy(smoke_shards)
    assert summary["step"] == 200 and not summary["stopped_early"]
    assert summary["val_loss"] < h - 0.5, (summary["val_loss"], h)
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-6)
    # TensorBoard events and a complete checkpoint with its config, tokenizer and marker
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ck = out / "checkpoints" / "step-00000200"
    for name in ("COMPLETE", "config.yaml", "original_config.yaml", "metadata.json", "trainer_state.json"):
        assert (ck / name).is_file(), name
    assert (ck / "tokenizer").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000100", "step-00000200"]
    assert {r["step"] for r in read_log(out, "valid")} == {100, 200}


def _losses(out):
    return {r["step"]: r["loss"] for r in read_log(out, "train")}


def test_crash_then_resume_matches_uninterrupted_run(smoke_shards, tmp_path):
    common = ["-c", SMOKE, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=8",
              "--set", "checkpoint.save_interval=4", "--set", "train.log_interval=1",
              "--set", "train.eval_interval=0", "--set", "logging.tensorboard=false"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run_cli("train-teacher", "-o", ref, *common)
    proc = run_cli("train-teacher", "-o", crashed, *common, check=False,
                   env_extra={"KFORCING_DIST_CRASH_AFTER_STEP": "6"})
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckroot = crashed / "checkpoints"
    # a save of step 7 that died half-way (or an interrupted copy): its files are cut short and
    # there is no COMPLETE marker; resume must ignore it and take step 4 (loading it fails)
    half = ckroot / "step-00000007"
    shutil.copytree(ckroot / "step-00000004", half)
    (half / "COMPLETE").unlink()
    state = json.loads((half / "trainer_state.json").read_text())
    (half / "trainer_state.json").write_text(json.dumps({**state, "step": 7}))
    weights = list((half / "engine").glob("*.pt"))
    assert weights
    for f in weights:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run_cli("train-teacher", "-o", crashed, *common)
    ref_losses, resumed = _losses(ref), _losses(crashed)
    assert sorted(ref_losses) == list(range(1, 9))
    for step in range(5, 9):  # steps 5-6 ran twice in the crashed run: the log keeps the last
        assert resumed[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    # ... and only once: the resumed run cut the log back to step 4
    assert [r["step"] for r in read_log(crashed, "train")] == list(range(1, 9))
    assert not (ckroot / "step-00000007").exists() or not (ckroot / "step-00000007" / "COMPLETE").exists()
    assert (ckroot / "step-00000008" / "COMPLETE").is_file()


def test_resume_with_other_layout_is_refused(smoke_shards, tmp_path):
    out = tmp_path / "run"
    base = ["-c", SMOKE, "-o", out, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=2",
            "--set", "logging.tensorboard=false"]
    run_cli("train-teacher", *base)
    proc = run_cli("train-teacher", *base, "--set", "model.hidden_size=32", "--set", "train.max_steps=4",
                   check=False)
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "hidden_size" in proc.stderr


def test_tokenizer_mismatch_is_refused(smoke_shards, tmp_path):
    other = tmp_path / "other-shards"
    run_cli("prepare-data", "-c", SMOKE, "-o", tmp_path, "--set", f"data.shards_dir={other}",
            "--set", "tokenizer.vocab_size=640")
    # the model's tokenizer (tokenizer.path) is not the one these shards were made with
    proc = run_cli("train-teacher", "-c", SMOKE, "-o", tmp_path / "run", "--set", f"data.shards_dir={other}",
                   "--set", f"tokenizer.path={smoke_shards / 'tokenizer'}", check=False)
    assert proc.returncode == 2
    assert "tokenizer" in proc.stderr and "prepare-data" in proc.stderr


def test_bad_config_exits_2_before_starting(tmp_path):
    proc = run_cli("train-teacher", "-c", SMOKE, "-o", tmp_path, "--set", "parallel.zero_stage=3",
                   "--set", "parallel.pp=2", "--set", "model.bogus=1", check=False)
    assert proc.returncode == 2
    assert "model.bogus: unknown key" in proc.stderr


def test_help_lists_subcommands():
    out = run_cli("--help").stdout
    for sub in ("prepare-data", "train-teacher", "show-config"):
        assert sub in out


# The CLI with a spy on early_signals.catch: SIGUSR1 arrives right after the catcher is installed
# (a fraction of a second after start), and the spy records whether torch was already imported.
_USR1_RIGHT_AFTER_CATCH = """
import os, signal, sys
from kforcing_dist.app import early_signals

catch = early_signals.catch


def catch_then_usr1():
    catch()
    print(f"torch imported before the catcher: {'torch' in sys.modules}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)


early_signals.catch = catch_then_usr1
from kforcing_dist.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_usr1_during_start_up_saves_and_stops_at_the_first_step(smoke_shards, tmp_path):
    """A Slurm warning that lands while torch is still importing must not kill the job (138, the
    default action of SIGUSR1): it stops at the first step boundary with a checkpoint and exit
    code 3 (rerun to resume). Fails when cli.main imports torch (or anything heavy) before
    installing the catcher, or does not install it."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "run"
    cmd = [sys.executable, "-c", _USR1_RIGHT_AFTER_CATCH, "train-teacher", "-c", str(SMOKE), "-o", str(out),
           "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=50",
           "--set", "logging.tensorboard=false", "--set", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                          text=True, timeout=300)
    assert "torch imported before the catcher: False" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])
    assert "received SIGUSR1 during start-up" in proc.stderr
    assert (out / "checkpoints" / "step-00000001" / "COMPLETE").is_file()


def test_rerunning_a_finished_command_keeps_its_summary(smoke_shards, tmp_path):
    out = tmp_path / "run"
    args = ["-c", SMOKE, "-o", out, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=2",
            "--set", "logging.tensorboard=false"]
    run_cli("train-teacher", *args)
    summary = (out / "teacher_summary.json").read_text()
    assert "val_loss" in json.loads(summary)
    proc = run_cli("train-teacher", *args)
    assert "already finished at step 2" in proc.stderr and str(out / "export") in proc.stderr
    assert (out / "teacher_summary.json").read_text() == summary


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(smoke_shards, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "job": None,
                                                "command": "train-teacher", "since": "then", "token": "x"}))
        args = ["-c", SMOKE, "-o", out, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=2",
                "--set", "logging.tensorboard=false"]
        proc = run_cli("train-teacher", *args, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(error) == 1 and f"pid {holder.pid}" in error[0] and "another -o/--output-dir" in error[0]
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is taken over with a warning, and removed at the end
    (out / "checkpoints" / ".tmp-step-00000001").mkdir(parents=True)
    proc = run_cli("train-teacher", *args)
    assert "took over the lock" in proc.stderr and ".tmp-step-00000001" in proc.stderr
    assert not (out / ".lock").exists() and os.listdir(out / "checkpoints") == ["step-00000002"]
