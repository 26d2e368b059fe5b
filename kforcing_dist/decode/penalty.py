"""The frequency penalty of PFLM decoding, as the paper's released code applies it.

Rule (released ``sample`` loop): counts start at zero for each sequence (prompt tokens are not
counted); inside a block, slot j's argmax is taken on ``logits_j - penalty * counts`` *after*
slots 1..j-1 of the same block were counted, so a repeat inside a block is penalised too.

A setting is a number (the same penalty for every k) or a map {k: penalty}; a k the map does
not name, and the setting None, take the authors' values.
"""

from __future__ import annotations

import math
from typing import Mapping, Union

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


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
