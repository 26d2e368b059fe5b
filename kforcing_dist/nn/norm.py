"""The norm layer (LayerNorm or RMSNorm) of the tensor-parallel model and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):
    """LayerNorm (optionally without bias) or RMSNorm, computed in float32, replicated over TP.

    Computing in float32 keeps bf16 training stable; the result is cast back to the input dtype.
    """

    def __init__(self, hidden_size: int, kind: str, bias: bool, eps: float, dtype: torch.dtype):
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        # RMSNorm has no bias by definition; cfg.norm_bias only applies to LayerNorm.
        if kind == "layernorm" and bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        w = self.weight.float()
        if self.kind == "layernorm":
            b = self.bias.float() if self.bias is not None else None
            y = F.layer_norm(xf, (self.hidden_size,), w, b, self.eps)
        else:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w
        return y.to(x.dtype)
