"""Tensor-parallel building blocks of the causal Transformer: attention, MLP, block.

The linears are megatron-core tensor-parallel layers created with an explicit ``tp_group``;
everything else (norms and rotary positions from :mod:`kforcing_dist.nn`, learned positions) is
replicated on every TP rank.
Activations are batch-first ``[b, s, H]`` throughout (megatron's linears do not care about the
order of the leading dimensions).

Attention masks follow torch SDPA: a boolean tensor broadcastable to ``[b, heads, s_q, s_k]``
where True means "may attend". ``heads`` is the model's (global) head count; each TP rank
keeps the slice belonging to its own heads.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ..config.schema import ModelConfig
from ..nn.norm import Norm
from ..nn.rotary import apply_rotary
from ..nn.sizes import ffn_hidden_size


def normal_init(std: float):
    """An init_method for megatron layers (called on the full master weight)."""
    return partial(nn.init.normal_, mean=0.0, std=std)


def group_size_rank(tp_group) -> tuple[int, int]:
    return torch.distributed.get_world_size(tp_group), torch.distributed.get_rank(tp_group)


# --------------------------------------------------------------------------------------------
# Attention core


def causal_mask(s_q: int, s_k: int, device) -> torch.Tensor:
    """[s_q, s_k] boolean, True = may attend; queries are the *last* s_q positions of the keys.

    (Bottom-right alignment: SDPA's ``is_causal`` is top-left aligned, which is wrong as soon as
    keys carry extra context in front of the queries.)
    """
    q_pos = torch.arange(s_q, device=device)[:, None] + (s_k - s_q)
    return torch.arange(s_k, device=device)[None, :] <= q_pos


def prepare_attention_mask(mask: torch.Tensor, *, batch: int, num_heads: int, local_heads: int,
                           head_offset: int, s_q: int, s_k: int) -> torch.Tensor:
    """Check a user mask and return it as a 4-D tensor covering this rank's heads only."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a boolean tensor (True = may attend), got {got}")
    if mask.dim() > 4:
        raise ValueError(f"attention_mask must have at most 4 dims [b, heads, s_q, s_k], "
                         f"got shape {tuple(mask.shape)}")
    m = mask[(None,) * (4 - mask.dim())]  # leading broadcast dims, always a view
    want = (batch, num_heads, s_q, s_k)
    for got_n, want_n, name in zip(m.shape, want, ("batch", "heads", "s_q", "s_k")):
        if got_n not in (1, want_n):
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} does not broadcast to "
                f"[b, heads, s_q, s_k] = {list(want)} (dimension {name}: {got_n} vs {want_n})")
    if m.shape[1] != 1 and local_heads != num_heads:
        # A per-head mask is written for the global heads; this TP rank owns a contiguous slice.
        m = m[:, head_offset:head_offset + local_heads]
    return m


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor], backend: str, causal_prefix: int = 0) -> torch.Tensor:
    """Scaled dot-product attention over [b, heads, s, d] tensors (k/v already GQA-expanded).

    ``mask`` None means causal (bottom-right aligned when s_k > s_q). Fully masked query rows
    return zeros with the math backend and with torch's CPU SDPA; GPU kernels may differ, so
    callers should give every query at least one visible key. ``causal_prefix`` P > 0 (self-
    attention with a mask): the mask's first P rows are plain causal over the first P keys (the
    staircase's context), so the sdpa backend runs them on the causal fast path and only the
    other rows against the mask, skipping the masked-out context-to-window block; the math
    backend (the reference) always uses the whole mask.
    """
    s_q, s_k = q.shape[-2], k.shape[-2]
    if backend in ("sdpa", "auto"):
        if mask is None and s_q == s_k:
            # Fast path: no mask tensor, so the fused flash/mem-efficient kernels apply on GPU.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if mask is not None and 0 < causal_prefix < s_q == s_k:
            P = causal_prefix
            head = F.scaled_dot_product_attention(q[..., :P, :], k[..., :P, :], v[..., :P, :], is_causal=True)
            tail = F.scaled_dot_product_attention(q[..., P:, :], k, v, attn_mask=mask[..., P:, :])
            return torch.cat([head, tail], dim=-2)
        if mask is None:
            mask = causal_mask(s_q, s_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend != "math":
        raise ValueError(f"model.attention_backend must be auto, sdpa or math, got {backend!r}")
    # Explicit reference: softmax in float32.
    if mask is None:
        mask = causal_mask(s_q, s_k, q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    # A fully masked row would softmax to uniform weights; multiplying by the mask zeroes it
    # (as torch's SDPA does) and is exact for every other row, whose masked weights are 0.
    probs = torch.softmax(scores, dim=-1) * mask
    return torch.matmul(probs, v.float()).to(q.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with separate q/k/v column-parallel projections.

    Separate projections keep each weight's full (TP=1) layout independent of the TP size
    (a fused qkv weight would interleave heads per rank).
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group,
                 output_init_std: float):
        super().__init__()
        tp, tp_rank = group_size_rank(tp_group)
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = H // cfg.num_heads
        self.local_heads = self.num_heads // tp
        self.local_kv_heads = self.num_kv_heads // tp
        self.head_offset = tp_rank * self.local_heads
        self.backend = cfg.attention_backend
        init = normal_init(cfg.init_std)
        col = partial(ColumnParallelLinear, config=mp_config, init_method=init, bias=cfg.qkv_bias,
                      gather_output=False, tp_group=tp_group)
        self.q_proj = col(H, self.num_heads * self.head_dim)
        self.k_proj = col(H, self.num_kv_heads * self.head_dim)
        self.v_proj = col(H, self.num_kv_heads * self.head_dim)
        self.out_proj = RowParallelLinear(
            self.num_heads * self.head_dim, H, config=mp_config,
            init_method=normal_init(output_init_std), bias=cfg.attn_out_bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, kv_heads/tp, s, d] of normalised hidden states x [b, s, H], rotary
        applied, before any GQA expansion: what :meth:`forward` attends over."""
        k = self._heads(self.k_proj(x)[0], self.local_kv_heads)
        v = self._heads(self.v_proj(x)[0], self.local_kv_heads)
        if rotary is not None:
            k = apply_rotary(k, *rotary)
        return k, v

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                attention_mask: Optional[torch.Tensor] = None, kv_x: Optional[torch.Tensor] = None,
                kv_rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                causal_prefix: int = 0, context_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                return_kv: bool = False):
        """x [b, s_q, H] -> [b, s_q, H]. ``causal_prefix``: see :func:`attention_core`.

        ``kv_x`` [b, s_k, H] (s_k >= s_q, already normalised) gives keys/values computed from other
        hidden states, e.g. extra context followed by ``x``; with it, ``kv_rotary`` must hold its
        rotary tables. ``context_kv``: keys and values of positions in front of ``x``, as
        :meth:`keys_values` gives them (e.g. a context computed once for several passes); the
        keys are then those followed by x's own. Without a mask the queries are the last s_q
        positions of the keys. ``return_kv``: return (output, (keys, values)), the keys and values
        attended over (context_kv's included), before any GQA expansion.
        """
        b, s_q, _ = x.shape
        kv_in = x if kv_x is None else kv_x
        if context_kv is not None and kv_x is not None:
            raise ValueError("give kv_x or context_kv, not both")
        if kv_x is not None:
            if kv_x.dim() != 3 or kv_x.shape[0] != b or kv_x.shape[2] != x.shape[2]:
                raise ValueError(f"kv_x must be [b, s_k, H] = [{b}, s_k, {x.shape[2]}], "
                                 f"got {tuple(kv_x.shape)}")
            if kv_x.shape[1] < s_q:
                raise ValueError(f"kv_x has {kv_x.shape[1]} positions, fewer than the "
                                 f"{s_q} queries")
            if rotary is not None and kv_rotary is None:
                raise ValueError("kv_x with rotary positions needs kv_rotary (its cos/sin tables)")
        q = self._heads(self.q_proj(x)[0], self.local_heads)
        k, v = self.keys_values(kv_in, None if rotary is None else rotary if kv_x is None else kv_rotary)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
        if context_kv is not None:
            k, v = torch.cat([context_kv[0], k], dim=2), torch.cat([context_kv[1], v], dim=2)
        keys_values = (k, v)
        s_k = k.shape[2]
        if self.local_kv_heads != self.local_heads:
            # Expanding k/v keeps every SDPA kernel eligible (enable_gqa is not supported by the
            # mem-efficient kernel that masked attention uses on GPU).
            rep = self.local_heads // self.local_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = None
        if attention_mask is not None:
            mask = prepare_attention_mask(
                attention_mask, batch=b, num_heads=self.num_heads, local_heads=self.local_heads,
                head_offset=self.head_offset, s_q=s_q, s_k=s_k)
        own_keys = kv_x is None and context_kv is None  # the causal prefix is of x's own keys
        out = attention_core(q, k, v, mask, self.backend, causal_prefix if own_keys else 0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, s_q, self.local_heads * self.head_dim))[0]
        return (out, keys_values) if return_kv else out


# --------------------------------------------------------------------------------------------
# MLP


def resolve_ffn_hidden_size(cfg: ModelConfig) -> int:
    """cfg.ffn_hidden_size, or 4H (gelu_tanh) / 8H/3 rounded up to a multiple of 64 (swiglu)."""
    return ffn_hidden_size(cfg.hidden_size, cfg.activation, cfg.ffn_hidden_size)


class MLP(nn.Module):
    """gelu_tanh: Column H->F, GELU(tanh), Row F->H. swiglu: silu(gate) * up, Row down."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group,
                 output_init_std: float):
        super().__init__()
        if cfg.activation not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"model.activation must be gelu_tanh or swiglu, got {cfg.activation!r}")
        H, Fh = cfg.hidden_size, resolve_ffn_hidden_size(cfg)
        self.activation = cfg.activation
        col = partial(ColumnParallelLinear, config=mp_config, init_method=normal_init(cfg.init_std),
                      bias=cfg.mlp_bias, gather_output=False, tp_group=tp_group)
        row = partial(RowParallelLinear, config=mp_config, init_method=normal_init(output_init_std),
                      bias=cfg.mlp_bias, input_is_parallel=True, skip_bias_add=False,
                      tp_group=tp_group)
        if self.activation == "swiglu":
            # Two separate column linears (not one fused [gate; up]) so the full layout of each
            # does not depend on the TP size.
            self.gate_proj = col(H, Fh)
            self.up_proj = col(H, Fh)
            self.down_proj = row(Fh, H)
        else:
            self.fc1 = col(H, Fh)
            self.fc2 = row(Fh, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]
        return self.fc2(F.gelu(self.fc1(x)[0], approximate="tanh"))[0]


# --------------------------------------------------------------------------------------------
# Block


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group,
                 dtype: torch.dtype):
        super().__init__()
        # GPT-2: scale the init of the projections writing into the residual stream so its
        # variance does not grow with depth.
        out_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        self.input_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_bias, cfg.norm_eps, dtype)
        self.attention = Attention(cfg, mp_config, tp_group, out_std)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_bias, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, mp_config, tp_group, out_std)

    def forward(self, x: torch.Tensor, rotary=None, attention_mask: Optional[torch.Tensor] = None,
                kv_x: Optional[torch.Tensor] = None, kv_rotary=None, causal_prefix: int = 0,
                context_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None, return_kv: bool = False):
        """x [b, s_q, H]. ``kv_x`` [b, s_k, H] are *un-normalised* hidden states (same layer
        input as x, e.g. context followed by x) that keys/values are computed from;
        ``causal_prefix``: see :func:`attention_core`; ``context_kv``/``return_kv``: see
        :meth:`Attention.forward` (with ``return_kv``: (output, (keys, values)))."""
        kv = self.input_norm(kv_x) if kv_x is not None else None
        attended = self.attention(self.input_norm(x), rotary, attention_mask, kv, kv_rotary, causal_prefix,
                                  context_kv, return_kv)
        if return_kv:
            attended, keys_values = attended
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return (x, keys_values) if return_kv else x

    def keys_values(self, x: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's attention keys and values of its input x [b, s, H] (un-normalised), as
        :meth:`Attention.keys_values` gives them: all a later pass needs of x here."""
        return self.attention.keys_values(self.input_norm(x), rotary)
