"""The window layout: every window of a training sequence in one forward pass.

A sequence of N context tokens gets W windows, window w starting after context position
t_w (its items predict/describe positions t_w+1 .. t_w+m). The packed sequence is the N
context items followed by the W*m window items, window-major:

    [ctx_0 .. ctx_{N-1} | (t_0, 1) .. (t_0, m) | (t_1, 1) .. (t_1, m) | ...]

Item (t, j) has position id t+j and may attend to context positions <= t and to items
(t, 1..j) of its own window; context rows are plain causal. This one "staircase" rule serves
both the student's noise slots (slot i sees slots 1..i) and the self-forcing teacher's second
pass (real tokens y_1..y_k, then noise slots, in the same window). Plain torch.
"""

from __future__ import annotations

from typing import Optional

import torch


def all_window_starts(batch: int, context_len: int, device=None) -> torch.Tensor:
    """Every start t = 0..N-1 for every sequence: LongTensor [batch, N]."""
    if batch <= 0 or context_len <= 0:
        raise ValueError(f"batch ({batch}) and context length ({context_len}) must be positive")
    return torch.arange(context_len, device=device).unsqueeze(0).expand(batch, context_len)


def check_window_starts(window_starts: torch.Tensor, batch: int, context_len: int,
                        max_start: Optional[int] = None) -> None:
    """Raise ValueError unless window_starts is an integer [batch, W] tensor in [0, max_start]."""
    max_start = context_len - 1 if max_start is None else max_start
    if not isinstance(window_starts, torch.Tensor) or window_starts.dtype.is_floating_point \
            or window_starts.dtype == torch.bool:
        got = window_starts.dtype if isinstance(window_starts, torch.Tensor) else type(window_starts).__name__
        raise ValueError(f"window_starts must be an integer tensor [b, W], got {got}")
    if window_starts.dim() != 2 or window_starts.shape[0] != batch or window_starts.shape[1] == 0:
        raise ValueError(f"window_starts must have shape [b, W] = [{batch}, W >= 1], "
                         f"got {tuple(window_starts.shape)}")
    lo, hi = int(window_starts.min()), int(window_starts.max())
    if lo < 0 or hi > max_start:
        raise ValueError(f"window starts must lie in [0, {max_start}] (context of {context_len} "
                         f"tokens), got values in [{lo}, {hi}]")


def window_layout(context_len: int, window_starts: torch.Tensor, items_per_window: int):
    """Position ids and attention mask of N context items followed by W windows of m items.

    context_len N; window_starts LongTensor [b, W] with values in [0, N-1]; items_per_window m.
    Returns (position_ids LongTensor [b, N + W*m], mask bool [b, 1, L, L], True = may attend).
    """
    if context_len <= 0:
        raise ValueError(f"context length must be positive, got {context_len}")
    if items_per_window <= 0:
        raise ValueError(f"items per window must be positive, got {items_per_window}")
    if window_starts.dim() != 2:
        raise ValueError(f"window_starts must have shape [b, W], got {tuple(window_starts.shape)}")
    b, W = window_starts.shape
    check_window_starts(window_starts, b, context_len)
    N, m, dev = context_len, items_per_window, window_starts.device
    starts = window_starts.long()
    j = torch.arange(1, m + 1, device=dev)

    ctx_pos = torch.arange(N, device=dev).expand(b, N)
    item_pos = (starts[:, :, None] + j).reshape(b, W * m)
    position_ids = torch.cat([ctx_pos, item_pos], dim=1)

    # Per row/column: the last context position it may see (rows) or its context index
    # (columns), its window id (-1 = context) and its index j inside the window (0 = context).
    ctx_limit = torch.cat([ctx_pos, starts.repeat_interleave(m, dim=1)], dim=1)       # [b, L]
    window_id = torch.cat([torch.full((N,), -1, device=dev),
                           torch.arange(W, device=dev).repeat_interleave(m)])        # [L]
    slot = torch.cat([torch.zeros(N, dtype=torch.long, device=dev), j.repeat(W)])    # [L]
    is_ctx_col = window_id < 0
    col_ctx_index = torch.where(is_ctx_col, torch.arange(N + W * m, device=dev), -1)

    sees_context = is_ctx_col[None, None, :] & (col_ctx_index[None, None, :] <= ctx_limit[:, :, None])
    same_window = (window_id[:, None] == window_id[None, :]) & ~is_ctx_col[:, None]
    sees_items = same_window & (slot[None, :] <= slot[:, None])                     # [L, L]
    mask = (sees_context | sees_items[None]).unsqueeze(1)
    return position_ids, mask


def sample_window_starts(batch: int, context_len: int, count: int,
                         generator: Optional[torch.Generator] = None,
                         max_start: Optional[int] = None) -> torch.Tensor:
    """A random subset of ``count`` distinct starts per sequence from 0..max_start, sorted.

    max_start defaults to N-1; count 0 means all of them (in order). Returns LongTensor
    [batch, count] on the generator's device (CPU without one). Identical generators on the
    ranks of a TP group give identical starts, which the TP model needs.
    """
    max_start = context_len - 1 if max_start is None else max_start
    if batch <= 0 or context_len <= 0:
        raise ValueError(f"batch ({batch}) and context length ({context_len}) must be positive")
    if not 0 <= max_start <= context_len - 1:
        raise ValueError(f"max_start must lie in [0, {context_len - 1}], got {max_start}")
    candidates = max_start + 1
    if count < 0 or count > candidates:
        raise ValueError(f"windows per sequence must be in [0, {candidates}] (0 = all), got {count}")
    device = generator.device if generator is not None else torch.device("cpu")
    if count == 0 or count == candidates:
        return torch.arange(candidates, device=device).unsqueeze(0).expand(batch, candidates).clone()
    keys = torch.rand(batch, candidates, generator=generator, device=device)
    return keys.argsort(dim=-1)[:, :count].sort(dim=-1).values
