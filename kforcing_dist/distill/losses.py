"""The student's loss and metrics over its k slots per window.

Cross-entropy of each slot's vocab-parallel logits against its target token (megatron's
vocab-parallel kernel with an explicit TP group), averaged over all slots; per-slot loss and
accuracy, and whole-block exact match (all k slots right), which is also the acceptance rate
of a lossless verifier.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model.loss import vocab_parallel_cross_entropy
from .targets import vocab_parallel_argmax


def slot_metrics(student_logits: torch.Tensor, targets: torch.Tensor, tp_group,
                 weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) for logits [b, W, k, V/tp] against targets [b, W, k].

    loss: mean cross-entropy over all slots (differentiable scalar). With ``weight``
    (nonnegative, broadcastable to [b, W, k], e.g. 0 for windows to ignore) every mean is a
    weighted mean; a block's weight is the mean of its slots' weights.
    metrics (python floats, computed with one device sync): ``loss`` and ``acc`` (all slots),
    ``loss_per_slot`` and ``acc_per_slot`` (lists of k), ``block_match`` (all k right).
    Accuracy compares the global argmax over the vocabulary with the target.
    """
    if student_logits.dim() != 4:
        raise ValueError(f"student logits must have shape [b, W, k, V/tp], "
                         f"got {tuple(student_logits.shape)}")
    if targets.shape != student_logits.shape[:3]:
        raise ValueError(f"targets {tuple(targets.shape)} must have shape [b, W, k] = "
                         f"{tuple(student_logits.shape[:3])}")
    k = targets.shape[2]
    ce = vocab_parallel_cross_entropy(student_logits, targets, tp_group)       # [b, W, k]
    if weight is None:
        w = torch.ones_like(ce)
    else:
        try:
            w = torch.broadcast_to(weight.to(ce.dtype), ce.shape)
        except RuntimeError as err:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to "
                             f"[b, W, k] = {list(ce.shape)}") from err
        if bool((w < 0).any()):
            raise ValueError("weight must be nonnegative")
    slot_w = w.sum(dim=(0, 1)).clamp(min=1e-12)                                 # [k]
    loss = (ce * w).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        correct = (vocab_parallel_argmax(student_logits, tp_group) == targets).to(ce.dtype)
        block_w = w.mean(dim=-1)
        block = correct.prod(dim=-1)
        stats = torch.cat([
            loss.detach().reshape(1),
            ((ce.detach() * w).sum(dim=(0, 1)) / slot_w),
            ((correct * w).sum(dim=(0, 1)) / slot_w),
            ((correct * w).sum() / w.sum().clamp(min=1e-12)).reshape(1),
            ((block * block_w).sum() / block_w.sum().clamp(min=1e-12)).reshape(1),
        ]).tolist()
    metrics = {"loss": stats[0], "loss_per_slot": stats[1:1 + k],
               "acc_per_slot": stats[1 + k:1 + 2 * k], "acc": stats[1 + 2 * k],
               "block_match": stats[2 + 2 * k]}
    return loss, metrics
