"""Target making and the student's pass, each against the code it replaced: CPU time, one process.

Self-forcing targets (stages k2, k4) from one causal context pass plus each pass's window items
(``self_forcing_targets``) against two full staircase passes of the frozen student
(``forward_windows`` twice, the earlier code), and stage-1 targets with the teacher's head at the
window starts only (``stage1_targets``) against the head over the whole context. Demo-size models
with random weights (H 256, 4 layers, vocab 4096), batch 8, 256 slots per sequence; the two
versions alternate ``--reps`` times and the medians of the process CPU time are printed (steadier
than wall time on a shared machine), with the fraction of target tokens that agree (1.0: equal).
Then the frozen student's context given as each layer's keys and values
(``context_keys_values``, what ``self_forcing_targets`` uses) against each layer's input
(``context_pass``, the keys and values projected again in both passes), and, at stage k1, the
teacher's last layer on the window-start rows only (``teacher(ids, head_rows=...)``) against the
whole last layer with the start rows gathered afterwards (the same only when W < N).
Last, the stage-k student's forward + backward over the staircase: the context rows on the
causal fast path (``causal_prefix = N``) against the dense masked attention
(``causal_prefix = 0``), then the last layer on the window rows only (``read_from = N``, what
``forward_windows`` does) against every row.

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
    from kforcing_dist.nn.window import all_window_starts, sample_window_starts
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

        @torch.no_grad()
        def stage1_whole_last_layer():
            hidden = teacher.backbone(teacher.embed(ids))
            logits = teacher.head(hidden.gather(1, s1[:, :, None].expand(*s1.shape, hidden.shape[-1])))
            return stage1_targets_from_logits(logits, all_window_starts(*s1.shape), u1, 1.0, "vocab", tp, vocab)

        def stage1_now():
            return stage1_targets(teacher, ids, s1, u1, 1.0, "vocab", tp)

        cases = {"k1": ("head over the whole context", stage1_full_head, stage1_now),
                 "k1 last layer": ("whole last layer", stage1_whole_last_layer, stage1_now)}
        for k in (2, 4):
            prev = PFLM(cfg, vocab, tp, max_k=k // 2).eval().requires_grad_(False)
            W = min(N, slots // k)
            s, u = sample_window_starts(b, N, W, gen), torch.rand(b, W, k, dtype=torch.float64, generator=gen)

            @torch.no_grad()
            def two_full_passes(prev=prev, s=s, u=u, h=k // 2):
                first = vocab_parallel_argmax(prev.forward_windows(ids, s, u[..., :h], 1.0), tp)
                second = prev.forward_windows(ids, s, u[..., h:], 1.0, window_tokens=first)
                return torch.cat([first, vocab_parallel_argmax(second, tp)], dim=-1)

            @torch.no_grad()
            def layer_inputs(prev=prev, s=s, u=u, h=k // 2):
                context = prev.context_pass(ids)
                first = vocab_parallel_argmax(prev.window_item_logits(context, ids, s, u[..., :h], 1.0), tp)
                second = prev.window_item_logits(context, ids, s, u[..., h:], 1.0, window_tokens=first)
                return torch.cat([first, vocab_parallel_argmax(second, tp)], dim=-1)

            def shared_context(prev=prev, s=s, u=u):
                return self_forcing_targets(prev, ids, s, u, 1.0, tp)

            cases[f"k{k}"] = ("two full passes", two_full_passes, shared_context)
            cases[f"k{k} context"] = ("context as layer inputs", layer_inputs, shared_context)
        for name, (what, before, after) in cases.items():
            agree = (before() == after()).double().mean().item()
            times = {"before": [], "after": []}
            for _ in range(args.reps):
                for label, fn in (("before", before), ("after", after)):
                    start = time.process_time()
                    fn()
                    times[label].append(time.process_time() - start)
            tb, ta = statistics.median(times["before"]), statistics.median(times["after"])
            print(f"N={N} {name} targets: {what} {tb * 1000:.0f} ms, now {ta * 1000:.0f} ms CPU "
                  f"({tb / ta:.2f}x), tokens agree {agree:.4f}", flush=True)
        for k in (1, 2, 4):
            student = PFLM(cfg, vocab, tp, max_k=k)
            W = min(N, slots // k)
            s, u = sample_window_starts(b, N, W, gen), torch.rand(b, W, k, dtype=torch.float64, generator=gen)
            hidden, pos, mask, shape = student.window_inputs(ids, s, u, 1.0)

            def student_step(prefix, read_from, student=student, hidden=hidden, pos=pos, mask=mask,
                             shape=shape):
                student.zero_grad()
                out = student.backbone(hidden.detach(), pos, mask, causal_prefix=prefix, read_from=read_from)
                out = student.window_logits(out, (0, *shape[1:]) if read_from else shape)
                out.logsumexp(-1).mean().backward()

            variants = {"dense mask": (0, 0), "causal context": (N, 0), "last layer on window rows": (N, N)}
            times = {name: [] for name in variants}
            for _ in range(args.reps):
                for name, (prefix, read_from) in variants.items():
                    start = time.process_time()
                    student_step(prefix, read_from)
                    times[name].append(time.process_time() - start)
            ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
            print(f"N={N} k{k} student forward+backward CPU: " + ", ".join(f"{n} {v:.0f} ms" for n, v in ms.items())
                  + f" ({ms['dense mask'] / ms['causal context']:.2f}x, then "
                  f"{ms['causal context'] / ms['last layer on window rows']:.2f}x)", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
