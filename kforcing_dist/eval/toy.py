"""Fidelity on an enumerable toy: does the k=2 student sample the teacher's *joint*?

With a tiny vocabulary the teacher's exact joint of the next two tokens,
p(y1, y2 | x) = p(y1 | x) p(y2 | x, y1), is a V x V table (V + 1 teacher positions). The toy:

- data: sequences from a sparse first-order Markov chain (each token has three successors with
  probabilities 0.6 / 0.3 / 0.1, arranged so that the successors of a token have disjoint
  successor sets, see :func:`markov_chain`), so the second token reveals the first and the
  joint is far from the product of its marginals (TV 0.54 for the chain itself);
- teacher: a small :class:`~kforcing_dist.model.transformer.TransformerLM` trained on that data
  (plain Adam); its own exact joint is the reference, whatever it learned;
- student: distilled with the project's own pieces: stage k=1 from the AR teacher by
  inverse-CDF (``stage1_targets``), then stage k=2 by self-forcing from the frozen k=1 student
  (``self_forcing_targets``) with the student initialised by ``PFLM.from_student``; the loss is
  ``slot_metrics``; a plain Adam loop replaces the DeepSpeed engine;
- measurement: on held-out contexts, the student's joint of (y1, y2) is estimated from many
  i.i.d. noise draws (u1, u2) (one window at the last context position per draw) and compared
  with the teacher's exact joint by total variation. References: the *independent-marginals*
  sampler p(y1 | x) * p_marg(y2 | x), p_marg(y2 | x) = sum_y1 p(y1 | x) p(y2 | x, y1) (computed
  exactly, so its TV is exact), and the k=1 student run twice in sequence (optional).

Library code only (no printing); ``tests/unit/test_toy_fidelity.py`` and
``bench/toy_fidelity.py`` drive it. Needs torch.distributed started (a world of size 1 is fine)
and a :class:`~kforcing_dist.parallel.groups.ParallelGroups` (or a TP group) at TP=1.
"""

from __future__ import annotations

import dataclasses
import math
import time
import torch

from ..config.schema import ModelConfig
from ..nn.inverse_cdf import inverse_cdf_sample, probabilities
from ..nn.window import sample_window_starts
from ..distill.losses import slot_metrics
from ..distill.targets import self_forcing_targets, stage1_targets
from ..model.student import PFLM
from ..model.transformer import TransformerLM, lm_loss
from ..nn.sizes import pad_vocab_size


@dataclasses.dataclass
class ToyConfig:
    """Everything that defines one toy run (sizes, steps, seeds)."""

    vocab_size: int = 16
    successor_probs: tuple = (0.6, 0.3, 0.1)   # probabilities of each token's likely successors
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    pad_multiple: int = 12          # vocab padded to a multiple of this (16 -> 24: masked logits)
    seq_len: int = 8                # context tokens per training sequence (and per held-out context)
    batch_size: int = 64            # sequences per step (teacher and student)
    teacher_steps: int = 200
    teacher_lr: float = 5e-3
    stage1_steps: int = 150
    stage2_steps: int = 200
    distill_lr: float = 5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    windows_per_sequence: int = 0   # 0: every window start of every sequence
    cdf_order: str = "vocab"
    tau: float = 1.0
    noise_features: str = "rising"  # distill.noise_features; noise_max_freq applies to rising only
    noise_max_freq: float = 64.0
    noise_init_std: float = 0.02
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, make_vocab_size_divisible_by=self.pad_multiple,
                           hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, max_seq_len=self.seq_len + 4,
                           position="rope")

    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.pad_multiple, 1)


# ------------------------------------------------------------------------------ data


def _stride(vocab_size: int, successors: int) -> int:
    """Smallest m >= s, coprime with V, whose s blocks {m*j .. m*j + s-1} (j < s) are disjoint mod V."""
    for m in range(successors, vocab_size):
        if math.gcd(m, vocab_size) == 1 and m * (successors - 1) + successors <= vocab_size:
            return m
    raise ValueError(f"vocab_size={vocab_size} is too small for {successors} successors per token "
                     f"with disjoint two-step supports (needs about successors**2 tokens)")


def markov_chain(vocab_size: int, successor_probs, seed: int) -> torch.Tensor:
    """Transition matrix [V, V] (float64) of a sparse chain whose next two tokens are far from
    independent.

    Before relabelling, token a goes to m*a + j (mod V), j = 0..s-1, with probability
    successor_probs[j] (m: :func:`_stride`). Then the s successors of any token have pairwise
    disjoint successor sets (m*m*a + m*j + i are distinct over (j, i)), so y2 reveals y1 and the
    independent-marginals sampler is wrong by sum_j p_j (1 - p_j) in TV (0.54 for 0.6/0.3/0.1)
    after every context. Every token also has exactly one predecessor per j (m is invertible),
    so the chain is doubly stochastic: its stationary distribution is uniform and every token
    is equally common in training data. Token ids are then relabelled by a seeded random
    permutation so that the ``vocab`` CDF order carries no structure.
    """
    probs = torch.as_tensor(successor_probs, dtype=torch.float64)
    s = probs.numel()
    if probs.dim() != 1 or s < 2 or bool((probs <= 0).any()) or abs(float(probs.sum()) - 1.0) > 1e-9:
        raise ValueError(f"successor_probs must be at least two positive numbers summing to 1, "
                         f"got {successor_probs}")
    V = vocab_size
    m = _stride(V, s)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    trans = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        for j in range(s):
            trans[perm[a], perm[(m * a + j) % V]] = probs[j]
    return trans


def sample_sequences(trans: torch.Tensor, count: int, length: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``count`` chain sequences of ``length`` tokens, first token uniform: LongTensor [count, length]."""
    V = trans.shape[0]
    seq = torch.empty(count, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, V, (count,), generator=generator)
    for t in range(1, length):
        seq[:, t] = torch.multinomial(trans[seq[:, t - 1]], 1, generator=generator).squeeze(-1)
    return seq


# ------------------------------------------------------------------------------ training


def _lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _adam(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            betas=(0.9, 0.98))


def train_teacher(cfg: ToyConfig, trans: torch.Tensor, tp_group) -> tuple[TransformerLM, dict]:
    """Build the AR teacher (seeded) and fit it to the chain; returns (teacher in eval mode, stats)."""
    torch.manual_seed(cfg.seed)
    teacher = TransformerLM(cfg.model_config(), cfg.padded_vocab_size(), tp_group)
    opt = _adam(teacher, cfg.teacher_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    teacher.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(cfg.teacher_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.teacher_steps, cfg.teacher_lr, cfg.warmup_steps, cfg.min_lr_ratio)
        seq = sample_sequences(trans, cfg.batch_size, cfg.seq_len + 1, gen)
        logits = teacher(seq[:, :-1])
        loss = lm_loss(logits, seq[:, 1:], tp_group)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # every row has the same entropy: the lowest loss a teacher can reach on this data
    row_entropy = -(trans * trans.clamp(min=1e-300).log()).sum(-1).mean().item()
    return teacher, {"final_loss": float(loss.detach()), "loss_floor": row_entropy,
                     "seconds": time.perf_counter() - start}


def _distil_stage(cfg: ToyConfig, student: PFLM, k: int, steps: int, trans: torch.Tensor,
                  make_targets, tp_group, seed: int) -> dict:
    opt = _adam(student, cfg.distill_lr)
    gen = torch.Generator().manual_seed(seed)
    student.train()
    start, history = time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, cfg.distill_lr, cfg.warmup_steps, cfg.min_lr_ratio)
        seq = sample_sequences(trans, cfg.batch_size, cfg.seq_len, gen)
        starts = sample_window_starts(cfg.batch_size, cfg.seq_len, cfg.windows_per_sequence, gen)
        u = torch.rand((*starts.shape, k), generator=gen, dtype=torch.float64)
        targets = make_targets(seq, starts, u)
        loss, metrics = slot_metrics(student.forward_windows(seq, starts, u, cfg.tau), targets, tp_group)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(metrics)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    tail = history[-max(1, steps // 10):]
    return {"seconds": time.perf_counter() - start,
            "final_loss": sum(m["loss"] for m in tail) / len(tail),
            "final_acc_per_slot": [sum(m["acc_per_slot"][i] for m in tail) / len(tail) for i in range(k)],
            "final_block_match": sum(m["block_match"] for m in tail) / len(tail)}


def distil_k1(cfg: ToyConfig, teacher: TransformerLM, trans: torch.Tensor, tp_group) -> tuple[PFLM, dict]:
    """Stage k=1: student initialised from the teacher, targets G(teacher, u) by inverse CDF."""
    torch.manual_seed(cfg.seed + 2)
    student = PFLM(cfg.model_config(), cfg.padded_vocab_size(), tp_group, max_k=1,
                   noise_max_freq=cfg.noise_max_freq, noise_init_std=cfg.noise_init_std,
                   noise_features=cfg.noise_features)
    student.init_from_teacher(teacher, tp_group)

    def targets(seq, starts, u):
        return stage1_targets(teacher, seq, starts, u, cfg.tau, cfg.cdf_order, tp_group)

    stats = _distil_stage(cfg, student, 1, cfg.stage1_steps, trans, targets, tp_group, cfg.seed + 3)
    return student, stats


def distil_k2(cfg: ToyConfig, k1: PFLM, trans: torch.Tensor, tp_group) -> tuple[PFLM, dict]:
    """Stage k=2: student = ``PFLM.from_student(k1)``, targets by self-forcing from the frozen k1."""
    student = PFLM.from_student(k1, max_k=2)
    for p in student.parameters():
        p.requires_grad_(True)

    def targets(seq, starts, u):
        return self_forcing_targets(k1, seq, starts, u, cfg.tau, tp_group)

    stats = _distil_stage(cfg, student, 2, cfg.stage2_steps, trans, targets, tp_group, cfg.seed + 4)
    return student, stats


# ------------------------------------------------------------------------------ joints


def _real(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return logits[..., :vocab_size]


@torch.no_grad()
def teacher_joint(teacher: TransformerLM, context: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Exact p(y1, y2 | context) [V, V] float64 (rows y1), from V + 1 teacher positions."""
    V = teacher.vocab_size
    if context.dim() != 1:
        raise ValueError(f"context must be a 1-D token tensor, got shape {tuple(context.shape)}")
    seqs = torch.cat([context.expand(V, -1), torch.arange(V)[:, None]], dim=1)   # [V, n+1]
    logits = _real(teacher(seqs), V)                                            # [V, n+1, V]
    p1 = probabilities(logits[0, -2], tau)                                      # [V]
    p2 = probabilities(logits[:, -1], tau)                                      # [V(y1), V(y2)]
    return p1[:, None] * p2


def independent_joint(joint: torch.Tensor) -> torch.Tensor:
    """The independent-marginals sampler's distribution: p(y1) * p_marg(y2)."""
    return joint.sum(1)[:, None] * joint.sum(0)[None, :]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """0.5 * sum |p - q| (float64)."""
    return 0.5 * float((p.double() - q.double()).abs().sum())


def _counts(y1: torch.Tensor, y2: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(y1 * V + y2, minlength=V * V).view(V, V).double()


@torch.no_grad()
def teacher_sequential(teacher: TransformerLM, context: torch.Tensor, u: torch.Tensor, tau: float,
                       order: str) -> torch.Tensor:
    """The exact chained inverse-CDF sample for each noise pair: LongTensor [n, 2]."""
    V = teacher.vocab_size
    logits = _real(teacher(torch.cat([context.expand(V, -1), torch.arange(V)[:, None]], dim=1)), V)
    y1 = inverse_cdf_sample(logits[0, -2].expand(u.shape[0], V), u[:, 0], tau, order)
    y2 = inverse_cdf_sample(logits[y1, -1], u[:, 1], tau, order)
    return torch.stack([y1, y2], dim=1)


def _packed(context: torch.Tensor, u: torch.Tensor, windows_per_row: int):
    """n noise draws as rows of ``windows_per_row`` windows, all at the last context position:
    (ids [b, N], starts [b, W], u [b, W, m]); the last row is filled up with repeated draws
    (their tokens are cut off by the caller)."""
    W = windows_per_row
    pad = (-u.shape[0]) % W
    if pad:
        u = torch.cat([u, u[:pad]])
    b = u.shape[0] // W
    starts = torch.full((b, W), context.shape[0] - 1, dtype=torch.long)
    return context.expand(b, -1), starts, u.view(b, W, -1)


@torch.no_grad()
def student_tokens(student: PFLM, context: torch.Tensor, u: torch.Tensor, tau: float = 1.0,
                   windows_per_row: int = 32, rows_per_pass: int = 128) -> torch.Tensor:
    """The student's block (argmax over the real vocabulary) for each noise draw u [n, k]: one
    window at the last context position per draw, in one ``forward_windows`` pass per chunk
    (``windows_per_row`` windows share a context row). LongTensor [n, k]."""
    ids, starts, uu = _packed(context, u, windows_per_row)
    out = [_real(student.forward_windows(ids[i:i + rows_per_pass], starts[i:i + rows_per_pass],
                                         uu[i:i + rows_per_pass], tau), student.vocab_size).argmax(-1)
           for i in range(0, ids.shape[0], rows_per_pass)]
    toks = torch.cat(out).reshape(-1, u.shape[1])
    return toks[:u.shape[0]]


@torch.no_grad()
def chained_k1_tokens(k1: PFLM, context: torch.Tensor, u: torch.Tensor, tau: float, tp_group,
                      windows_per_row: int = 32, rows_per_pass: int = 128) -> torch.Tensor:
    """The k=1 student run twice in sequence, y1 = F1(x, u1), y2 = F1(x y1, u2), for u [n, 2]:
    exactly the stage-2 targets (``self_forcing_targets``). LongTensor [n, 2]."""
    ids, starts, uu = _packed(context, u, windows_per_row)
    out = [self_forcing_targets(k1, ids[i:i + rows_per_pass], starts[i:i + rows_per_pass],
                                uu[i:i + rows_per_pass], tau, tp_group)
           for i in range(0, ids.shape[0], rows_per_pass)]
    return torch.cat(out).reshape(-1, 2)[:u.shape[0]]


# ------------------------------------------------------------------------------ the whole toy


@dataclasses.dataclass
class ToyModels:
    cfg: ToyConfig
    trans: torch.Tensor
    teacher: TransformerLM
    k1: PFLM
    k2: PFLM
    stats: dict


def build_toy(cfg: ToyConfig, tp_group) -> ToyModels:
    """Chain, teacher, k=1 and k=2 students, with training statistics (seconds, final metrics).

    Deterministic for a given ``cfg`` (and thread count); the default torch RNG is left as it was.
    """
    trans = markov_chain(cfg.vocab_size, cfg.successor_probs, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        teacher, t_stats = train_teacher(cfg, trans, tp_group)
        k1, s1 = distil_k1(cfg, teacher, trans, tp_group)
        k2, s2 = distil_k2(cfg, k1, trans, tp_group)
    return ToyModels(cfg, trans, teacher, k1, k2, {"teacher": t_stats, "stage1": s1, "stage2": s2})


def heldout_contexts(cfg: ToyConfig, trans: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` chain sequences of cfg.seq_len tokens from a generator of their own."""
    return sample_sequences(trans, count, cfg.seq_len, torch.Generator().manual_seed(seed))


@torch.no_grad()
def measure(models: ToyModels, contexts: torch.Tensor, draws: int, seed: int, tp_group,
            chained: bool = True) -> list[dict]:
    """Per held-out context [N], with ``draws`` i.i.d. noise pairs (u1, u2):

    - ``tv_student_k2``: TV between the k=2 student's empirical joint and the teacher's exact joint;
    - ``tv_independent``: exact TV of the independent-marginals sampler to the joint;
    - ``tv_chained_k1`` (with ``chained``): the same for the k=1 student run twice (the stage-2
      targets), i.e. what stage 2 could at best inherit;
    - ``block_agreement_k2``: how often the student's (y1, y2) equals the teacher's chained
      inverse-CDF sample for the same noise (by coupling, TV <= 1 - agreement in expectation);
    - ``tv_sampling_scale``: 0.5 * sum sqrt(p (1 - p) / draws), an upper bound on the expected
      TV of an *exact* sampler's empirical joint from this many draws (the estimate's noise floor).
    """
    cfg, V, out = models.cfg, models.cfg.vocab_size, []
    gen = torch.Generator().manual_seed(seed)
    for c in contexts:
        joint = teacher_joint(models.teacher, c, cfg.tau)
        u = torch.rand(draws, 2, generator=gen, dtype=torch.float64)
        toks = student_tokens(models.k2, c, u, cfg.tau)
        ref = teacher_sequential(models.teacher, c, u, cfg.tau, cfg.cdf_order)
        row = {"context": c.tolist(),
               "tv_student_k2": total_variation(_counts(toks[:, 0], toks[:, 1], V) / draws, joint),
               "tv_independent": total_variation(independent_joint(joint), joint),
               "block_agreement_k2": float((toks == ref).all(1).double().mean()),
               "tv_sampling_scale": 0.5 * float(torch.sqrt(joint * (1 - joint) / draws).sum())}
        if chained:
            ch = chained_k1_tokens(models.k1, c, u, cfg.tau, tp_group)
            row["tv_chained_k1"] = total_variation(_counts(ch[:, 0], ch[:, 1], V) / draws, joint)
        out.append(row)
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean and max over contexts of every ``tv_*`` and ``block_*`` figure of :func:`measure`."""
    keys = [k for k in rows[0] if k.startswith(("tv_", "block_"))]
    return {f"{stat}_{k}": fn([r[k] for r in rows]) for k in keys
            for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("max", max))}
