"""Reshard a training checkpoint to another TP / PP / DP layout (collective over the target job's ranks).

The weights are consolidated offline (:mod:`.training`), padded to the target's vocabulary padding,
sliced into a freshly built model at the target layout, wrapped in the same DeepSpeed engine the
trainer builds, and saved by the trainer's Checkpointer (:mod:`kforcing_dist.training.checkpointer`:
atomic, COMPLETE marker). Carried: the weights, step and tokens seen, the data sampler's position,
the LR schedule (DeepSpeed's scheduler state), the engine's step counters, and - see
:func:`optimizer_carry` - the Adam state (fp32 master weights, ``exp_avg``, ``exp_avg_sq``, ``step``):

- same TP, PP, ZeRO stage and DP size, or ZeRO-0 (not partitioned over DP): DeepSpeed's
  ``load_checkpoint`` reads the source files as they are;
- a DP change under ZeRO-1/2/3 (same TP, no pipeline, same stage; ZeRO-3 only at TP 1): the source
  is converted to a DeepSpeed universal checkpoint (:mod:`.universal`) and loaded with
  ``checkpoint.load_universal``, which re-partitions the state for the target DP size;
- anything else (TP or PP or ZeRO-stage changes, a DP change with a pipeline or with ZeRO-3 at
  TP > 1): the moments are reset; the run says so on stdout and the checkpoint's metadata.json
  records ``optimizer_reset`` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..nn.sizes import pad_vocab_size
from ..training.checkpoint import CheckpointError
from .safeload import load_torch_file
from .training import (STUDENT_KIND_RE, TrainingCheckpoint, checkpoint_noise, consolidate_weights,
                       read_training_checkpoint)
from .universal import TAG as UNIVERSAL_TAG
from .universal import to_universal

log = logging.getLogger("kforcing_dist")


def _engine_counters(ck: TrainingCheckpoint) -> dict:
    """The source engine's scheduler state and step counters (from any model-states file)."""
    files = sorted(p for p in ck.engine_dir.iterdir()
                   if p.name.endswith("model_states.pt") and not p.name.startswith("layer_"))
    if not files:
        raise CheckpointError(f"{ck.engine_dir} has no DeepSpeed model-states file (mp_rank_00_model_states.pt); "
                              f"the checkpoint is incomplete")
    state = load_torch_file(files[0], deepspeed_objects=True)
    return {k: state.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}


# how the Adam state reaches the target (optimizer_carry)
CARRY_FILES, CARRY_UNIVERSAL, CARRY_RESET = "deepspeed", "universal", "reset"


def optimizer_carry(src: dict, dst: dict) -> tuple[str, str | None]:
    """How the source layout's optimizer state reaches the target: (CARRY_FILES | CARRY_UNIVERSAL,
    None), or (CARRY_RESET, why it cannot be carried)."""
    if (src["tp"], src["pp"]) != (dst["tp"], dst["pp"]):
        return CARRY_RESET, (
            f"tensor/pipeline layout changes (tp {src['tp']}->{dst['tp']}, pp {src['pp']}->{dst['pp']}): "
            f"DeepSpeed's optimizer files are per model-parallel rank, and its universal checkpoint cannot "
            f"re-split this model's tensor-parallel shards (nothing records each weight's split); only "
            f"data-parallel changes carry the moments")
    if src["zero_stage"] != dst["zero_stage"]:
        return CARRY_RESET, (f"ZeRO stage changes ({src['zero_stage']}->{dst['zero_stage']}): the optimizer "
                             f"files differ in kind; keep parallel.zero_stage={src['zero_stage']} to carry them")
    if src["dp"] == dst["dp"] or src["zero_stage"] == 0:
        return CARRY_FILES, None
    if src["pp"] > 1:
        return CARRY_RESET, (f"data-parallel size changes ({src['dp']}->{dst['dp']}) with a pipeline "
                             f"(pp {src['pp']}): DeepSpeed's universal checkpoint does not read pipeline layer "
                             f"files; only pp 1 carries the moments across a DP change")
    if src["zero_stage"] == 3 and src["tp"] > 1:
        # DeepSpeed 0.19's ZeRO-3 universal loader cuts a weight's tensor-parallel shard only for its
        # own AutoTP layers (measured: it fails on megatron-core shards at TP 2)
        return CARRY_RESET, (f"data-parallel size changes ({src['dp']}->{dst['dp']}) under ZeRO-3 with tp "
                             f"{src['tp']}: DeepSpeed's ZeRO-3 universal checkpoint cannot re-split this model's "
                             f"tensor-parallel shards; ZeRO-1/2 (or tp 1) carry the moments across a DP change")
    return CARRY_UNIVERSAL, None


def optimizer_carry_reason(src: dict, dst: dict) -> str | None:
    """None when the optimizer state can be carried to the target layout, else why not."""
    return optimizer_carry(src, dst)[1]


def _universal_on_rank0(ck: TrainingCheckpoint, scratch: Path, groups) -> None:
    """Rank 0 converts the source engine folder into ``scratch``; every rank learns whether it worked
    (a failure on rank 0 must not leave the others waiting in the load)."""
    error = None
    if groups.world_rank == 0:
        try:
            if scratch.exists():
                shutil.rmtree(scratch)
            to_universal(ck.engine_dir, scratch)
        except CheckpointError as e:
            error = e
    failed = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise error or CheckpointError(f"rank 0 could not convert {ck.engine_dir} to a universal checkpoint "
                                       f"(its message is in rank 0's output)")


def _repair_zero3_universal_load(engine, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``):

    - it gives every parameter group the first group's hyperparameters: put back each group's own
      (no weight decay on norms and biases, scaled LRs), as the source saved them;
    - it stores one ``step`` tensor object in every group's state, and torch's Adam increments it in
      place once per group, so the second group would see step t+2 on the first resumed step: give
      each group its own copy.
    """
    saved = load_torch_file(universal_dir / UNIVERSAL_TAG / "zero" / "optimizer_state.pt",
                            deepspeed_objects=True)["param_groups"]
    base = engine.optimizer.optimizer
    if len(saved) != len(base.param_groups):
        raise CheckpointError(f"the source optimizer has {len(saved)} parameter groups, the target "
                              f"{len(base.param_groups)}; the checkpoint does not belong to this model")
    for group, src in zip(base.param_groups, saved):
        group.update({k: v for k, v in src.items() if k != "params"})
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def reshard(source, cfg, original_yaml: str, groups, layout) -> tuple[Path, str, str | None]:
    """Write ``<cfg.output_dir>/checkpoints/step-N`` at ``layout`` from the checkpoint ``source``.

    ``cfg``: the target run's config (the source's config.yaml with the new parallel settings);
    ``groups``/``layout``: the running target job's. Returns (checkpoint folder, how the optimizer
    state was carried (:func:`optimizer_carry`), reset reason or None).
    """
    from ..model.pipeline import load_plain_state_dict
    from ..stage import TEACHER, Stage
    from ..training.checkpointer import Checkpointer
    from ..training.engine import build_engine, resolve_precision
    from ..training.export import fit_vocab_rows

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
    k = TEACHER if kind == "teacher" else int(STUDENT_KIND_RE.match(kind).group(1))
    lr_scales = {"noise_encoder.": cfg.distill.noise_encoder_lr_scale} if k else None
    if k and (cfg.distill.noise_features, cfg.distill.noise_max_freq) != \
            (ck.config.distill.noise_features, ck.config.distill.noise_max_freq):
        raise CheckpointError("the target config changes distill.noise_features / noise_max_freq; resharding "
                              "keeps the model: only parallel.* (and the batch split) may differ")
    # the model the stage that wrote the checkpoint trains (only its model choice: cfg is the target run's)
    model = Stage(cfg, k).build_model(cfg.model, padded, groups, layout.pp, noise=checkpoint_noise(ck) if k else None,
                                      masked_token_ids=ck.meta.get("masked_token_ids", []))
    load_plain_state_dict(model, full, groups)
    extra = {k: v for k, v in ck.meta.items()
             if k not in ("kind", "format", "precision", "versions", "model", "layout", "resharded_from",
                          "optimizer_reset", "optimizer_carried")}
    extra["padded_vocab_size"] = padded
    target = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero_stage": cfg.parallel.zero_stage}
    how, reason = optimizer_carry(ck.layout, target)
    extra["resharded_from"] = {"checkpoint": str(ck.path), "layout": ck.layout, "step": ck.state["step"]}
    if reason:
        extra["optimizer_reset"] = reason
    else:
        extra["optimizer_carried"] = how

    def save_extras(folder: Path) -> None:
        if (ck.path / "tokenizer").is_dir():
            shutil.copytree(ck.path / "tokenizer", folder / "tokenizer")

    precision = resolve_precision(cfg.train.precision, groups.device, cfg.parallel.zero_stage)
    engine = build_engine(model.to(groups.device), cfg, layout, groups, precision, lr_scales,
                          load_universal=how == CARRY_UNIVERSAL)
    checkpointer = Checkpointer(cfg, original_yaml, groups, layout, engine, kind, precision, out, extra, save_extras)
    # the universal checkpoint lives beside the target's checkpoints (shared storage on a cluster)
    scratch = out / ".reshard-universal"
    try:
        if how == CARRY_UNIVERSAL:
            _universal_on_rank0(ck, scratch, groups)
            # DeepSpeed re-partitions the fp32 masters and moments for this DP size; the weights it
            # writes back into the model are the fp32 masters (bf16: no rounding through the copies)
            loaded, _ = engine.load_checkpoint(str(scratch), tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load the universal checkpoint made from {ck.engine_dir}")
            if cfg.parallel.zero_stage == 3:
                _repair_zero3_universal_load(engine, scratch)
        elif how == CARRY_FILES:
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
        path = checkpointer.save(ck.state["step"], ck.state.get("tokens_seen", 0), dict(src_sampler))
    finally:
        if how == CARRY_UNIVERSAL and groups.world_rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return path, how, reason
