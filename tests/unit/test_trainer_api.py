"""The trainer's public surface: the Task protocol, ``train_step``, the Checkpointer's
compatibility checks, and the test-only crash hook that the app (not the library) reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kforcing_dist.training import checkpoint as ckpt
from kforcing_dist.training.metrics import read_log
from tests.unit.test_checkpoint_failures import tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PACKAGE = Path(__file__).resolve().parents[2] / "kforcing_dist"


def test_lm_and_distill_tasks_provide_what_the_trainer_asks_of_a_task(groups):
    from kforcing_dist.config import load_config
    from kforcing_dist.distill.task import DistillTask
    from kforcing_dist.training.task import LMTask, Task

    cfg, _ = load_config(None, [])
    assert isinstance(LMTask(groups.tp_group), Task)
    assert isinstance(DistillTask(1, cfg.distill, groups, ar_teacher=object()), Task)
    assert not isinstance(object(), Task)


def test_train_step_is_the_step_the_loop_takes(groups, tmp_path):
    args = ("train.max_steps=2", "train.log_interval=1", "train.eval_interval=0", "logging.tensorboard=false")
    (tmp_path / "loop").mkdir()
    (tmp_path / "step").mkdir()
    looped = tiny_trainer(groups, tmp_path / "loop", *args)
    looped.train()
    looped.close()
    logged = [r["loss"] for r in read_log(tmp_path / "loop", "train")]
    stepped = tiny_trainer(groups, tmp_path / "step", *args)
    losses = [stepped.train_step(stepped.next_batches())["loss"] for _ in range(2)]
    assert stepped.step == 2 and stepped.tokens_seen == looped.tokens_seen > 0
    assert losses == logged
    with pytest.raises(ValueError, match="takes 1 micro-batches, got 2"):
        stepped.train_step(stepped.next_batches() * 2)
    stepped.close()


def test_resume_refuses_a_checkpoint_of_another_kind_or_run_metadata(groups, tmp_path):
    trainer = tiny_trainer(groups, tmp_path)
    trainer.train_step(trainer.next_batches())
    trainer.save()
    trainer.close()
    other = tiny_trainer(groups, tmp_path)
    other.checkpointer.kind = "pflm-k2"
    other.checkpointer.extra_metadata = {**other.checkpointer.extra_metadata, "padded_vocab_size": 1}
    with pytest.raises(ckpt.CheckpointError) as err:
        other.resume()
    msg = str(err.value)
    assert "\n" not in msg and "cannot resume" in msg
    assert "'teacher' model, this run trains a 'pflm-k2'" in msg and "its padded_vocab_size is" in msg
    other.close()


def test_training_library_reads_no_environment_variables():
    # the crash injection is the app's (KFORCING_DIST_CRASH_AFTER_STEP), passed in as a hook
    readers = []
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(path.name)
    assert readers == []


def test_crash_hook_exits_after_the_named_step_only(monkeypatch):
    from kforcing_dist.app import runtime

    monkeypatch.delenv(runtime.CRASH_ENV, raising=False)
    assert runtime.crash_hook_from_env() is None
    exits = []
    monkeypatch.setattr(runtime.os, "_exit", exits.append)
    monkeypatch.setenv(runtime.CRASH_ENV, "3")
    hook = runtime.crash_hook_from_env()
    for step in (1, 2, 3, 4):
        hook(step)
    assert exits == [runtime.CRASH_EXIT_CODE]
