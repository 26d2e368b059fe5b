"""The frequency penalty of PFLM decoding, as the paper's released code applies it.

Rule (released ``sample`` loop): counts start at zero for each sequence (prompt tokens are not
counted); inside a block, slot j's argmax is taken on ``logits_j - penalty * counts`` *after*
slots 1..j-1 of the same block were counted, so a repeat inside a block is penalised too
(:func:`block_argmax`). With one token per step (AR, k=1) that is the usual frequency penalty.

A setting is a number (the same penalty for every k) or a map {k: penalty}; a k the map does
not name, and the setting None, take the authors' values (:func:`penalty_for_k`). The AR
teacher samples its own distribution unless the setting is one number (:func:`penalty_for_mode`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch

from .errors import DecodeError

# The released decoding scripts: 0.3 / 0.5 / 0.5 for k = 2 / 3 / 4 on OpenWebText; 0.5 is the
# sampler's own default, used here for every other k.
AUTHORS_DEFAULT = 0.5
AUTHORS_PER_K = {2: 0.3, 3: 0.5, 4: 0.5}

PenaltySetting = Union[int, float, Mapping, None]


def penalty_for_k(setting: PenaltySetting, k: int) -> float:
    """The penalty a k-token decode uses under ``setting`` (number, {k: value} map or None)."""
    if setting is None:
        return AUTHORS_PER_K.get(k, AUTHORS_DEFAULT)
    if isinstance(setting, Mapping):
        for key in (k, str(k), f"k{k}"):
            if key in setting:
                return _finite(setting[key], f"frequency_penalty[{key!r}]")
        return AUTHORS_PER_K.get(k, AUTHORS_DEFAULT)
    return _finite(setting, "frequency_penalty")


def penalty_for_mode(setting: PenaltySetting, mode: str, k: int) -> float:
    """The penalty of a ``mode`` decode: a PFLM (mode "pflm"; "lossless" drafts) takes
    ``penalty_for_k(setting, k)``; the AR teacher ("ar") samples its own distribution, so only a
    single number (meant for every decode) penalises it, a per-k map or None does not."""
    if mode == "ar":
        if setting is None or isinstance(setting, Mapping):
            return 0.0
        return _finite(setting, "frequency_penalty")
    return penalty_for_k(setting, k)


def block_argmax(logits: torch.Tensor, counts: Optional[torch.Tensor],
                 penalty: float) -> torch.Tensor:
    """Tokens [b, m] of a block of slot logits [b, m, V] under the authors' rule.

    Slot j takes argmax(logits[:, j] - penalty * counts), then its token is counted before slot
    j+1 (``counts`` [b, V] float, the tokens each sequence emitted so far, is updated in place).
    One batch-wide step per slot. ``counts`` None or ``penalty`` 0: plain argmax, counts untouched.
    """
    if counts is None or not penalty:
        return logits.argmax(-1)
    b, m, _ = logits.shape
    out = torch.empty(b, m, dtype=torch.long, device=logits.device)
    one = torch.ones(b, 1, dtype=counts.dtype, device=counts.device)
    # penalty * counts once per block; a counted token then updates its own entry with the
    # same product, so every slot sees exactly the values a full recomputation would give
    charge = penalty * counts
    for j in range(m):
        token = (logits[:, j] - charge).argmax(-1, keepdim=True)  # [b, 1]
        out[:, j:j + 1] = token
        counts.scatter_add_(1, token, one)
        if j + 1 < m:
            charge.scatter_(1, token, penalty * counts.gather(1, token))
    return out


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DecodeError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
