"""How a stage holds its frozen models (the AR teacher, the previous stage's student).

Frozen models never get gradients or optimizer state. By default every data-parallel replica
holds a full (tensor-parallel) copy. A teacher too big for that can be partitioned over the
data-parallel ranks with DeepSpeed ZeRO-3 and no optimizer (``distill.partition_frozen``): its
forward gathers each layer's weights just in time and frees them again, so a rank holds
1/dp of the frozen weights at rest. Under bf16 training (GPU) the frozen weights are stored in
bf16 as well; the inverse CDF still runs in float64 on their logits.
"""

from __future__ import annotations

import torch

from ..parallel.groups import DeepSpeedMPU, ParallelGroups


def _bf16_config(precision: str) -> dict:
    return {"enabled": precision == "bf16"}


def freeze(model: torch.nn.Module, groups: ParallelGroups, precision: str, partition: bool) -> torch.nn.Module:
    """Move ``model`` (full weights already loaded) to the device, eval mode, no grads; optionally
    partition it with ZeRO-3. Returns the module to call (collective under ``partition``: every
    data-parallel rank must run the same forward passes)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(groups.device, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not partition:
        return model
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": _bf16_config(precision),
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, mpu=DeepSpeedMPU(groups),
                                           dist_init_required=False)
    engine.eval()
    return engine.module
