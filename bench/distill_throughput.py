"""Distillation throughput against the teacher's: target tokens/s of each stage, the ratio, and where the time goes.

What it measures. For each context length (``--contexts``, default 256 1024) the teacher's
training step and each distillation stage's step (``distill.stages``, e.g. k1 k2 k4) of the
config (default ``configs/demo.yaml``; ``--set key=value`` as on the CLI) run through the
library's own :meth:`LMTrainer.train_step` (the engine and task the apps build), in one process
(world size 1). After ``--warmup`` steps of every cell, the cells take turns one step at a time
(round-robin, ``--steps`` rounds), so a change of load on a shared machine hits every cell alike.

Figures per cell: the mean step time; tokens per step (the teacher: training tokens,
``global batch x seq_len``; a stage: supervised slots, windows x k of the micro-batches the task
really drew); tokens/s; the ratio of a stage's target tokens/s to the teacher's training tokens/s
at the same context; and the step split into phases: ``targets`` (the frozen teacher's or
previous student's passes), ``forward`` (the training engine's forward), ``backward``, ``optim``
(the engine's step: clipping, AdamW, LR schedule) and ``other`` (the rest: noise, losses,
metrics). ``cpu`` is the ratio from the process's CPU time instead of wall time: on a shared,
loaded machine it moves less with other jobs' load (wall time counts the waits for a core). The
phases are timed by wrapping those calls on this run's objects only (with a device synchronise
around each on a GPU); the library's hot path carries no instrumentation. The frozen
models have random weights: the speed does not depend on them.

    PYTHONPATH=. python bench/distill_throughput.py [-c configs/demo.yaml] [--set key=value ...]
        [--device cpu|cuda] [--contexts 256 1024] [--steps 5] [--warmup 1] [--threads 2]
        [--json-out runs/bench/distill_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("targets", "forward", "backward", "optim", "other")


class PhaseClock:
    """Seconds spent in wrapped calls, per phase, since the last :meth:`reset`."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.target_tokens = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset(self) -> None:
        self.seconds = {p: 0.0 for p in PHASES}
        self.target_tokens = 0

    def wrap(self, obj, attr: str, phase: str) -> None:
        """Replace ``obj.attr`` (this object only) by a timed call of it."""
        call = getattr(obj, attr)

        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[phase] += time.perf_counter() - start

        setattr(obj, attr, timed)

    def count_slots(self, task) -> None:
        """Count the supervised slots of the windows ``task`` draws (windows x k per micro-batch)."""
        draw = task._draw_slots

        def counted(batch, gen):
            starts, u, tau = draw(batch, gen)
            self.target_tokens += u.shape[0] * u.shape[1] * u.shape[2]
            return starts, u, tau

        task._draw_slots = counted


def context_config(cfg, context: int):
    """A copy of ``cfg`` whose teacher and stages train on ``context``-token sequences."""
    import copy

    out = copy.deepcopy(cfg)
    out.train.seq_len = context
    out.distill.seq_len = 0
    # windows of the last context token reach position context - 1 + k
    out.model.max_seq_len = max(out.model.max_seq_len, context + max(out.distill.stages))
    if out.model.vocab_size == 0:  # the tokenizer's size: the config's sentencepiece/BPE target size
        out.model.vocab_size = out.tokenizer.vocab_size
    return out


def build_trainer(cfg, k: int, groups, layout_world: int, out_dir: Path):
    """The trainer of stage ``k`` (0: the AR teacher) built as the apps build it, with randomly
    initialised models (the frozen teacher / previous student included)."""
    import torch

    from kforcing_dist.config import derive_layout
    from kforcing_dist.distill.frozen import hold_frozen
    from kforcing_dist.distill.task import DistillTask
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.stage import TEACHER, Stage
    from kforcing_dist.training.task import LMTask
    from kforcing_dist.training.trainer import LMTrainer

    stage = Stage(cfg, TEACHER if k == 0 else k)
    noise = None if k == 0 else Stage(cfg, 1).noise(None)
    scfg = stage.config(None, noise)
    layout = derive_layout(scfg, layout_world)
    padded = pad_vocab_size(scfg.model.vocab_size, scfg.model.make_vocab_size_divisible_by, layout.tp)
    torch.manual_seed(0)

    def model_of(of: Stage):
        return of.build_model(scfg.model, padded, groups, layout.pp, noise=None if of.is_teacher else noise)

    if k == 0:
        task = LMTask(groups.tp_group)
    else:
        ar = hold_frozen(model_of(Stage(cfg, TEACHER)), groups, scfg, layout) if stage.needs_ar_teacher else None
        prev = hold_frozen(model_of(Stage(cfg, k // 2)), groups, scfg, layout) \
            if stage.needs_previous_student else None
        task = DistillTask(k, scfg.distill, groups, ar_teacher=ar, prev_student=prev)
    return LMTrainer(scfg, "", groups, layout, model_of(stage), task, sampler=None, valid_batches=None,
                     output_dir=out_dir, extra_metadata={})


class Cell:
    """One (context, stage) of the table: its trainer, its random batches and its phase clock."""

    def __init__(self, context: int, k: int, trainer, device):
        import torch

        self.context, self.k, self.trainer = context, k, trainer
        self.name = "teacher" if k == 0 else f"k{k}"
        self.clock = PhaseClock(device)
        engine = trainer.engine
        self.clock.wrap(engine, "forward", "forward")
        self.clock.wrap(engine, "backward", "backward")
        self.clock.wrap(engine, "step", "optim")
        if k:
            self.clock.wrap(trainer.task, "_targets", "targets")
            self.clock.count_slots(trainer.task)
        self.gen = torch.Generator().manual_seed(1000 + 10 * context + k)
        self.device = device
        self.steps: list[dict] = []

    def run_step(self) -> dict:
        import torch

        cfg, layout = self.trainer.cfg, self.trainer.layout
        batches = [torch.randint(0, cfg.model.vocab_size, (layout.micro_batch_size, cfg.train.seq_len),
                                 generator=self.gen).to(self.device) for _ in range(layout.grad_accum)]
        self.clock.reset()
        self.clock._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.trainer.train_step(batches)
        self.clock._sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        phases = dict(self.clock.seconds)
        phases["other"] = seconds - sum(phases.values())
        tokens = self.clock.target_tokens if self.k else self.trainer.tokens_per_step
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "phases": phases}

    def summary(self) -> dict:
        n = len(self.steps)
        step_s = sum(s["seconds"] for s in self.steps) / n
        tokens = sum(s["tokens"] for s in self.steps) / n
        return {"context": self.context, "stage": self.name, "k": self.k, "steps": n,
                "step_s": step_s, "median_step_s": statistics.median(s["seconds"] for s in self.steps),
                "min_step_s": min(s["seconds"] for s in self.steps),
                "micro_batch_size": self.trainer.layout.micro_batch_size,
                "cpu_step_s": sum(s["cpu_seconds"] for s in self.steps) / n,
                "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
                "phases_s": {p: sum(s["phases"][p] for s in self.steps) / n for p in PHASES}}


def measure(cfg, contexts, device, steps: int, warmup: int, groups, out_dir: Path) -> list[dict]:
    """Every cell's summary (teacher first per context), with ``ratio`` to the teacher's tokens/s."""
    cells = []
    for context in contexts:
        ccfg = context_config(cfg, context)
        for k in (0, *ccfg.distill.stages):
            trainer = build_trainer(ccfg, k, groups, 1, out_dir / f"c{context}-k{k}")
            trainer.engine.train()
            cells.append(Cell(context, k, trainer, device))
    for cell in cells:
        for _ in range(warmup):
            cell.run_step()
    for _ in range(steps):
        for cell in cells:  # round-robin: load changes hit every cell alike
            cell.steps.append(cell.run_step())
    results = [c.summary() for c in cells]
    teacher = {r["context"]: r["tokens_per_s"] for r in results if r["k"] == 0}
    teacher_cpu = {r["context"]: r["tokens_per_step"] / r["cpu_step_s"] for r in results if r["k"] == 0}
    for r in results:
        r["ratio"] = r["tokens_per_s"] / teacher[r["context"]]
        r["cpu_ratio"] = r["tokens_per_step"] / r["cpu_step_s"] / teacher_cpu[r["context"]]
    return results


def table(results: list[dict]) -> str:
    head = (f"{'context':>7} {'cell':>7} {'step ms':>8} {'tok/step':>8} {'tok/s':>8} {'ratio':>6} {'cpu':>6} | "
            + " ".join(f"{p:>8}" for p in PHASES) + "  (ms per step)")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['context']:>7} {r['stage']:>7} {r['step_s'] * 1000:>8.0f} {r['tokens_per_step']:>8.0f} "
                     f"{r['tokens_per_s']:>8.0f} {r['ratio']:>5.2f}x {r['cpu_ratio']:>5.2f}x | "
                     + " ".join(f"{r['phases_s'][p] * 1000:>8.0f}" for p in PHASES))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as on the CLI (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=5, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per cell first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or any(c < 2 for c in args.contexts):
        p.error("--steps must be >= 1, --warmup >= 0 and every context >= 2")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # init_distributed takes a GPU whenever it sees one
    import torch

    from kforcing_dist.app.runtime import setup_logging
    from kforcing_dist.config import check, load_config
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(1)  # warnings only
    cfg, _ = load_config(args.config, args.overrides)
    for context in args.contexts:
        check(context_config(cfg, context), 1, check_files=False, source=args.config)
    device = init_distributed(resolve_launch(), "auto")
    groups = init_model_parallel(1, 1, device)
    try:
        with tempfile.TemporaryDirectory(prefix="distill-throughput-") as tmp:
            results = measure(cfg, args.contexts, device, args.steps, args.warmup, groups, Path(tmp))
    finally:
        shutdown()
    print(table(results), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": args.config, "overrides": args.overrides, "device": str(device),
                "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup}
        args.json_out.write_text(json.dumps({"args": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
