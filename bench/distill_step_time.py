"""Step time of one distillation step (stage k=2, self-forcing) at several TP x PP layouts.

What it measures. The same k=2 stage (frozen k=1 student making the targets with its double
pass, then the k=2 student's forward, backward and ZeRO-1 AdamW step, all through the library's
``LMTrainer.train_step`` on the trainer the distill app builds) is timed at each layout
given by ``--layouts TPxPP`` (default 1x1 2x1 1x2), each in its own ``torchrun`` job on this
machine (gloo on CPU, NCCL on GPU). A step is one global batch of ``--global-batch`` sequences
in 2 micro-batches; the pipeline layouts pipeline those micro-batches. The model: ``--layers``
blocks of width ``--hidden``, context ``--seq`` tokens, all windows of up to ``--slots`` slots.
Prints one line per layout (mean and min step time after ``--warmup`` steps) and writes them
to ``--out`` (JSON). On a 2-core CPU the parallel layouts are slower: the figure is the
overhead of the split, not a speed-up.

    .venv/bin/python bench/distill_step_time.py [--layouts 1x1 2x1 1x2 2x2] [--steps 5]
        [--hidden 128] [--layers 4] [--seq 64] [--out runs/bench/distill_step_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args) -> None:
    import tempfile

    import torch
    import torch.distributed as dist

    from distill_throughput import build_trainer
    from kforcing_dist.config import load_config
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = resolve_launch()
    dp = info.world_size // (args.tp * args.pp)
    micro = args.global_batch // 2 // dp
    cfg, _ = load_config(None, [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=4",
        f"model.max_seq_len={args.seq + 8}", f"model.vocab_size={args.vocab}", f"train.seq_len={args.seq}",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={args.global_batch}",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "parallel.zero_stage=1", "train.grad_clip=1.0",
        f"distill.max_window_slots={args.slots}", "distill.stages=[1,2]", "distill.micro_batch_size=0",
        "distill.max_steps=1000"])
    device = init_distributed(info, "auto")
    groups = init_model_parallel(args.tp, args.pp, device)
    with tempfile.TemporaryDirectory(prefix="distill-step-time-") as tmp:
        # the stage-2 trainer the distill app builds (random frozen k=1 student), stepped by train_step
        trainer = build_trainer(cfg, 2, groups, info.world_size, Path(tmp))
        gen = torch.Generator().manual_seed(1)
        times = []
        for step in range(args.warmup + args.steps):
            batches = [torch.randint(0, args.vocab, (micro, args.seq), generator=gen)
                       for _ in range(trainer.layout.grad_accum)]
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    if info.rank == 0:
        print("RESULT " + json.dumps({"tp": args.tp, "pp": args.pp, "world_size": info.world_size,
                                      "mean_s": sum(times) / len(times), "min_s": min(times),
                                      "steps": len(times)}), flush=True)
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP, one job each")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--slots", type=int, default=64, help="distill.max_window_slots")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "distill_step_time.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    results = []
    for i, spec in enumerate(args.layouts):
        tp, pp = (int(x) for x in spec.lower().split("x"))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp * pp}",
               f"--master_port={29700 + i}", __file__, "--worker", f"--tp={tp}", f"--pp={pp}",
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("steps", "warmup", "hidden", "layers", "seq", "vocab", "slots", "global_batch")]]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"layout {spec} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"TP={tp} PP={pp} ({tp * pp} processes): {r['mean_s'] * 1000:.0f} ms/step mean, "
              f"{r['min_s'] * 1000:.0f} ms min over {r['steps']} steps", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))


if __name__ == "__main__":
    main()
