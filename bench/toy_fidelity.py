"""Fidelity on an enumerable toy: does the K-Forcing k=2 student sample the teacher's joint?

What it measures. A tiny AR teacher (TransformerLM, vocabulary 16) is trained on a sparse Markov
chain in which each token has three successors (probabilities 0.6 / 0.3 / 0.1) whose own
successor sets are disjoint, so the next two tokens are strongly dependent. Its exact joint of
the next two tokens, p(y1, y2 | x) = p(y1 | x) p(y2 | x, y1), is enumerated (V + 1 teacher
positions, tau = 1). The student is distilled with the project's own stages: k=1 from the AR
teacher by inverse CDF (``stage1_targets``), then k=2 by self-forcing from the frozen k=1 student
(``self_forcing_targets``, student initialised by ``PFLM.from_student``); plain Adam instead of
DeepSpeed. On held-out contexts, per context:

- TV(student k=2): total variation between the student's joint of (y1, y2), estimated from
  ``--draws`` i.i.d. noise pairs (u1, u2) in one-pass windows, and the teacher's exact joint;
- TV(chained k=1): the same for the k=1 student run twice in sequence (the stage-2 targets);
- TV(independent): exact TV of the independent-marginals sampler p(y1 | x) p_marg(y2 | x),
  p_marg(y2 | x) = sum_y1 p(y1 | x) p(y2 | x, y1), to the joint (what a sampler of per-position
  marginals, e.g. independent heads, would get even with perfect marginals);
- agreement: how often the student's block equals the teacher's chained inverse-CDF sample for
  the same noise; noise: the sampling-error scale of the TV estimate from this many draws.

The requirement: TV(student k=2) < 0.1 while TV(independent) is not. Both CDF orders
(``vocab``, ``sorted``) are run by default; training time per stage is reported. Prints a table
and writes everything to ``--out`` (JSON).

    .venv/bin/python bench/toy_fidelity.py [--orders vocab sorted] [--seeds 0 1] [--contexts 8]
        [--draws 50000] [--set stage2_steps=400 ...] [--out runs/bench/toy_fidelity.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", category=UserWarning)  # megatron's "Apex is not installed" noise

import torch  # noqa: E402

from kforcing_dist.eval import toy  # noqa: E402
from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown  # noqa: E402
from kforcing_dist.parallel.launch import resolve_launch  # noqa: E402

TV_BOUND = 0.1


def parse_set(items: list[str]) -> dict:
    """key=value overrides of ToyConfig fields, converted to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(toy.ToyConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        default = getattr(toy.ToyConfig(), key)
        if isinstance(default, tuple):
            out[key] = tuple(float(v) for v in value.split(","))
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def run_one(cfg: toy.ToyConfig, groups, contexts: int, draws: int) -> dict:
    start = time.perf_counter()
    models = toy.build_toy(cfg, groups)
    train_s = time.perf_counter() - start
    ctx = toy.heldout_contexts(cfg, models.trans, contexts, seed=1234 + cfg.seed)
    start = time.perf_counter()
    rows = toy.measure(models, ctx, draws, seed=99 + cfg.seed, tp_group=groups, chained=True)
    return {"config": dataclasses.asdict(cfg), "train_stats": models.stats, "train_seconds": train_s,
            "measure_seconds": time.perf_counter() - start, "rows": rows,
            "summary": toy.summarise(rows),
            "passed": all(r["tv_student_k2"] < TV_BOUND < r["tv_independent"] for r in rows)}


def print_run(res: dict) -> None:
    cfg, st = res["config"], res["train_stats"]
    print(f"\n== cdf_order={cfg['cdf_order']} seed={cfg['seed']}  "
          f"train {res['train_seconds']:.1f} s (teacher {st['teacher']['seconds']:.1f}, "
          f"k=1 {st['stage1']['seconds']:.1f}, k=2 {st['stage2']['seconds']:.1f}), "
          f"measure {res['measure_seconds']:.1f} s")
    print(f"   teacher loss {st['teacher']['final_loss']:.4f} (floor {st['teacher']['loss_floor']:.4f}); "
          f"k=1 train acc {st['stage1']['final_acc_per_slot'][0]:.4f}; k=2 train acc/slot "
          + "/".join(f"{a:.4f}" for a in st['stage2']['final_acc_per_slot'])
          + f", block {st['stage2']['final_block_match']:.4f}")
    head = f"   {'context (last 3)':<18}{'TV k=2':>9}{'TV k=1x2':>10}{'TV indep':>10}{'agree':>8}{'noise':>8}"
    print(head)
    for r in res["rows"]:
        print(f"   {str(r['context'][-3:]):<18}{r['tv_student_k2']:>9.4f}{r['tv_chained_k1']:>10.4f}"
              f"{r['tv_independent']:>10.4f}{r['block_agreement_k2']:>8.3f}{r['tv_sampling_scale']:>8.4f}")
    s = res["summary"]
    for stat in ("mean", "max"):
        print(f"   {stat:<18}{s[f'{stat}_tv_student_k2']:>9.4f}{s[f'{stat}_tv_chained_k1']:>10.4f}"
              f"{s[f'{stat}_tv_independent']:>10.4f}{s[f'{stat}_block_agreement_k2']:>8.3f}"
              f"{s[f'{stat}_tv_sampling_scale']:>8.4f}")
    verdict = "PASS" if res["passed"] else "FAIL"
    print(f"   {verdict}: every context TV(student k=2) < {TV_BOUND} < TV(independent)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", nargs="+", default=["vocab", "sorted"], choices=["vocab", "sorted"],
                    help="CDF orders to distil with (default: both)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="toy seeds (chain, weights, noise)")
    ap.add_argument("--contexts", type=int, default=8, help="held-out contexts per run")
    ap.add_argument("--draws", type=int, default=50_000, help="noise pairs per context")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny ops on a shared CPU)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="ToyConfig overrides, e.g. stage2_steps=400 distill_lr=3e-3")
    ap.add_argument("--out", default="runs/bench/toy_fidelity.json", help="JSON results file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    device = init_distributed(resolve_launch({}), backend="gloo")
    groups = init_model_parallel(1, 1, device)
    results = []
    try:
        for seed in args.seeds:
            for order in args.orders:
                cfg = toy.ToyConfig(**{**overrides, "cdf_order": order, "seed": seed})
                res = run_one(cfg, groups, args.contexts, args.draws)
                print_run(res)
                results.append(res)
    finally:
        shutdown()

    print("\n== summary (mean / max over contexts)")
    print(f"   {'order':<8}{'seed':>5}{'TV k=2':>16}{'TV k=1x2':>16}{'TV indep':>16}"
          f"{'train s':>9}  result")
    for r in results:
        s = r["summary"]
        print(f"   {r['config']['cdf_order']:<8}{r['config']['seed']:>5}"
              f"{s['mean_tv_student_k2']:>9.4f} /{s['max_tv_student_k2']:.4f}"
              f"{s['mean_tv_chained_k1']:>9.4f} /{s['max_tv_chained_k1']:.4f}"
              f"{s['mean_tv_independent']:>9.4f} /{s['max_tv_independent']:.4f}"
              f"{r['train_seconds']:>9.1f}  {'PASS' if r['passed'] else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tv_bound": TV_BOUND, "contexts": args.contexts, "draws": args.draws,
            "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
