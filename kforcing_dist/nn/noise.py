"""The noise encoder: maps (u, tau) to the input vector of a noise slot.

Sinusoidal features of u and of tau at H/2 frequencies (cos then sin of 2*pi*x*f, computed in
float64 so that nearby u stay distinguishable), concatenated (2H), projected to H, then one
pre-norm residual MLP: x + MLP(LayerNorm(x)). Two conventions (``features``), recorded with
every model because weights trained under one compute garbage under the other:

- ``released``: the paper's released code. f_j = 10000^(-j/(H/2)), j = 0..H/2-1 (falling from 1
  to about 1e-4: smooth in u and tau); the noise MLP uses the exact (erf) GELU.
- ``rising``: this project's first design. f_j geometric from 1 up to ``max_freq`` (to resolve
  sharp CDF boundaries in u); the noise MLP uses the tanh GELU. ``max_freq`` applies to it only.

Parameter names follow the paper's released checkpoints (combined_proj, norm, mlp.0, mlp.2).
Plain torch: replicated on every tensor-parallel rank, and used as is by the decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

NOISE_FEATURES = ("rising", "released")
# What a model recorded without a convention was trained with (before ``features`` existed).
LEGACY_NOISE_FEATURES = "rising"
DEFAULT_NOISE_MAX_FREQ = 256.0
# The released code's frequency base: f_j = RELEASED_FREQ_BASE ** (-j / (H/2)).
RELEASED_FREQ_BASE = 10000.0


def check_noise_features(features: str, max_freq: Optional[float]) -> None:
    """ValueError unless ``features`` is a known convention (and a rising one has max_freq >= 1)."""
    if features not in NOISE_FEATURES:
        raise ValueError(f"noise features must be one of {NOISE_FEATURES}, got {features!r}")
    if features == "rising" and not (max_freq is not None and max_freq >= 1):
        raise ValueError(f"rising noise features need max_freq >= 1 (the lowest frequency is 1), "
                         f"got {max_freq!r}")


def noise_section(features: str, max_freq: Optional[float]) -> dict:
    """The ``noise`` entry of a decoder config / checkpoint metadata: {"features", "max_freq"}
    (max_freq is None for ``released``, which has no such parameter)."""
    check_noise_features(features, max_freq)
    return {"features": features, "max_freq": float(max_freq) if features == "rising" else None}


def feature_frequencies(num_freqs: int, features: str, max_freq: Optional[float], device=None) -> torch.Tensor:
    """The float64 frequencies f_0..f_{num_freqs-1} of a convention."""
    if features == "released":
        j = torch.arange(num_freqs, dtype=torch.float64, device=device)
        return RELEASED_FREQ_BASE ** (-j / num_freqs)
    return torch.logspace(0.0, math.log10(max_freq), num_freqs, dtype=torch.float64, device=device)


def sinusoidal_features(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[...] -> [..., 2*len(freqs)] float64: cos then sin of 2*pi*x*f_j."""
    angles = x.to(torch.float64).unsqueeze(-1) * freqs * (2 * math.pi)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class NoiseEncoder(nn.Module):
    """``features``: ``rising`` (default) or ``released`` (see the module docstring);
    ``max_freq``: the highest frequency of ``rising`` features (ignored by ``released``)."""

    def __init__(self, hidden_size: int, max_freq: Optional[float] = DEFAULT_NOISE_MAX_FREQ,
                 init_std: float = 0.02, dtype: torch.dtype = torch.float32, features: str = "rising"):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"the noise encoder needs an even hidden size, got {hidden_size}")
        check_noise_features(features, max_freq)
        self.hidden_size, self.features = hidden_size, features
        self.max_freq = float(max_freq) if features == "rising" else None
        self.combined_proj = nn.Linear(2 * hidden_size, hidden_size, dtype=dtype)
        self.norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size, dtype=dtype),
                                 nn.GELU(approximate="none" if features == "released" else "tanh"),
                                 nn.Linear(4 * hidden_size, hidden_size, dtype=dtype))
        for lin in (self.combined_proj, self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def features_of(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """[..] u and broadcastable tau -> [.., 2H] float64 features (u's, then tau's)."""
        tau = torch.as_tensor(tau, dtype=torch.float64, device=u.device).expand(u.shape)
        # recomputed each call (H/2 values): a buffer would follow the module's dtype casts
        freqs = feature_frequencies(self.hidden_size // 2, self.features, self.max_freq, u.device)
        return torch.cat([sinusoidal_features(u, freqs), sinusoidal_features(tau, freqs)], dim=-1)

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u [...] in [0, 1), tau broadcastable to u -> slot input vectors [..., H]."""
        x = self.combined_proj(self.features_of(u, tau).to(self.combined_proj.weight.dtype))
        return x + self.mlp(self.norm(x))
