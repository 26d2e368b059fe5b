"""The noise encoder: maps (u, tau) to the input vector of a noise slot.

Sinusoidal features of u and of tau at H/2 geometric frequencies from 1 to ``max_freq``
(cos and sin of 2*pi*x*f, computed in float64 so that nearby u stay distinguishable),
concatenated (2H), projected to H, then one pre-norm residual MLP: x + MLP(LayerNorm(x)).
Parameter names follow the paper's released checkpoints (combined_proj, norm, mlp.0, mlp.2).
Plain torch: replicated on every tensor-parallel rank, and used as is by the decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_features(x: torch.Tensor, num_freqs: int, max_freq: float) -> torch.Tensor:
    """[...] -> [..., 2*num_freqs] float64: cos then sin of 2*pi*x*f_j, f_j geometric in [1, max_freq]."""
    freqs = torch.logspace(0.0, math.log10(max_freq), num_freqs, dtype=torch.float64, device=x.device)
    angles = 2 * math.pi * x.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class NoiseEncoder(nn.Module):
    def __init__(self, hidden_size: int, max_freq: float = 256.0, init_std: float = 0.02,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"the noise encoder needs an even hidden size, got {hidden_size}")
        self.hidden_size, self.max_freq = hidden_size, float(max_freq)
        self.combined_proj = nn.Linear(2 * hidden_size, hidden_size, dtype=dtype)
        self.norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size, dtype=dtype),
                                 nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden_size, hidden_size, dtype=dtype))
        for lin in (self.combined_proj, self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def features(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """[..] u and broadcastable tau -> [.., 2H] float64 features."""
        half = self.hidden_size // 2
        tau = torch.as_tensor(tau, dtype=torch.float64, device=u.device).expand(u.shape)
        return torch.cat([sinusoidal_features(u, half, self.max_freq),
                          sinusoidal_features(tau, half, self.max_freq)], dim=-1)

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u [...] in [0, 1), tau broadcastable to u -> slot input vectors [..., H]."""
        x = self.combined_proj(self.features(u, tau).to(self.combined_proj.weight.dtype))
        return x + self.mlp(self.norm(x))
