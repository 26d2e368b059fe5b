"""The inverse CDF G(x, u) and its inverse on vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary.

``vocab`` order (the default) never gathers a vocabulary-sized tensor:
- softmax: a MAX all-reduce of the per-row maxima and a SUM all-reduce of the exp sums;
- cumulative probabilities: each rank's local cumulative sum, plus an exclusive scan of the
  shard totals (one all-gather of one float64 per row and rank);
- the sampled token: the one rank whose CDF range holds u answers; a MIN all-reduce spreads it.
Per row that is a few scalars of communication, whatever the vocabulary size.

``sorted`` order needs the global descending order of the probabilities, so the rows are
gathered to the full vocabulary, ``chunk_rows`` rows at a time: peak extra memory is
``chunk_rows * V * (4 bytes of gathered logits + about 32 bytes of float64 work)`` instead of
``rows * V * 36``. Every rank computes the same result from the same gathered rows.

``min_p`` (min-p truncation, as in :mod:`.inverse_cdf`) needs only the global row maximum the
softmax already all-reduces, so it costs no extra communication.

Padded vocabulary entries (ids >= ``vocab_size``) get probability exactly 0, as if the logits had
been cut to the real vocabulary, so they can never be a target. At TP=1 every function falls back
to :mod:`.inverse_cdf` on the cut logits, so one-process results are bit-identical to the
plain functions. Across TP sizes the float64 sums are added in a different order, so a token can
differ only when u lies within round-off (~1e-16) of a CDF boundary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.loss import resolve_tp_group
from ..nn.inverse_cdf import below_min_p, check_min_p, check_order, inverse_cdf_sample, invert_noise_exact

DEFAULT_CHUNK_ROWS = 256


def _tau_column(tau, like: torch.Tensor) -> torch.Tensor:
    tau = torch.as_tensor(tau, dtype=torch.float64, device=like.device)
    return tau.unsqueeze(-1) if tau.ndim else tau


def _local_probabilities(logits_local: torch.Tensor, tau, vocab_start: int, vocab_size: int,
                         group, min_p: float = 0.0) -> torch.Tensor:
    """softmax(logits / tau) over the whole vocabulary, this rank's slice, float64, padded -> 0,
    min-p truncated when ``min_p`` > 0."""
    x = logits_local.detach().to(torch.float64) / _tau_column(tau, logits_local)
    ids = vocab_start + torch.arange(x.shape[-1], device=x.device)
    x = x.masked_fill(ids >= vocab_size, float("-inf"))
    row_max = x.max(dim=-1, keepdim=True).values
    # a shard made only of padded entries has max -inf; it must not poison the global max
    row_max = torch.where(torch.isinf(row_max), torch.full_like(row_max, -torch.finfo(x.dtype).max), row_max)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    if min_p:
        x = x.masked_fill(below_min_p(x, row_max, min_p), float("-inf"))
    e = torch.exp(x - row_max)
    total = e.sum(dim=-1, keepdim=True)
    dist.all_reduce(total, group=group)
    return e / total


def _global_cdf(probs_local: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(cumulative probability at each local entry, the CDF value just before this shard)."""
    local_cdf = probs_local.cumsum(-1)
    totals = local_cdf[..., -1:].contiguous()
    parts = [torch.empty_like(totals) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, totals, group=group)
    rank = dist.get_rank(group)
    before = torch.zeros_like(totals)
    for part in parts[:rank]:  # exclusive scan, in rank (= vocabulary) order
        before = before + part
    return before + local_cdf, before


def _gathered_rows(logits_local: torch.Tensor, group, chunk_rows: int):
    """Yield (row slice, full-vocab logits of those rows), ``chunk_rows`` rows at a time."""
    flat = logits_local.detach().reshape(-1, logits_local.shape[-1])
    tp = dist.get_world_size(group)
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start:start + chunk_rows].contiguous()
        parts = [torch.empty_like(chunk) for _ in range(tp)]
        dist.all_gather(parts, chunk, group=group)
        yield slice(start, start + chunk.shape[0]), torch.cat(parts, dim=-1)


def _flat_tau(tau, shape: torch.Size, device) -> torch.Tensor:
    """tau (a number, or broadcastable to ``shape``) as a flat float64 vector over the rows."""
    return torch.as_tensor(tau, dtype=torch.float64, device=device).expand(shape).reshape(-1)


def vp_inverse_cdf_sample(logits_local: torch.Tensor, u: torch.Tensor, tau, order: str,
                          vocab_start: int, vocab_size: int, tp_group,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS, min_p: float = 0.0) -> torch.Tensor:
    """G(x, u) on vocab-parallel logits [..., V/tp] -> token ids [...] (int64, the same on every rank).

    u [...] in [0, 1), or [..., R]: R draws per row, one CDF for all of them (-> ids [..., R]);
    tau a number or broadcastable to the rows; ``vocab_start`` is this rank's first id; ids >=
    ``vocab_size`` are padding; ``min_p`` > 0 truncates the distribution first.
    """
    check_order(order)
    check_min_p(min_p)
    group = resolve_tp_group(tp_group)
    if dist.get_world_size(group) == 1:
        return inverse_cdf_sample(logits_local[..., :vocab_size], u, tau, order, min_p)
    draws = u.dim() == logits_local.dim()
    rows_shape = u.shape[:-1] if draws else u.shape
    if order == "sorted":
        rows_u = u.reshape(rows_shape.numel(), -1)
        rows_tau = _flat_tau(tau, rows_shape, u.device)
        out = torch.empty(rows_u.shape, dtype=torch.long, device=logits_local.device)
        for rows, full in _gathered_rows(logits_local, group, chunk_rows):
            out[rows] = inverse_cdf_sample(full[..., :vocab_size], rows_u[rows], rows_tau[rows], order,
                                           min_p)
        return out.view(u.shape)
    probs = _local_probabilities(logits_local, tau, vocab_start, vocab_size, group, min_p)
    cdf, _ = _global_cdf(probs, group)
    uu = u.to(torch.float64) if draws else u.to(torch.float64).unsqueeze(-1)
    local_v = cdf.shape[-1]
    # first index whose cumulative probability exceeds u (as inverse_cdf_sample), if it is here
    idx = torch.searchsorted(cdf.contiguous(), uu.contiguous(), right=True)
    # every rank whose CDF range ends above u claims a token; the true owner is the first such
    # rank, which has the lowest ids, so the MIN below picks it
    owner = idx < local_v
    none = torch.iinfo(torch.long).max
    token = torch.where(owner, vocab_start + idx.clamp(max=local_v - 1), torch.full_like(idx, none))
    # the highest id of nonzero probability: round-off at the top (u ~ 1 beyond the last cumsum)
    # must still give a real token, never a padded or zero-probability one
    nonzero = probs > 0
    last_here = torch.where(nonzero.any(-1, keepdim=True),
                            vocab_start + nonzero.long().cumsum(-1).argmax(-1, keepdim=True),
                            torch.full_like(idx, -1))
    dist.all_reduce(token, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(last_here, op=dist.ReduceOp.MAX, group=group)
    token = torch.minimum(token, last_here)
    return token if draws else token.squeeze(-1)


def vp_invert_noise_exact(logits_local: torch.Tensor, tokens: torch.Tensor, r: torch.Tensor, tau,
                          order: str, vocab_start: int, vocab_size: int, tp_group,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS, min_p: float = 0.0) -> torch.Tensor:
    """:func:`.inverse_cdf.invert_noise_exact` on vocab-parallel logits: u (float64, like ``tokens``)
    inside G's interval of each token, so ``vp_inverse_cdf_sample(logits, u) == tokens``."""
    check_order(order)
    check_min_p(min_p)
    group = resolve_tp_group(tp_group)
    if dist.get_world_size(group) == 1:
        return invert_noise_exact(logits_local[..., :vocab_size], tokens, r, tau, order, min_p)
    if order == "sorted":
        rows_t, rows_r = tokens.reshape(-1), r.reshape(-1)
        rows_tau = _flat_tau(tau, tokens.shape, tokens.device)
        out = torch.empty(rows_t.shape, dtype=torch.float64, device=logits_local.device)
        for rows, full in _gathered_rows(logits_local, group, chunk_rows):
            out[rows] = invert_noise_exact(full[..., :vocab_size], rows_t[rows], rows_r[rows],
                                           rows_tau[rows], order, min_p)
        return out.view(tokens.shape)
    probs = _local_probabilities(logits_local, tau, vocab_start, vocab_size, group, min_p)
    cdf, before = _global_cdf(probs, group)
    local = tokens.long() - vocab_start
    here = (local >= 0) & (local < cdf.shape[-1])
    pos = local.clamp(0, cdf.shape[-1] - 1).unsqueeze(-1)
    high = cdf.gather(-1, pos).squeeze(-1)
    # G's own lower boundary: the previous cumulative sum (the shard's start for its first entry)
    prev = cdf.gather(-1, (pos - 1).clamp(min=0)).squeeze(-1)
    low = torch.where(pos.squeeze(-1) == 0, before.squeeze(-1).expand_as(prev), prev)
    bounds = torch.stack([torch.where(here, low, torch.zeros_like(low)),
                          torch.where(here, high, torch.zeros_like(high))])
    dist.all_reduce(bounds, group=group)  # exactly one rank holds each token: the sum is exact
    low, high = bounds[0], bounds[1]
    u = low + r.to(torch.float64) * (high - low)
    top = torch.nextafter(high, torch.zeros_like(high))
    return torch.maximum(torch.minimum(u, top), low)
