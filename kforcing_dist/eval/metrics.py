"""Quality measures of K-Forcing students against their AR teacher (engine-free, decoder models).

- agreement: the true AR teacher run sequentially by inverse-CDF on the same u's vs the
  student's one-pass block, per slot and per whole block, next to two baselines a student can
  reach without using u at all: chance (an independent draw matches) and the mode baseline (the
  student always emits the teacher's most likely token); for k >= 2 also against the chained
  k/2 student (its self-forcing target), which separates inherited from new error;
- sample quality: the teacher's NLL of samples, their unigram entropy (pooled and per sample)
  and distinct-n (a lower NLL with collapsed entropy is not better, so both are reported).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Optional

import torch

from ..nn.inverse_cdf import inverse_cdf_sample, probabilities


def _real(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return logits[..., :vocab_size]


def draw_noise(n: int, k: int, seed: int) -> torch.Tensor:
    """The agreement measurement's noise: u [n, k] float64; slot i of every stage uses column i,
    so one teacher path of the largest k serves every stage."""
    return torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@dataclasses.dataclass
class TeacherPath:
    """The teacher's chained inverse-CDF block for each context and what its distributions say
    along it (all [n, k]; probabilities at the decode temperature)."""
    u: torch.Tensor            # the noise of each slot
    tokens: torch.Tensor       # y*_i = G(teacher(x y*_<i), u_i)
    chance: torch.Tensor       # sum_v p_i(v)^2: an independent draw equals y*_i
    mode_prob: torch.Tensor    # max_v p_i(v): the teacher's most likely token equals y*_i
    mode: torch.Tensor         # argmax_v p_i(v), the teacher's most likely token
    token_prob: torch.Tensor   # p_i(y*_i)
    greedy_prob: torch.Tensor  # P(y*_1..i is the teacher's greedy block m_1..i): prod of max p
                               # along the chain of argmax tokens (not along y*)

    def first(self, k: int) -> "TeacherPath":
        """The same path cut to its first k slots (the teacher is causal)."""
        return TeacherPath(*(getattr(self, f.name)[:, :k] for f in dataclasses.fields(self)))


def _fork(cache):
    """An independent copy of a decoder's KV cache (one prefill, two continuations)."""
    return dataclasses.replace(cache, **{f.name: getattr(cache, f.name).clone()
                                         for f in dataclasses.fields(cache)})


@torch.no_grad()
def teacher_path(teacher, contexts: torch.Tensor, u: torch.Tensor, tau: float, order: str,
                 batch_size: int = 32, min_p: float = 0.0) -> TeacherPath:
    """Run the teacher k = u.shape[1] times, each step conditioned on its own earlier tokens
    (inverse CDF), and k times along its greedy chain; one cached prefill per batch of contexts.
    ``min_p`` > 0: the teacher's min-p truncated distribution (the one a student distilled with
    ``distill.teacher_min_p`` learned), for the tokens and every probability recorded."""
    k, parts = u.shape[1], []
    for i in range(0, contexts.shape[0], batch_size):
        c, uu = contexts[i:i + batch_size].to(teacher.device), u[i:i + batch_size]
        sampled = teacher.allocate_cache(c.shape[0], c.shape[1] + k)
        logits = _real(teacher.forward_step(sampled, c, output="last"), teacher.vocab_size)
        greedy, greedy_logits = _fork(sampled), logits
        steps, chain = [], torch.ones(c.shape[0], dtype=torch.float64)
        for j in range(k):
            p = probabilities(logits, tau, min_p).cpu()
            y = inverse_cdf_sample(logits, uu[:, j].to(logits.device), tau, order, min_p).cpu()
            best, mode = p.max(-1)
            top, argmax = probabilities(greedy_logits, tau, min_p).max(-1)
            chain = chain * top.cpu()
            steps.append((uu[:, j], y, (p * p).sum(-1), best, mode, p.gather(-1, y[:, None])[:, 0], chain))
            if j + 1 < k:
                logits = _real(teacher.forward_step(sampled, y[:, None].to(teacher.device), output="last"),
                               teacher.vocab_size)
                greedy_logits = _real(teacher.forward_step(greedy, argmax[:, None], output="last"),
                                      teacher.vocab_size)
        parts.append(TeacherPath(*(torch.stack(cols, 1) for cols in zip(*steps))))
    return TeacherPath(*(torch.cat([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(TeacherPath)))


@torch.no_grad()
def student_block(student, contexts: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """The student's one-pass block (argmax per slot, no frequency penalty): [n, k]."""
    return _real(student.pflm_logits(contexts, u, tau), student.vocab_size).argmax(-1).cpu()


@torch.no_grad()
def chained_block(previous, contexts: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """The self-forcing target of a k-token block: the k/2 student decodes u[:, :k/2], then,
    with those tokens appended as real inputs, u[:, k/2:] (exactly how stage-k targets are made)."""
    half = u.shape[1] // 2
    first = student_block(previous, contexts, u[:, :half], tau)
    second = student_block(previous, torch.cat([contexts, first.to(contexts.device)], dim=1),
                           u[:, half:], tau)
    return torch.cat([first, second], dim=1)


def _rates(same: torch.Tensor) -> dict:
    return {"slot_agreement": same.double().mean(0).tolist(),
            "block_agreement": same.all(1).double().mean().item()}


@torch.no_grad()
def agreement(teacher, student, contexts: torch.Tensor, k: int, tau: float, order: str, seed: int,
              batch_size: int = 32, previous=None, path: Optional[TeacherPath] = None,
              min_p: float = 0.0) -> dict:
    """Per-slot and whole-block agreement of the student's block with the teacher's sequential
    inverse-CDF sample for the same noise, on held-out ``contexts`` [n, s], with its baselines:

    - ``chance_level_per_slot``: E[sum p^2] per slot along the teacher's path (an independent
      draw matches); ``block_chance``: E[p(y*_1..k)], the probability that an independent k-token
      draw equals the teacher's whole block (sum_y P(y)^2, estimated without bias by the
      teacher's probability of its own sampled block);
    - ``mode_baseline``: ``slot`` E[max p] per slot along the teacher's path (slot 1: a student
      that ignores u and always emits the teacher's most likely token; slot i: one that knows the
      teacher's earlier tokens but ignores u_i); ``block`` the probability that the teacher's
      block is its greedy block (a u-blind student that emits the chained argmax);
    - ``mode_rate``: how often the student's token is the teacher's most likely one (a student
      that uses u does so about as often as the mode baseline; a collapsed one nearly always);
    - ``vs_previous`` (when ``previous``, the k/2 student, is given): agreement with the chained
      k/2 student under the same u (the target this stage was trained on: new error), and that
      chained student's own agreement with the teacher (inherited error).

    ``path``: the teacher's path for these contexts (of at least k slots, same tau, order and
    min_p), shared between stages; None computes it with :func:`draw_noise` (n, k, seed) and
    ``min_p`` (the teacher's truncation, as in :func:`teacher_path`).
    """
    if path is None:
        path = teacher_path(teacher, contexts, draw_noise(contexts.shape[0], k, seed), tau, order,
                            batch_size, min_p)
    path = path.first(k)
    if path.tokens.shape != (contexts.shape[0], k):
        raise ValueError(f"the teacher path has {tuple(path.tokens.shape)} slots for "
                         f"{contexts.shape[0]} contexts and k={k}")
    blocks, chained = [], []
    for i in range(0, contexts.shape[0], batch_size):
        c, uu = contexts[i:i + batch_size].to(student.device), path.u[i:i + batch_size]
        blocks.append(student_block(student, c, uu, tau))
        if previous is not None:
            chained.append(chained_block(previous, c, uu, tau))
    tokens = torch.cat(blocks)
    out = {**_rates(tokens == path.tokens),
           "chance_level": path.chance[:, 0].mean().item(),
           "chance_level_per_slot": path.chance.mean(0).tolist(),
           "block_chance": path.token_prob.prod(1).mean().item(),
           "mode_baseline": {"slot": path.mode_prob.mean(0).tolist(),
                             "block": path.greedy_prob[:, -1].mean().item()},
           "mode_rate": (tokens == path.mode).double().mean(0).tolist(),
           "contexts": int(contexts.shape[0])}
    if previous is not None:
        target = torch.cat(chained)
        out["vs_previous"] = {**_rates(tokens == target),
                              "previous_vs_teacher": _rates(target == path.tokens)}
    return out


@torch.no_grad()
def teacher_nll(teacher, prompts: list[list[int]], continuations: list[list[int]],
                batch_size: int = 16) -> float:
    """The teacher's mean negative log-likelihood (nats/token, tau = 1) of the continuations.

    Sequences run ``batch_size`` at a time, right-padded: a causal model's logits at a position
    do not depend on the padding after it."""
    pairs = [(p, c) for p, c in zip(prompts, continuations) if c]
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in chunk])
        logits = _real(teacher.logits(ids.to(teacher.device)), teacher.vocab_size).cpu()
        norm = torch.logsumexp(logits, -1)  # float32: a vocabulary-sized float64 copy costs more
        for row, (p, c) in enumerate(chunk):
            at = slice(len(p) - 1, len(p) - 1 + len(c))
            picked = logits[row, at].gather(1, torch.tensor(c)[:, None])[:, 0]
            total -= (picked.double() - norm[row, at].double()).sum().item()
            count += len(c)
    return total / max(count, 1)


def unigram_entropy(sequences: list[list[int]]) -> float:
    """Entropy (nats) of the pooled token distribution of the samples."""
    counts = Counter(t for s in sequences for t in s)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def entropy_per_sample(sequences: list[list[int]]) -> float:
    """Unigram entropy (nats) of each sample on its own, averaged over samples: a sample that
    loops on a few tokens scores low even when the samples differ from each other (which the
    pooled entropy rewards)."""
    rows = [s for s in sequences if s]
    return sum(unigram_entropy([s]) for s in rows) / len(rows) if rows else 0.0


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams in the samples (1.0 = no repetition)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: list[list[int]]) -> float:
    """Fraction of tokens equal to the token right before them."""
    pairs = [(a, b) for s in sequences for a, b in zip(s, s[1:])]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 0.0


def sample_stats(teacher, prompts: list[list[int]], samples: list[list[int]]) -> dict:
    return {"nll": teacher_nll(teacher, prompts, samples), "entropy": unigram_entropy(samples),
            "entropy_per_sample": entropy_per_sample(samples),
            "distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
            "distinct_3": distinct_n(samples, 3), "repetition": repetition_rate(samples),
            "tokens": sum(map(len, samples))}
