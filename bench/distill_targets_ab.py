"""Target making and the student's pass, each against the code it replaced: CPU time, one process.

Self-forcing targets (stages k2, k4) from one causal context pass plus each pass's window items
(``self_forcing_targets``) against two full staircase passes of the frozen student
(``forward_windows`` twice, the earlier code), and stage-1 targets with the teacher's head at the
window starts only (``stage1_targets``) against the head over the whole context. Demo-size models
with random weights (H 256, 4 layers, vocab 4096), batch 8, 256 slots per sequence; the two
versions alternate ``--reps`` times and the medians of the process CPU time are printed (steadier
than wall time on a shared machine), with the fraction of target tokens that agree (1.0: equal).
Last, the stage-k student's forward + backward over the staircase with the context rows on the
causal fast path (``causal_prefix = N``, what ``forward_windows`` does) against the dense masked
attention (``causal_prefix = 0``).

    PYTHONPATH=. python bench/distill_targets_ab.py [--contexts 256 1024] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.distill.targets import (self_forcing_targets, stage1_targets, stage1_targets_from_logits,
                                               vocab_parallel_argmax)
    from kforcing_dist.model import TransformerLM
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.nn.window import sample_window_starts
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    torch.set_num_threads(args.threads)
    init_distributed(resolve_launch({}), backend="gloo")
    tp = init_model_parallel(1, 1, torch.device("cpu")).tp_group
    b, vocab, slots = 8, 4096, 256
    for N in args.contexts:
        cfg = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, max_seq_len=N + 8, vocab_size=vocab,
                          norm="layernorm", activation="gelu_tanh", position="rope")
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (b, N))
        teacher = TransformerLM(cfg, vocab, tp).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        W = min(N, slots)
        s1, u1 = sample_window_starts(b, N, W, gen), torch.rand(b, W, 1, dtype=torch.float64, generator=gen)

        @torch.no_grad()
        def stage1_full_head():
            return stage1_targets_from_logits(teacher(ids), s1, u1, 1.0, "vocab", tp, vocab)

        cases = {"k1": (stage1_full_head, lambda: stage1_targets(teacher, ids, s1, u1, 1.0, "vocab", tp))}
        for k in (2, 4):
            prev = PFLM(cfg, vocab, tp, max_k=k // 2).eval().requires_grad_(False)
            W = min(N, slots // k)
            s, u = sample_window_starts(b, N, W, gen), torch.rand(b, W, k, dtype=torch.float64, generator=gen)

            @torch.no_grad()
            def two_full_passes(prev=prev, s=s, u=u, h=k // 2):
                first = vocab_parallel_argmax(prev.forward_windows(ids, s, u[..., :h], 1.0), tp)
                second = prev.forward_windows(ids, s, u[..., h:], 1.0, window_tokens=first)
                return torch.cat([first, vocab_parallel_argmax(second, tp)], dim=-1)

            def shared_context(prev=prev, s=s, u=u):
                return self_forcing_targets(prev, ids, s, u, 1.0, tp)

            cases[f"k{k}"] = (two_full_passes, shared_context)
        for name, (before, after) in cases.items():
            agree = (before() == after()).double().mean().item()
            times = {"before": [], "after": []}
            for _ in range(args.reps):
                for label, fn in (("before", before), ("after", after)):
                    start = time.process_time()
                    fn()
                    times[label].append(time.process_time() - start)
            tb, ta = statistics.median(times["before"]), statistics.median(times["after"])
            print(f"N={N} {name} targets: full passes {tb * 1000:.0f} ms, now {ta * 1000:.0f} ms CPU "
                  f"({tb / ta:.2f}x), tokens agree {agree:.4f}", flush=True)
        for k in (1, 2, 4):
            student = PFLM(cfg, vocab, tp, max_k=k)
            W = min(N, slots // k)
            s, u = sample_window_starts(b, N, W, gen), torch.rand(b, W, k, dtype=torch.float64, generator=gen)
            hidden, pos, mask, shape = student.window_inputs(ids, s, u, 1.0)

            def student_step(prefix, student=student, hidden=hidden, pos=pos, mask=mask, shape=shape):
                student.zero_grad()
                out = student.window_logits(student.backbone(hidden.detach(), pos, mask, causal_prefix=prefix), shape)
                out.logsumexp(-1).mean().backward()

            times = {0: [], N: []}
            for _ in range(args.reps):
                for prefix in times:
                    start = time.process_time()
                    student_step(prefix)
                    times[prefix].append(time.process_time() - start)
            td, ts = statistics.median(times[0]), statistics.median(times[N])
            print(f"N={N} k{k} student forward+backward: dense mask {td * 1000:.0f} ms, causal context "
                  f"{ts * 1000:.0f} ms CPU ({td / ts:.2f}x)", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
