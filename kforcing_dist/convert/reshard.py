"""Reshard a training checkpoint to another TP / PP / DP layout (collective over the target job's ranks).

The weights are consolidated offline (:mod:`.training`), padded to the target's vocabulary padding,
sliced into a freshly built model at the target layout, wrapped in the same DeepSpeed engine the
trainer builds, and saved with the trainer's own ``save`` (atomic, COMPLETE marker). Carried: the
weights, step and tokens seen, the data sampler's position, the LR schedule (DeepSpeed's scheduler
state), the engine's step counters. The Adam moments are carried by DeepSpeed's own
``load_checkpoint`` where its files fit the target unchanged (same TP and PP, and the same DP size
or ZeRO-0, whose optimizer state is not partitioned over DP); elsewhere they are reset: the run
says so on stdout and the checkpoint's metadata.json records ``optimizer_reset`` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from ..training.checkpoint import CheckpointError
from .safeload import load_torch_file
from .training import (STUDENT_KIND_RE, TrainingCheckpoint, checkpoint_noise, consolidate_weights,
                       read_training_checkpoint)

log = logging.getLogger("kforcing_dist")


class _CarriedSampler:
    """Stands in for the data sampler while saving: its state is the source checkpoint's."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return dict(self._state)


class _TaskKind:
    """What the trainer needs of a task to build an engine and save: its kind and LR groups."""

    def __init__(self, kind: str, lr_scales: dict | None):
        self.kind, self.lr_scales = kind, lr_scales

    def pipe_loss(self, *_):  # a pipeline engine wants a loss function; a reshard never trains
        raise RuntimeError("a resharding job does not train")


def _engine_counters(ck: TrainingCheckpoint) -> dict:
    """The source engine's scheduler state and step counters (from any model-states file)."""
    files = sorted(p for p in ck.engine_dir.iterdir()
                   if p.name.endswith("model_states.pt") and not p.name.startswith("layer_"))
    if not files:
        raise CheckpointError(f"{ck.engine_dir} has no DeepSpeed model-states file (mp_rank_00_model_states.pt); "
                              f"the checkpoint is incomplete")
    state = load_torch_file(files[0], deepspeed_objects=True)
    return {k: state.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}


def optimizer_carry_reason(src: dict, dst: dict) -> str | None:
    """None when DeepSpeed can load the source optimizer state at the target layout as it is, else why not."""
    if (src["tp"], src["pp"]) != (dst["tp"], dst["pp"]):
        return (f"tensor/pipeline layout changes (tp {src['tp']}->{dst['tp']}, pp {src['pp']}->{dst['pp']}): "
                f"DeepSpeed's optimizer files are per model-parallel rank")
    if src["zero_stage"] != dst["zero_stage"]:
        return f"ZeRO stage changes ({src['zero_stage']}->{dst['zero_stage']}): the optimizer files differ in kind"
    if src["dp"] != dst["dp"] and src["zero_stage"] > 0:
        return (f"data-parallel size changes ({src['dp']}->{dst['dp']}) under ZeRO-{src['zero_stage']}: the "
                f"partitioned optimizer state would need a DeepSpeed universal checkpoint (ds_to_universal)")
    return None


def reshard(source, cfg, original_yaml: str, groups, layout) -> tuple[Path, str | None]:
    """Write ``<cfg.output_dir>/checkpoints/step-N`` at ``layout`` from the checkpoint ``source``.

    ``cfg``: the target run's config (the source's config.yaml with the new parallel settings);
    ``groups``/``layout``: the running target job's. Returns (checkpoint folder, reset reason or None).
    """
    from ..model.pipeline import build_model, load_plain_state_dict
    from ..model.transformer import pad_vocab_size
    from ..training.export import fit_vocab_rows
    from ..training.trainer import LMTrainer

    ck = read_training_checkpoint(source)
    if dataclasses.asdict(cfg.model) != ck.meta["model"]:
        raise CheckpointError("the target config changes the model architecture; resharding keeps the model: "
                              "only parallel.* (and the batch split) may differ")
    src_sampler = ck.state.get("sampler") or {}
    if "global_batch" in src_sampler and src_sampler["global_batch"] != layout.global_batch_size:
        raise CheckpointError(
            f"the source trained with a global batch of {src_sampler['global_batch']} sequences, the target layout "
            f"gives {layout.global_batch_size} (micro_batch_size x grad_accum x dp); set "
            f"--set train.global_batch_size={src_sampler['global_batch']} so the data position carries over")
    out = Path(cfg.output_dir)
    target_ckpts = out / "checkpoints"
    if target_ckpts.exists() and any(target_ckpts.iterdir()):
        raise CheckpointError(f"{target_ckpts} already holds checkpoints; reshard into a new output folder")
    kind = ck.kind
    padded = pad_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp)
    full = fit_vocab_rows(consolidate_weights(ck), padded)
    torch.manual_seed(cfg.train.seed)
    k = 0 if kind == "teacher" else int(STUDENT_KIND_RE.match(kind).group(1))
    lr_scales = {"noise_encoder.": cfg.distill.noise_encoder_lr_scale} if k else None
    if k and (cfg.distill.noise_features, cfg.distill.noise_max_freq) != \
            (ck.config.distill.noise_features, ck.config.distill.noise_max_freq):
        raise CheckpointError("the target config changes distill.noise_features / noise_max_freq; resharding "
                              "keeps the model: only parallel.* (and the batch split) may differ")
    model = build_model(cfg.model, padded, groups, layout.pp, max_k=k, noise=checkpoint_noise(ck) if k else None,
                        masked_token_ids=ck.meta.get("masked_token_ids", []))
    load_plain_state_dict(model, full, groups)
    extra = {k: v for k, v in ck.meta.items()
             if k not in ("kind", "format", "precision", "versions", "model", "layout", "resharded_from",
                          "optimizer_reset")}
    extra["padded_vocab_size"] = padded
    target = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero_stage": cfg.parallel.zero_stage}
    reason = optimizer_carry_reason(ck.layout, target)
    extra["resharded_from"] = {"checkpoint": str(ck.path), "layout": ck.layout, "step": ck.state["step"]}
    if reason:
        extra["optimizer_reset"] = reason

    def save_extras(folder: Path) -> None:
        if (ck.path / "tokenizer").is_dir():
            shutil.copytree(ck.path / "tokenizer", folder / "tokenizer")

    trainer = LMTrainer(cfg, original_yaml, groups, layout, model, _TaskKind(kind, lr_scales),
                        _CarriedSampler(src_sampler), lambda: iter(()), out, extra_metadata=extra,
                        save_extras=save_extras)
    try:
        engine = trainer.engine
        if reason is None:
            # same files per model-parallel rank: DeepSpeed loads the moments itself (weights identical)
            loaded, _ = engine.load_checkpoint(str(ck.path), tag="engine", load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load the optimizer state from {ck.engine_dir}")
        else:
            counters = _engine_counters(ck)
            if counters["lr_scheduler"] and engine.lr_scheduler is not None:
                # step(i) sets the optimizer's learning rates for iteration i, as after a real resume
                engine.lr_scheduler.step(counters["lr_scheduler"]["last_batch_iteration"])
            for name in ("global_steps", "global_samples", "skipped_steps"):
                if counters[name] is not None:
                    setattr(engine, name, counters[name])
        trainer.step, trainer.tokens_seen = ck.state["step"], ck.state.get("tokens_seen", 0)
        path = trainer.save()
    finally:
        trainer.close()
    return path, reason
