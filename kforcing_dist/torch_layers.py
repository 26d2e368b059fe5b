"""Plain-torch layers shared by the tensor-parallel model and the engine-free decoder.

Nothing here imports megatron-core or DeepSpeed, so ``kforcing_dist.decode`` can use the very
same code as training (one definition of the maths, not two that must agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The released checkpoints set their mask token's logit to this before softmax/argmax; every
# model carrying ``masked_token_ids`` (training and decoder) does the same.
MASKED_LOGIT_VALUE = -1000.0


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
