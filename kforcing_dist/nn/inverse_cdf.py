"""Inverse-CDF sampling G(x, u): a token as a deterministic function of uniform noise.

Order the vocabulary by a fixed rule (``vocab``: token id; ``sorted``: descending probability,
ties by id), and take the first token whose cumulative probability reaches u. With
u ~ U(0, 1) the result is an exact sample of softmax(logits / tau).

``min_p`` > 0 truncates that distribution first (min-p sampling): tokens whose probability is
below ``min_p`` times the most likely token's get probability 0 and the rest are renormalised,
so G never returns them and their CDF intervals vanish. The distillation can target such a
truncated teacher (``distill.teacher_min_p``); every function here takes the same ``min_p``. Everything runs in float64:
a 50k-entry cumulative sum in low precision picks wrong tokens. Plain torch (the decoder and
the evaluation use it too); callers with vocab-parallel logits gather them first.
"""

from __future__ import annotations

import math

import torch

ORDERS = ("vocab", "sorted")


def check_order(order: str) -> None:
    """ValueError unless ``order`` is one of ORDERS."""
    if order not in ORDERS:
        raise ValueError(f"cdf order must be one of {ORDERS}, got {order!r}")


def check_min_p(min_p: float) -> None:
    """ValueError unless 0 <= min_p < 1 (0: no truncation)."""
    if not 0.0 <= float(min_p) < 1.0:
        raise ValueError(f"min_p must be in [0, 1) (0: no truncation), got {min_p!r}")


def below_min_p(scaled: torch.Tensor, row_max: torch.Tensor, min_p: float) -> torch.Tensor:
    """Where min-p truncation removes a token: p_v < min_p * max p, i.e. (in log space, on
    tempered logits ``scaled`` and their row maximum) scaled_v - row_max < log(min_p)."""
    return scaled - row_max < math.log(min_p)


def truncate_min_p(logits: torch.Tensor, tau, min_p: float) -> torch.Tensor:
    """``logits`` with -inf where min-p truncation at temperature tau (a float) removes the token,
    in their own dtype (for samplers that take logits); unchanged when ``min_p`` is 0."""
    if not min_p:
        return logits
    check_min_p(min_p)
    scaled = logits / tau
    return logits.masked_fill(below_min_p(scaled, scaled.max(-1, keepdim=True).values, min_p), float("-inf"))


def probabilities(logits: torch.Tensor, tau, min_p: float = 0.0) -> torch.Tensor:
    """softmax(logits / tau) in float64, min-p truncated when ``min_p`` > 0; tau is a float or
    broadcastable to logits[..., 0]."""
    tau = torch.as_tensor(tau, dtype=torch.float64, device=logits.device)
    if tau.ndim:
        tau = tau.unsqueeze(-1)
    # tempered first (tau may be per row), then truncated at temperature 1: the same cut; the
    # division runs in place on the float64 copy (one V-wide float64 buffer fewer per row)
    scaled = logits.to(torch.float64)
    if scaled is logits or torch.broadcast_shapes(tau.shape, scaled.shape) != scaled.shape:
        scaled = scaled / tau  # the caller's own tensor, or a tau that widens the result
    else:
        scaled.div_(tau)
    return torch.softmax(truncate_min_p(scaled, 1.0, min_p), dim=-1)


def _ordered(probs: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities in CDF order, and the permutation (None for vocab order)."""
    if order == "vocab":
        return probs, None
    # stable sort on -p: descending probability, ties broken by ascending token id
    perm = torch.sort(-probs, dim=-1, stable=True).indices
    return probs.gather(-1, perm), perm


def inverse_cdf_sample(logits: torch.Tensor, u: torch.Tensor, tau=1.0, order: str = "vocab",
                       min_p: float = 0.0) -> torch.Tensor:
    """G(x, u): logits [..., V], u [...] in [0, 1) -> token ids [...] (int64).

    u may also be [..., R], R draws per row of logits: the distribution and its CDF are then
    built once per row and serve all R (-> token ids [..., R])."""
    check_order(order)
    probs = probabilities(logits, tau, min_p)
    ordered, perm = _ordered(probs, order)
    cdf = ordered.cumsum(-1)
    draws = u.dim() == logits.dim()
    u = u.to(torch.float64) if draws else u.to(torch.float64).unsqueeze(-1)
    # first index whose cumulative probability exceeds u, so u in [low, high) maps to the token
    # and zero-probability tokens (flat CDF steps) are never chosen; the clamp guards u close
    # to 1 against round-off in the last cumsum entry
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp_(max=cdf.shape[-1] - 1)
    # never return a zero-probability token (e.g. a padded entry) because of round-off at the top:
    # only the clamp above can land on one (any other idx is the first entry whose cdf exceeds u,
    # so its probability is > 0), and there the answer is the last nonzero entry. On a CPU that
    # V-wide scan runs only when some row needs it; elsewhere always, since asking would cost a
    # host sync inside decoding loops (AR inverse-CDF sampling, lossless verification).
    if ordered.device.type != "cpu" or bool((ordered.gather(-1, idx) <= 0).any()):
        last_nonzero = (ordered > 0).to(torch.int64).cumsum(-1).argmax(-1, keepdim=True)
        idx = torch.minimum(idx, last_nonzero)
    tokens = idx if perm is None else perm.gather(-1, idx)
    return tokens if draws else tokens.squeeze(-1)


def _cdf_positions(logits: torch.Tensor, tokens: torch.Tensor, tau, order: str, min_p: float):
    """(ordered probabilities, their cumulative sum, each token's index in CDF order [..., 1])."""
    check_order(order)
    ordered, perm = _ordered(probabilities(logits, tau, min_p), order)
    if perm is None:
        pos = tokens.unsqueeze(-1)
    else:
        pos = torch.argsort(perm, dim=-1).gather(-1, tokens.unsqueeze(-1))  # rank of each token
    return ordered, ordered.cumsum(-1), pos


def cdf_interval(logits: torch.Tensor, tokens: torch.Tensor, tau=1.0, order: str = "vocab",
                 min_p: float = 0.0):
    """The interval [low, high) of u that G maps to ``tokens`` (float64 tensors shaped like tokens)."""
    ordered, cdf, pos = _cdf_positions(logits, tokens, tau, order, min_p)
    high = cdf.gather(-1, pos).squeeze(-1)
    low = high - ordered.gather(-1, pos).squeeze(-1)
    return low.clamp_(min=0.0), high


def invert_noise(logits: torch.Tensor, tokens: torch.Tensor, r: torch.Tensor, tau=1.0,
                 order: str = "vocab", min_p: float = 0.0) -> torch.Tensor:
    """u uniform inside the CDF interval of ``tokens``: low + r * (high - low), r ~ U(0, 1)."""
    low, high = cdf_interval(logits, tokens, tau, order, min_p)
    return low + r.to(torch.float64) * (high - low)


def chance_level(logits: torch.Tensor, tau=1.0, min_p: float = 0.0) -> torch.Tensor:
    """sum_v p_v^2: the probability that two independent samples agree (float64, shape [...])."""
    p = probabilities(logits, tau, min_p)
    return (p * p).sum(-1)


def invert_noise_exact(logits: torch.Tensor, tokens: torch.Tensor, r: torch.Tensor, tau=1.0,
                       order: str = "vocab", min_p: float = 0.0) -> torch.Tensor:
    """Like :func:`invert_noise`, but the returned u always satisfies G(logits, u) == tokens.

    ``invert_noise`` takes low = high - p, which can differ from the previous cumulative sum
    (the boundary G actually uses) by round-off, and low + r * (high - low) can round up to
    high; either puts u one ulp outside G's interval. Here the interval is G's own
    [cdf[pos - 1], cdf[pos]) and u is clamped inside it. The distribution is the same. A token of
    zero probability has an empty interval and no such u: u is then its (empty) interval's
    start, and G returns another token.
    """
    ordered, cdf, pos = _cdf_positions(logits, tokens, tau, order, min_p)
    high = cdf.gather(-1, pos).squeeze(-1)
    low = cdf.gather(-1, (pos - 1).clamp(min=0)).squeeze(-1)
    low = torch.where(pos.squeeze(-1) == 0, torch.zeros_like(low), low)
    u = low + r.to(torch.float64) * (high - low)
    top = torch.nextafter(high, torch.zeros_like(high))  # largest float64 below high
    return torch.maximum(torch.minimum(u, top), low)
