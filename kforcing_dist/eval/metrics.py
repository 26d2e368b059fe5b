"""Quality measures of K-Forcing students against their AR teacher (engine-free, decoder models).

- agreement: the true AR teacher run sequentially by inverse-CDF on the same u's vs the
  student's one-pass block, per slot and per whole block, with the chance level (sum p^2);
- sample quality: the teacher's NLL of samples, their unigram entropy and distinct-n (a lower
  NLL with collapsed entropy is not better, so both are reported).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..distill.inverse_cdf import chance_level, inverse_cdf_sample


def _real(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return logits[..., :vocab_size]


@torch.no_grad()
def teacher_sequential(teacher, contexts: torch.Tensor, u: torch.Tensor, tau: float, order: str):
    """y*_i = G(teacher(x y*_<i), u_i) for i = 1..k; returns tokens [n, k] and chance [n, k]."""
    seq = contexts
    tokens, chance = [], []
    for i in range(u.shape[1]):
        logits = _real(teacher.logits(seq)[:, -1], teacher.vocab_size)
        y = inverse_cdf_sample(logits, u[:, i], tau, order)
        tokens.append(y)
        chance.append(chance_level(logits, tau))
        seq = torch.cat([seq, y[:, None]], dim=1)
    return torch.stack(tokens, 1), torch.stack(chance, 1)


@torch.no_grad()
def agreement(teacher, student, contexts: torch.Tensor, k: int, tau: float, order: str, seed: int,
              batch_size: int = 32) -> dict:
    """Per-slot and whole-block agreement of the student's block with the teacher's sequential
    inverse-CDF sample for the same noise, on held-out ``contexts`` [n, s]."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(contexts.shape[0], k, generator=gen, dtype=torch.float64)
    same, chances = [], []
    for i in range(0, contexts.shape[0], batch_size):
        c, uu = contexts[i:i + batch_size], u[i:i + batch_size]
        ref, ch = teacher_sequential(teacher, c, uu, tau, order)
        logits = _real(student.pflm_logits(c, uu, tau), student.vocab_size)
        same.append(logits.argmax(-1) == ref)
        chances.append(ch)
    same_t, ch_t = torch.cat(same), torch.cat(chances)
    return {"slot_agreement": same_t.double().mean(0).tolist(),
            "block_agreement": same_t.all(1).double().mean().item(),
            "chance_level": ch_t[:, 0].mean().item(),
            "chance_level_per_slot": ch_t.mean(0).tolist(),
            "contexts": int(contexts.shape[0])}


@torch.no_grad()
def teacher_nll(teacher, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The teacher's mean negative log-likelihood (nats/token, tau = 1) of the continuations."""
    total, count = 0.0, 0
    for p, c in zip(prompts, continuations):
        if not c:
            continue
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(_real(teacher.logits(ids)[0], teacher.vocab_size).double(), -1)
        targets = torch.tensor(c)
        total += -logp[len(p) - 1:len(p) - 1 + len(c)].gather(1, targets[:, None]).sum().item()
        count += len(c)
    return total / max(count, 1)


def unigram_entropy(sequences: list[list[int]]) -> float:
    """Entropy (nats) of the pooled token distribution of the samples."""
    counts = Counter(t for s in sequences for t in s)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


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
            "distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
            "distinct_3": distinct_n(samples, 3), "repetition": repetition_rate(samples),
            "tokens": sum(map(len, samples))}
