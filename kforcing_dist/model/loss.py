"""Language-model loss over vocab-parallel logits, with the TP group passed in explicitly.

megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` reduces over the *global*
``parallel_state`` TP group and has no group argument. :class:`_VocabParallelCrossEntropy`
below is its forward/backward with the group made explicit; the arithmetic is megatron's own
(``VocabParallelCrossEntropy`` static methods), and the distributed test checks that both agree
when the groups coincide. Label smoothing is not offered (upstream is wrong with it at TP > 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy


def resolve_tp_group(tp_group):
    """Accept a ParallelGroups (anything with ``.tp_group``) or a process group."""
    group = getattr(tp_group, "tp_group", tp_group)
    if group is None:
        raise ValueError(
            "a tensor-parallel process group is required (pass ParallelGroups or its tp_group); "
            "start torch.distributed first, a world of size 1 is fine")
    return group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of logits split over ``group`` on the last dim (megatron's math).

    Works in place on ``logits`` (the caller hands over a private float32 copy).
    """

    @staticmethod
    def forward(ctx, logits, target, group):
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        part = logits.size(-1)
        start = dist.get_rank(group) * part
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, start, start + part))
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_output)
        return grad_input, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token loss [...] of vocab-parallel logits [..., V/tp]; does not modify ``logits``."""
    group = resolve_tp_group(tp_group)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         f"expected labels of shape {tuple(logits.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    # megatron's kernel subtracts the max and exponentiates in place; give it a private copy so
    # the caller's logits (which autograd may also need) survive. It also flattens with .view(),
    # so the copy (and the labels) must be contiguous, e.g. for logits[:, :-1] / ids[:, 1:].
    work = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return _VocabParallelCrossEntropy.apply(work, labels.contiguous(), group)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group,
            loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross entropy over the tokens where ``loss_mask`` is nonzero.

    logits [b, s, V_padded/tp] (vocab-parallel, from ``TransformerLM.head``), labels [b, s]
    (already shifted: labels[:, t] is the token after position t). Tokens to ignore must be
    masked with ``loss_mask`` (their label value is then irrelevant, e.g. -100). With an
    all-zero mask the loss is 0 (and so are its gradients).
    """
    losses = vocab_parallel_cross_entropy(logits, labels, tp_group)
    if loss_mask is None:
        return losses.mean()
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape "
                         f"{tuple(labels.shape)}")
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
