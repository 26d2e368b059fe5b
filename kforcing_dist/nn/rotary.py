"""Rotary position embedding (rotate-half / GPT-NeoX / Llama layout) from explicit position ids.

The tables are computed from the ids of each call (not a precomputed table) so that arbitrary,
repeated or shifted positions (the student's noise slots) cost nothing extra and need no max
length; everything rotates in float32.
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_tables(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [b, s] (int) -> (cos, sin), each float32 [b, 1, s, head_dim]."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32,
                            device=position_ids.device) / head_dim
    inv_freq = 1.0 / (base ** exponent)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


class RotaryEmbedding(nn.Module):
    """:func:`rotary_tables` of a fixed head dimension and base, as a (parameter-free) module."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        if base <= 0:
            raise ValueError(f"model.rope_base must be positive, got {base}")
        self.head_dim = head_dim
        self.base = float(base)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] (int) -> (cos, sin), each float32 [b, 1, s, head_dim]."""
        # Built on the ids' device each call rather than kept as a buffer: a buffer would be cast
        # by model.to(bf16), and the cost is negligible (once per forward, shared by all layers).
        return rotary_tables(position_ids, self.head_dim, self.base)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d] (or any layout cos/sin broadcast to); cos/sin float32. Rotates in
    float32, returns x.dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
