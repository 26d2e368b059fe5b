"""The trainer's saves and resumes when the disk is full or a complete checkpoint is damaged."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from kforcing_dist.training import checkpoint as ckpt
from tests.distributed.ckpt_factory import BASE, VOCAB, RandomSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_trainer(groups, out, *overrides):
    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.training.task import LMTask
    from kforcing_dist.training.trainer import LMTrainer

    cfg, text = load_config(None, BASE + ["train.micro_batch_size=2", f"output_dir={out}", *overrides])
    padded = pad_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, 1)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model, padded, groups.tp_group)
    valid = RandomSampler(2, 1).next_batch()
    return LMTrainer(cfg, text, groups, derive_layout(cfg, 1), model, LMTask(groups.tp_group), RandomSampler(2, 0),
                     lambda: iter([valid]), out, extra_metadata={"padded_vocab_size": padded})


def train_and_save(trainer, steps):
    for _ in range(steps):
        trainer.train_step(trainer.next_batches())
        trainer.save()


def test_full_disk_during_a_save_removes_the_partial_folder_and_says_how_much_is_needed(groups, tmp_path,
                                                                                         monkeypatch):
    trainer = tiny_trainer(groups, tmp_path)
    train_and_save(trainer, 1)
    previous_size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "step-00000001").rglob("*")
                        if f.is_file())

    def full_disk(save_dir, **_):
        (ckpt.Path(save_dir) / "engine").mkdir()
        (ckpt.Path(save_dir) / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", full_disk)
    trainer.step += 1
    with pytest.raises(ckpt.CheckpointError) as err:
        trainer.save()
    msg = str(err.value)
    assert "\n" not in msg and "step-00000002" in msg and "No space left on device" in msg
    # needed: the previous checkpoint's size (more than the 1000 bytes written); free: a figure
    assert f"needs about {ckpt.human_bytes(previous_size)}" in msg and "1000 B were written" in msg
    assert "are free there" in msg and "resumes from step-00000001" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    trainer.close()


def test_damaged_checkpoint_names_the_file_and_offers_the_previous_one(groups, tmp_path):
    trainer = tiny_trainer(groups, tmp_path, "checkpoint.keep_last=3")
    train_and_save(trainer, 2)
    trainer.close()
    damaged = tmp_path / "checkpoints" / "step-00000002"
    engine_file = damaged / "engine" / "mp_rank_00_model_states.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:5000])  # truncated
    with pytest.raises(ckpt.CheckpointError) as err:
        tiny_trainer(groups, tmp_path).resume()
    msg = str(err.value)
    assert "\n" not in msg and str(engine_file) in msg and "step-00000001" in msg
    assert "checkpoint.resume_fallback=true" in msg
    # with the flag: the previous complete one, and the damaged one is no longer taken for complete
    trainer = tiny_trainer(groups, tmp_path, "checkpoint.resume_fallback=true")
    assert trainer.resume().name == "step-00000001" and trainer.step == 1
    assert (damaged / "DAMAGED").is_file() and not ckpt.is_complete(damaged)
    trainer.close()


@pytest.mark.parametrize("name,text", [("trainer_state.json", '{"step": 2,'), ("metadata.json", "")])
def test_garbled_json_of_a_complete_checkpoint_is_named(groups, tmp_path, name, text):
    trainer = tiny_trainer(groups, tmp_path)
    train_and_save(trainer, 1)
    trainer.close()
    (tmp_path / "checkpoints" / "step-00000001" / name).write_text(text)
    with pytest.raises(ckpt.CheckpointError, match=f"{name} is not readable JSON.*no earlier complete checkpoint"):
        tiny_trainer(groups, tmp_path, "checkpoint.resume_fallback=true").resume()


def test_saved_checkpoint_is_fsynced_before_it_is_renamed(groups, tmp_path, monkeypatch):
    synced = []
    real = ckpt.fsync_tree
    monkeypatch.setattr(ckpt, "fsync_tree", lambda root: (synced.append(root.name), real(root)))
    trainer = tiny_trainer(groups, tmp_path)
    train_and_save(trainer, 1)
    trainer.close()
    assert synced == [".tmp-step-00000001"]
    folder = tmp_path / "checkpoints" / "step-00000001"
    assert json.loads((folder / "COMPLETE").read_text())["step"] == 1
    # readable by others as the umask allows, like the exports
    from kforcing_dist.fsio import current_umask
    modes = {f.stat().st_mode & 0o777 for f in folder.rglob("*") if f.is_file()}
    assert modes == {0o666 & ~current_umask()}


def test_run_resumed_at_its_last_step_reports_the_figures_logged_there(groups, tmp_path):
    # a rerun that finds the final checkpoint but no summary trains nothing: its result must
    # not be a NaN loss without validation figures
    args = ("train.max_steps=2", "train.log_interval=1", "logging.tensorboard=false")
    trainer = tiny_trainer(groups, tmp_path, *args)
    first = trainer.train()
    trainer.close()
    trainer = tiny_trainer(groups, tmp_path, *args)
    trainer.resume()
    again = trainer.train()
    trainer.close()
    assert again.step == first.step == 2 and again.last_loss == first.last_loss
    assert again.val == first.val and "val_loss" in again.val and again.tokens_per_s == first.tokens_per_s
