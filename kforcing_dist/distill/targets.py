"""Training targets of the K-Forcing student, all computed with the student's own noise u.

- ``stage1_targets``: the AR teacher, one pass: target(t, 1) = G(p(. | x_<=t), u).
- ``self_forcing_targets``: the frozen stage-k student, two passes per window, gives the
  2k tokens the stage-2k student must produce in one pass.
- ``teacher_chain_targets``: the AR teacher chained m times per window, the exact joint sample
  of m tokens (``distill.higher_stage_targets: teacher_chain``).
- ``noise_inversion_batch``: real data continuations as targets, with u drawn inside the
  teacher's CDF interval of each data token.

Logits are vocab-parallel over ``tp_group``; the float64 inverse CDF runs on the shards
(:mod:`.vocab_parallel_cdf`: no vocabulary-sized gather in ``vocab`` order) and gives padded
entries probability 0, so a padded entry can never be a target. Every frozen model runs under ``torch.no_grad``. Noise
drawn here (``generator``) must be drawn identically on the ranks of a TP group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..model.loss import resolve_tp_group
from ..model.student import PFLM, per_sequence_tau
from ..model.transformer import TransformerLM
from ..nn.inverse_cdf import check_order
from ..nn.window import check_window_starts
from .vocab_parallel_cdf import vp_inverse_cdf_sample, vp_invert_noise_exact


def gather_full_vocab(logits_local: torch.Tensor, tp_group) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> full logits [..., V] on every rank (identity at TP=1).

    Not differentiable (targets only).
    """
    group = resolve_tp_group(tp_group)
    tp = dist.get_world_size(group)
    if tp == 1:
        return logits_local
    shard = logits_local.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard, group=group)
    return torch.cat(parts, dim=-1)


def vocab_parallel_argmax(logits_local: torch.Tensor, tp_group) -> torch.Tensor:
    """Global argmax over vocab-parallel logits [..., V/tp] -> LongTensor [...].

    Equals ``torch.argmax`` of the gathered logits, ties included (the lowest id wins), but
    exchanges only each shard's (max, index) pair.
    """
    group = resolve_tp_group(tp_group)
    tp = dist.get_world_size(group)
    local = logits_local.detach()
    values, index = local.max(dim=-1)
    if tp == 1:
        return index
    index = index + dist.get_rank(group) * local.shape[-1]
    vals = [torch.empty_like(values) for _ in range(tp)]
    idxs = [torch.empty_like(index) for _ in range(tp)]
    dist.all_gather(vals, values.contiguous(), group=group)
    dist.all_gather(idxs, index.contiguous(), group=group)
    # argmax over ranks returns the first maximal rank, i.e. the lowest global id on ties
    best = torch.stack(vals, dim=-1).argmax(dim=-1, keepdim=True)
    return torch.stack(idxs, dim=-1).gather(-1, best).squeeze(-1)


def _check_u(u: torch.Tensor, batch: int, windows: int, name: str = "u") -> None:
    if not isinstance(u, torch.Tensor) or not u.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor [b, W, m]")
    if u.dim() != 3 or u.shape[:2] != (batch, windows):
        raise ValueError(f"{name} must have shape [b, W, m] = [{batch}, {windows}, m], "
                         f"got {tuple(u.shape)}")


@torch.no_grad()
def stage1_targets(teacher: TransformerLM, input_ids: torch.Tensor, window_starts: torch.Tensor,
                   u: torch.Tensor, tau, order: str, tp_group, min_p: float = 0.0) -> torch.Tensor:
    """Stage-1 targets from the AR teacher: LongTensor [b, W, R].

    input_ids [b, N]; window_starts [b, W] in [0, N-1]; u [b, W, R]: R >= 1 independent draws at
    each start (R one-slot windows sharing it; the teacher's distribution there is computed once);
    tau number or [b]. target(t, r) = G(teacher logits at position t, u_r) with temperature tau
    inside G, of the teacher's min-p truncated distribution when ``min_p`` > 0.
    """
    check_order(order)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [b, N], got {tuple(input_ids.shape)}")
    b, N = input_ids.shape
    check_window_starts(window_starts, b, N)
    W = window_starts.shape[1]
    _check_u(u, b, W)
    # the head only where a window starts (rowwise maths: the logits of the full pass there)
    logits = teacher(input_ids, head_rows=window_starts)
    return _sample_at_starts(logits, u, per_sequence_tau(tau, b, logits.device), order, tp_group,
                             teacher.vocab_size, min_p)


@torch.no_grad()
def stage1_targets_from_logits(logits: torch.Tensor, window_starts: torch.Tensor, u: torch.Tensor,
                               tau, order: str, tp_group, vocab_size: int,
                               min_p: float = 0.0) -> torch.Tensor:
    """:func:`stage1_targets` from the teacher's vocab-parallel logits [b, N, V/tp] over the
    context, computed elsewhere (on the last pipeline stage). LongTensor [b, W, R]."""
    check_order(order)
    if logits.dim() != 3:
        raise ValueError(f"teacher logits must have shape [b, N, V/tp], got {tuple(logits.shape)}")
    b, N = logits.shape[:2]
    check_window_starts(window_starts, b, N)
    W = window_starts.shape[1]
    _check_u(u, b, W)
    idx = window_starts.to(logits.device).long()[:, :, None].expand(b, W, logits.shape[-1])
    return _sample_at_starts(logits.gather(1, idx), u, per_sequence_tau(tau, b, logits.device), order,
                             tp_group, vocab_size, min_p)


def _sample_at_starts(at_starts: torch.Tensor, u: torch.Tensor, tau: torch.Tensor, order: str, tp_group,
                      vocab_size: int, min_p: float) -> torch.Tensor:
    """G over the teacher's vocab-parallel logits [b, W, V/tp] at the window starts; tau [b]."""
    return vp_inverse_cdf_sample(at_starts, u, tau[:, None], order,
                                 dist.get_rank(resolve_tp_group(tp_group)) * at_starts.shape[-1], vocab_size,
                                 tp_group, min_p=min_p)


@torch.no_grad()
def self_forcing_targets(prev: PFLM, input_ids: torch.Tensor, window_starts: torch.Tensor,
                         u: torch.Tensor, tau, tp_group) -> torch.Tensor:
    """Stage-2k targets from the frozen stage-k student: LongTensor [b, W, 2k].

    Pass 1: noise u[..., :k] gives y_1..y_k (argmax). Pass 2: y_1..y_k as real tokens at
    t+1..t+k, then noise u[..., k:] at t+k+1..t+2k, gives y_{k+1}..y_{2k}.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [b, N], got {tuple(input_ids.shape)}")
    b, N = input_ids.shape
    check_window_starts(window_starts, b, N)
    _check_u(u, b, window_starts.shape[1])
    two_k = u.shape[2]
    if two_k == 0 or two_k % 2:
        raise ValueError(f"self-forcing needs an even number (2k) of noise values per window, "
                         f"got {two_k}")
    k = two_k // 2
    if k > prev.max_k:
        raise ValueError(f"the previous stage has max_k={prev.max_k}, cannot make targets "
                         f"for k={two_k} (needs {k} slots per pass)")
    # both passes see the same context: its keys and values once, then only each pass's items
    context = prev.context_keys_values(input_ids)
    first = vocab_parallel_argmax(prev.window_item_logits(context, input_ids, window_starts, u[..., :k], tau),
                                  tp_group)
    second = vocab_parallel_argmax(
        prev.window_item_logits(context, input_ids, window_starts, u[..., k:], tau, window_tokens=first),
        tp_group)
    return torch.cat([first, second], dim=-1)


@torch.no_grad()
def self_forcing_targets_pipelined(prev_forward, draws: list[tuple], groups) -> Optional[list[torch.Tensor]]:
    """:func:`self_forcing_targets` with the frozen stage-k student split into pipeline stages.

    ``prev_forward``: a :class:`~kforcing_dist.model.pipeline.PipelineForward` (logits on the last
    stage); ``draws``: one (input_ids, window_starts, u [b, W, 2k], tau [b]) per micro-batch,
    identical on every stage. The first pass's argmax tokens are made on the last stage and
    broadcast back over the pipeline group, because the first stage embeds them for the second
    pass. Returns the targets [b, W, 2k] per micro-batch on the last stage, None elsewhere.
    """
    k = draws[0][2].shape[2] // 2
    if k < 1 or draws[0][2].shape[2] % 2:
        raise ValueError(f"self-forcing needs an even number (2k) of noise values per window, "
                         f"got {draws[0][2].shape[2]}")
    if k > prev_forward.max_k:
        raise ValueError(f"the previous stage has max_k={prev_forward.max_k}, cannot make targets "
                         f"for k={2 * k} (needs {k} slots per pass)")
    last = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
    no_tokens = [ids.new_zeros((*starts.shape, 0)) for ids, starts, _, _ in draws]
    logits = prev_forward([(ids, starts, u[..., :k].contiguous(), tau, none)
                           for (ids, starts, u, tau), none in zip(draws, no_tokens)])
    firsts = []
    for i, (ids, starts, _, _) in enumerate(draws):
        if logits is not None:
            first = vocab_parallel_argmax(logits[i], groups.tp_group).contiguous()
        else:
            first = torch.empty((*starts.shape, k), dtype=torch.long, device=ids.device)
        dist.broadcast(first, src=last, group=groups.pp_group)
        firsts.append(first)
    logits = prev_forward([(ids, starts, u[..., k:].contiguous(), tau, first)
                           for (ids, starts, u, tau), first in zip(draws, firsts)])
    if logits is None:
        return None
    return [torch.cat([first, vocab_parallel_argmax(out, groups.tp_group)], dim=-1)
            for first, out in zip(firsts, logits)]


@torch.no_grad()
def teacher_chain_targets(teacher: TransformerLM, input_ids: torch.Tensor, window_starts: torch.Tensor,
                          u: torch.Tensor, tau, order: str, tp_group, min_p: float = 0.0) -> torch.Tensor:
    """Stage-m targets from the AR teacher chained m times: LongTensor [b, W, m].

    y_1 = G(p(. | x_<=t), u_1), y_j = G(p(. | x_<=t, y_1..y_{j-1}), u_j): the teacher's exact
    joint sample for the window's noise (G as in :func:`stage1_targets`, temperature tau, min-p
    truncated when ``min_p`` > 0).
    input_ids [b, N]; window_starts [b, W] in [0, N-1]; u [b, W, m]; tau number or [b].

    Pass 1 runs the context causally (y_1 of every window) and keeps each layer's input; pass j
    runs only the W tokens y_{j-1} (at positions t+j-1), their keys and values taken from the kept
    inputs: a window's token sees the context <= t and its own window's earlier tokens (the
    staircase of :mod:`.layout`). Extra memory: every layer's input over N + W*(m-1) tokens.
    """
    check_order(order)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [b, N], got {tuple(input_ids.shape)}")
    b, N = input_ids.shape
    check_window_starts(window_starts, b, N)
    W = window_starts.shape[1]
    _check_u(u, b, W)
    m = u.shape[2]
    if m == 0:
        raise ValueError("teacher chain needs at least one noise value per window, got u of shape "
                         f"{tuple(u.shape)}")
    device = input_ids.device
    starts = window_starts.to(device).long()
    if teacher.embed_positions is not None and int(starts.max()) + m - 1 >= teacher.cfg.max_seq_len:
        raise ValueError(f"window tokens reach position {int(starts.max()) + m - 1}, beyond "
                         f"model.max_seq_len={teacher.cfg.max_seq_len} (learned positions)")
    tau = per_sequence_tau(tau, b, device)[:, None]

    def sample(hidden: torch.Tensor, j: int) -> torch.Tensor:
        """y_{j+1} [b, W] from the teacher's hidden states [b, W, H] of the conditioning tokens."""
        return vp_inverse_cdf_sample(teacher.head(teacher.final_norm(hidden)), u[..., j], tau, order,
                                     teacher.vocab_start, teacher.vocab_size, tp_group, min_p=min_p)

    positions = teacher.default_position_ids(b, N, device)
    hidden = teacher.embed(input_ids)
    rotary = teacher.rotary_tables(positions)
    layer_inputs = []  # per layer: its input over the context, then over each pass's window tokens
    for layer in teacher.layers:
        layer_inputs.append(hidden)
        hidden = layer(hidden, rotary)
    H = hidden.shape[-1]
    tokens = [sample(hidden.gather(1, starts[:, :, None].expand(b, W, H)), 0)]

    window = torch.arange(W, device=device)
    sees_context = torch.arange(N, device=device) <= starts[:, :, None]           # [b, W, N]
    for j in range(1, m):
        new_positions = starts + j                                                # y_j sits at t+j
        positions = torch.cat([positions, new_positions], dim=1)
        # window-token keys come pass after pass, W per pass: a token sees its own window's
        sees_tokens = (window.repeat(j) == window[:, None]).expand(b, W, W * j)
        mask = torch.cat([sees_context, sees_tokens], dim=2).unsqueeze(1)         # [b, 1, W, N+W*j]
        x = teacher.embed(tokens[-1], new_positions)
        rotary, key_rotary = teacher.rotary_tables(new_positions), teacher.rotary_tables(positions)
        for i, layer in enumerate(teacher.layers):
            layer_inputs[i] = torch.cat([layer_inputs[i], x], dim=1)
            x = layer(x, rotary, mask, kv_x=layer_inputs[i], kv_rotary=key_rotary)
        tokens.append(sample(x, j))
    return torch.stack(tokens, dim=-1)


@torch.no_grad()
def noise_inversion_batch(teacher: TransformerLM, tokens: torch.Tensor, window_starts: torch.Tensor,
                          k: int, tau, order: str, generator: Optional[torch.Generator],
                          tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise that makes the teacher's G reproduce real data: (u float64 [b, W, k], targets [b, W, k]).

    tokens [b, N+k]: the N context tokens and a real continuation; window_starts [b, W] in
    [0, N-1]. targets[:, w, i-1] = x_{t+i}; u_i is uniform inside the CDF interval of x_{t+i}
    under the teacher's p(. | x_<=t+i-1) (temperature tau), so G(that p, u_i) == x_{t+i}.
    One teacher pass over the data. ``generator`` draws the position inside each interval.
    """
    check_order(order)
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if tokens.dim() != 2 or tokens.shape[1] <= k:
        raise ValueError(f"tokens must have shape [b, N + k] with N >= 1 (k={k}), "
                         f"got {tuple(tokens.shape)}")
    b, N = tokens.shape[0], tokens.shape[1] - k
    check_window_starts(window_starts, b, N)
    W = window_starts.shape[1]
    tau = per_sequence_tau(tau, b, tokens.device)
    # The last token is only ever a target, never a condition.
    logits = teacher(tokens[:, :-1])                                     # [b, N+k-1, V/tp]
    cond = window_starts.to(tokens.device).long()[:, :, None] + torch.arange(k, device=tokens.device)
    flat = cond.reshape(b, W * k)
    local = logits.gather(1, flat[:, :, None].expand(b, W * k, logits.shape[-1]))
    local = local.view(b, W, k, -1)
    targets = tokens.gather(1, flat + 1).view(b, W, k)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    r = torch.rand(b, W, k, generator=generator, dtype=torch.float64, device=gen_device)
    u = vp_invert_noise_exact(local, targets, r.to(tokens.device), tau[:, None, None], order,
                              teacher.vocab_start, teacher.vocab_size, tp_group)
    return u, targets
