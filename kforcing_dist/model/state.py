"""Full (TP=1) views of a tensor-parallel model: gather, load by slicing, count parameters.

A parameter is TP-sharded when megatron flagged it ``tensor_model_parallel`` and split evenly
along ``partition_dim`` (column linears and the vocab embedding / LM head on dim 0 over the
padded vocabulary, row linears on dim 1); everything else is replicated on every TP rank.
Keys are ``model.named_parameters()`` names; megatron's ``_extra_state`` entries (always None)
and non-persistent buffers are not part of these dicts.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from .loss import resolve_tp_group


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _check_stride(name: str, param: torch.Tensor) -> None:
    if getattr(param, "partition_stride", 1) != 1:
        # Strided (interleaved) shards would need a different gather; this model makes none.
        raise ValueError(f"parameter {name} has partition_stride "
                         f"{param.partition_stride}; only contiguous shards are supported")


def gather_tp_tensor(tensor: torch.Tensor, param: torch.Tensor, tp_group) -> torch.Tensor:
    """The full tensor of ``tensor`` (a shard laid out like ``param``), on every rank."""
    group = resolve_tp_group(tp_group)
    tp = dist.get_world_size(group)
    if not is_tp_sharded(param) or tp == 1:
        return tensor.detach().clone()
    shard = tensor.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard, group=group)
    return torch.cat(parts, dim=param.partition_dim)


def full_state_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter as its full (TP=1) tensor, on every TP rank (collective over tp_group).

    Tensors are detached copies on the parameters' device.
    """
    out = {}
    for name, p in model.named_parameters():
        _check_stride(name, p)
        out[name] = gather_tp_tensor(p, p, tp_group)
    return out


def full_grad_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """The gradients gathered like :func:`full_state_dict` (parameters without grad are left
    out; every rank must have the same set, as after a normal backward)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            _check_stride(name, p)
            out[name] = gather_tp_tensor(p.grad, p, tp_group)
    return out


def shard_of(full: torch.Tensor, param: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's slice of a full tensor, laid out like ``param``."""
    group = resolve_tp_group(tp_group)
    if not is_tp_sharded(param):
        return full
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    return full.chunk(tp, dim=param.partition_dim)[rank] if tp > 1 else full


def load_full_state_dict(model: nn.Module, full_sd: Mapping[str, torch.Tensor], tp_group) -> None:
    """Copy full (TP=1) tensors into a model of any TP size by slicing (no communication).

    Raises ValueError naming missing/unexpected keys or a key whose shape does not match.
    Checks everything before copying anything, so a failed load leaves the model untouched.
    """
    group = resolve_tp_group(tp_group)
    tp = dist.get_world_size(group)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full_sd))
    unexpected = sorted(set(full_sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    plan = []
    for name, p in params.items():
        _check_stride(name, p)
        full = full_sd[name]
        want = list(p.shape)
        if is_tp_sharded(p):
            want[p.partition_dim] *= tp
        if list(full.shape) != want:
            raise ValueError(f"shape mismatch for {name}: state dict has {tuple(full.shape)}, "
                             f"the model (full, TP=1 view) needs {tuple(want)}")
        plan.append((p, shard_of(full, p, group)))
    with torch.no_grad():
        for p, shard in plan:
            p.copy_(shard)


def count_parameters(model: nn.Module, tp_group=None) -> int:
    """Number of parameter elements: this rank's shard by default; with ``tp_group`` the full
    (TP=1) model's count (sharded parameters are split evenly, so no communication is needed)."""
    tp = 1 if tp_group is None else dist.get_world_size(resolve_tp_group(tp_group))
    return sum(p.numel() * (tp if is_tp_sharded(p) else 1) for p in model.parameters())
