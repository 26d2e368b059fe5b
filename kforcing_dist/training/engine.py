"""Build a DeepSpeed engine from the config: ZeRO stage, AdamW, warmup + cosine, clipping, bf16.

DeepSpeed owns the optimizer, the LR schedule (its ``WarmupCosineLR``), ZeRO partitioning,
gradient accumulation and clipping; megatron-core's tensor-parallel groups reach it through
the ``mpu`` adapter so ZeRO shards over data-parallel ranks only and the grad norm is TP-aware.
"""

from __future__ import annotations

import torch

from ..config import Config, Layout
from ..parallel.groups import DeepSpeedMPU, ParallelGroups


def resolve_precision(requested: str, device: torch.device, zero_stage: int = 1) -> str:
    """``auto`` -> bf16 on a GPU that supports it when ZeRO >= 1, else fp32.

    DeepSpeed keeps fp32 master weights for bf16 only in its ZeRO optimizers: at ZeRO-0 it would
    step the bf16 weights themselves (and 0.19.8 refuses the fp32 gradient accumulation that
    would help), which drifts. So ZeRO-0 trains in fp32, and validation refuses an explicit bf16
    with ZeRO-0."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and zero_stage >= 1:
        return "bf16"
    return "fp32"


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and other 1-d parameters; parameters whose
    name starts with a key of ``lr_scales`` get ``lr * scale`` (DeepSpeed's schedule keeps the
    per-group ratio)."""
    buckets: dict[tuple[float, float], list] = {}
    # a pipeline module names parameters "{layer}.{key}"; the scales use the plain model's names
    to_plain = getattr(model, "plain_name", lambda n: n)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = to_plain(name)
        scale = next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        wd = 0.0 if p.ndim < 2 else weight_decay
        buckets.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * scale} for (scale, wd), ps in buckets.items()]


def deepspeed_config(cfg: Config, layout: Layout, precision: str, load_universal: bool = False) -> dict:
    """DeepSpeed's config for the run. ``load_universal``: the engine's ``load_checkpoint`` reads a
    DeepSpeed universal checkpoint (``convert/universal.py``) instead of its own per-rank files."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.adam_eps,
                       "weight_decay": t.weight_decay, "torch_adam": True, "adam_w_mode": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.max_steps, "warmup_num_steps": max(1, t.warmup_steps),
                       "warmup_min_ratio": 0.0, "warmup_type": "linear", "cos_min_ratio": t.min_lr / t.lr},
        },
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def build_engine(model: torch.nn.Module, cfg: Config, layout: Layout, groups: ParallelGroups,
                 precision: str, lr_scales: dict[str, float] | None = None, load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine; returns the engine (optimizer and scheduler inside).
    ``load_universal``: see :func:`deepspeed_config` (saving is unaffected)."""
    import deepspeed

    from ..model.pipeline import is_pipeline

    ds_cfg = deepspeed_config(cfg, layout, precision, load_universal)
    if is_pipeline(model):
        # no mpu with a pipeline: the engine takes TP x PP x DP from the module's topology
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.train.weight_decay, cfg.train.lr, lr_scales),
            config=ds_cfg, dist_init_required=False)
        return engine
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay, cfg.train.lr, lr_scales),
        config=ds_cfg, mpu=DeepSpeedMPU(groups), dist_init_required=False,
    )
    _record_fp32_clip_norm(engine)
    return engine


def _record_fp32_clip_norm(engine) -> None:
    """Make ``get_global_grad_norm()`` work without ZeRO in fp32.

    DeepSpeed's ZeRO-0 fp32 path clips with ``clip_grad_norm_`` but discards the norm it
    computes, so the engine reports None; keep it (same function, same TP-aware ``mpu``).
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def build_frozen_pipeline_engine(pipe: torch.nn.Module, layout: Layout):
    """A DeepSpeed pipeline engine without optimizer, for forward-only passes of a frozen model."""
    import deepspeed

    for p in pipe.parameters():
        p.requires_grad_(False)
    ds_cfg = {"train_micro_batch_size_per_gpu": layout.micro_batch_size,
              "gradient_accumulation_steps": layout.grad_accum, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 0}}
    engine, _, _, _ = deepspeed.initialize(model=pipe, config=ds_cfg, dist_init_required=False)
    engine.eval()
    return engine
