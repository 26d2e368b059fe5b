"""GPU readiness check: the whole GPU path of this project on one GPU in one command, under 8 minutes.

    python bench/gpu_check.py -o gpu_check --wheels wheelhouse   # on the GPU machine (offline)
    python bench/gpu_check.py -o /tmp/gc --dry-run                # CPU: tiny shapes (what the tests run)

Phases, each in its own process with its own time budget, all of them run even when one fails:

* ``install``: the wheels of ``--wheels`` (from ``tools/gpu_wheelhouse.sh``) whose distribution
  is missing here go into a scratch folder (``pip install --no-index --no-deps --target``, no
  registry), which subprocesses get on PYTHONPATH after this checkout; then deepspeed,
  megatron-core, datasets and kforcing_dist must import. Without ``--wheels`` only the imports.
* ``pytest_gpu``: ``pytest -m gpu`` over the test files that hold CUDA-marked tests.
* ``train_smoke``: ``train-teacher`` then ``distill --stage k1`` through the CLI, world size 1,
  ZeRO-1, bf16, NCCL (dry run: fp32, gloo); the loss falls in both, the teacher's checkpoint
  consolidates (``convert consolidate``), and the k1 export and the consolidated teacher decode
  (``generate``).
* ``decode_sweep``: ``bench/device_check.py`` (length 1024, CUDA graphs, bf16): AR vs PFLM
  k = 1, 2, 4 and lossless at batch 1, 8, 64, 256; tokens/s, k4/AR and the fraction of the
  card's memory bandwidth reached.
* ``distill_throughput``: ``bench/distill_throughput.py`` when present (else "not available"):
  supervised target tokens/s of stages k1 and k4 against the teacher's training tokens/s, same
  model and context (1024), and the teacher's MFU (6 x parameters x tokens/s over the card's
  dense bf16 peak; attention FLOPs not counted).

Writes into -o: summary.json, summary.md, logs/<phase>.log and each phase's own outputs; prints
one summary table. Exit code 0 when no phase failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("install", "pytest_gpu", "train_smoke", "decode_sweep", "distill_throughput")
# Seconds per phase on a GPU (total 460: under 8 minutes with start-up) and in the dry run
BUDGETS = {"install": 40, "pytest_gpu": 50, "train_smoke": 140, "decode_sweep": 140, "distill_throughput": 90}
DRY_BUDGETS = {"install": 120, "pytest_gpu": 120, "train_smoke": 240, "decode_sweep": 120,
               "distill_throughput": 120}
# Dense bf16 peak FLOP/s by card name (MFU); unknown cards get no MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
# The GPU-sized model of the throughput phase (device_check's default shape)
THROUGHPUT_MODEL = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
                    "model.max_seq_len=1024", "train.micro_batch_size=8", "distill.micro_batch_size=8"]
PROMPTS = "The function returns\nParameters\n"


class PhaseFailed(Exception):
    """A phase's check did not hold (the message says which)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--wheels", default=None, help="wheel folder from tools/gpu_wheelhouse.sh")
    p.add_argument("--prefix", default=None,
                   help="scratch folder to install the wheels into (default: a fresh temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, gloo, fp32, no CUDA graphs")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list, default all: {','.join(PHASES)}")
    p.add_argument("--smoke-config", default=str(ROOT / "configs" / "smoke.yaml"),
                   help="config of the train_smoke phase (default configs/smoke.yaml)")
    args = p.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    return args


class Check:
    """The shared state of one run: output folder, subprocess environment, mode, summary."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dry = args.dry_run
        self.prefix: Path | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.dry:
            # a GPU, if any, stays unused: the dry run is the CPU path of the same script
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=self.env.get("OMP_NUM_THREADS", "1"))
        self.set_pythonpath()
        self.deadline = 0.0

    def set_pythonpath(self):
        """This checkout first (its code is what is checked), then the installed wheels."""
        paths = [str(ROOT)] + ([str(self.prefix)] if self.prefix else [])
        rest = [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
        self.env["PYTHONPATH"] = os.pathsep.join(paths + rest)
        for p in reversed(paths):
            if p not in sys.path:
                sys.path.insert(0 if p == str(ROOT) else 1, p)

    def run(self, name: str, cmd: list, log: str) -> str:
        """Run ``cmd`` (appending its output to logs/<log>.log) within the phase's time left;
        returns its output; PhaseFailed on a non-zero exit or a timeout."""
        left = self.deadline - time.time()
        if left <= 1:
            raise PhaseFailed(f"no time left in the phase budget for {name}")
        cmd = [str(c) for c in cmd]
        with open(self.logs / f"{log}.log", "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=left)
            except subprocess.TimeoutExpired as exc:
                f.write(exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode())
                raise PhaseFailed(f"{name}: timed out after {left:.0f} s (see logs/{log}.log)") from None
            f.write(proc.stdout)
        if proc.returncode != 0:
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            raise PhaseFailed(f"{name}: exit {proc.returncode} (logs/{log}.log): {tail[-600:]}")
        return proc.stdout

    def cli(self, *args, log: str) -> str:
        return self.run(f"kforcing_dist {args[0]}", [sys.executable, "-m", "kforcing_dist", *args], log)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(wheels: list[Path], prefix: Path) -> None:
    """No registry: pip with --no-index, or, without pip, unpacking the (pure-layout) wheels."""
    try:
        import pip  # noqa: F401
    except ImportError:
        for w in wheels:
            zipfile.ZipFile(w).extractall(prefix)
        return
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "--target", str(prefix), *map(str, wheels)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PhaseFailed(f"pip install --target failed: {proc.stderr.strip()[-600:]}")


IMPORT_PROBE = """
import json, importlib.metadata as md
import deepspeed, megatron.core, datasets, kforcing_dist.model, kforcing_dist.parallel.groups
v = {n: md.version(n) for n in ("deepspeed", "megatron-core", "datasets", "torch")}
v["kforcing_dist"] = kforcing_dist.model.__file__
print("VERSIONS " + json.dumps(v))
"""


def phase_install(c: Check) -> dict:
    figures: dict = {}
    if c.args.wheels:
        wheels = sorted(Path(c.args.wheels).glob("*.whl"))
        if not wheels:
            raise PhaseFailed(f"no .whl files in {c.args.wheels}: build them with tools/gpu_wheelhouse.sh")
        c.prefix = Path(c.args.prefix) if c.args.prefix else Path(tempfile.mkdtemp(prefix="gpu-check-prefix-"))
        if c.prefix.exists():
            shutil.rmtree(c.prefix)
        c.prefix.mkdir(parents=True)
        dist = {w: normalise(w.name.split("-")[0]) for w in wheels}
        present = {d: installed_version(d) for d in dist.values()}
        todo = [w for w in wheels if present[dist[w]] is None]
        install_wheels(todo, c.prefix)
        c.set_pythonpath()
        figures["installed"] = sorted(dist[w] for w in todo)
        figures["already_present"] = {d: v for d, v in present.items() if v is not None}
        figures["prefix"] = str(c.prefix)
    out = c.run("import check", [sys.executable, "-c", IMPORT_PROBE], "install")
    line = next(x for x in out.splitlines() if x.startswith("VERSIONS "))
    figures["versions"] = json.loads(line[len("VERSIONS "):])
    return figures


def gpu_test_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu\b", p.read_text()))


def phase_pytest_gpu(c: Check) -> dict:
    xml = c.out / "pytest_gpu.xml"
    files = [p.relative_to(ROOT) for p in gpu_test_files()]
    try:
        c.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                f"--junitxml={xml}", *files], "pytest_gpu")
    finally:
        counts = junit_counts(xml) if xml.exists() else {}
    if not counts.get("tests"):
        raise PhaseFailed("pytest -m gpu collected no tests")
    return {"files": [str(f) for f in files], **counts}


def junit_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def loss_fell(run: Path) -> dict:
    """First and last logged training loss; PhaseFailed unless the last is below the first."""
    from kforcing_dist.training.metrics import read_log

    losses = [r["loss"] for r in read_log(run, "train")]
    if len(losses) < 2:
        raise PhaseFailed(f"{run}: fewer than 2 logged training losses")
    head, tail = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4):]
    first, last = sum(head) / len(head), sum(tail) / len(tail)
    if not last < first:
        raise PhaseFailed(f"{run}: the training loss did not fall ({first:.3f} -> {last:.3f})")
    return {"first": round(first, 4), "last": round(last, 4)}


def decoded_rows(path: Path) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if len(rows) != PROMPTS.count("\n") or not all(r["tokens"] for r in rows):
        raise PhaseFailed(f"{path}: expected one decoded row with tokens per prompt, got {rows}")
    return len(rows)


def phase_train_smoke(c: Check) -> dict:
    run = c.out / "smoke"
    if run.exists():
        shutil.rmtree(run)
    teacher_steps, k1_steps = (16, 16) if c.dry else (100, 60)
    common = ["-c", c.args.smoke_config, "--set", f"data.shards_dir={run / 'shards'}",
              "--set", "parallel.zero_stage=1", "--set", f"parallel.backend={'gloo' if c.dry else 'nccl'}",
              "--set", f"train.precision={'fp32' if c.dry else 'bf16'}", "--set", "train.log_interval=1",
              "--set", "train.eval_interval=0", "--set", "train.eval_batches=2", "--set", "logging.tensorboard=false",
              "--set", f"train.max_steps={teacher_steps}", "--set", f"checkpoint.save_interval={teacher_steps}",
              "--set", f"distill.stage_steps=[{k1_steps},{k1_steps},{k1_steps}]"]
    if c.dry:  # a smaller corpus and tokenizer sample: the dry run checks the path, not the model
        common += ["--set", "data.builtin_min_bytes=150000", "--set", "tokenizer.train_max_bytes=150000",
                   "--set", "train.warmup_steps=2", "--set", "distill.warmup_steps=2"]
    figures = {}
    t0 = time.time()
    c.cli("train-teacher", *common, "-o", run / "teacher", log="train_smoke")
    figures["teacher_s"] = round(time.time() - t0, 1)
    summary = json.loads((run / "teacher" / "teacher_summary.json").read_text())
    figures["teacher_tokens_per_s"] = round(summary["tokens_per_s"])
    figures["teacher_loss"] = loss_fell(run / "teacher")
    t0 = time.time()
    c.cli("distill", "--stage", "k1", *common, "-o", run, log="train_smoke")
    figures["k1_s"] = round(time.time() - t0, 1)
    figures["k1_loss"] = loss_fell(run / "k1")
    c.cli("convert", "consolidate", "--checkpoint", run / "teacher", "--out", run / "consolidated",
          log="train_smoke")
    if not list((run / "consolidated").glob("*.safetensors")):
        raise PhaseFailed("convert consolidate wrote no .safetensors")
    prompts = run / "prompts.txt"
    prompts.write_text(PROMPTS)
    for name, model in (("k1", run / "k1" / "export"), ("teacher", run / "consolidated")):
        path = c.out / f"generate_{name}.jsonl"
        c.cli("generate", "--model", model, "--prompts", prompts, "--out", path,
              "--set", "decode.max_new_tokens=8", log="train_smoke")
        figures[f"decoded_{name}"] = decoded_rows(path)
    return figures


def phase_decode_sweep(c: Check) -> dict:
    out = c.out / "decode"
    budget = max(10.0, c.deadline - time.time() - (15 if c.dry else 40))  # build + eager comparison after
    cmd = [sys.executable, ROOT / "bench" / "device_check.py", "-o", out, "--budget-s", f"{budget:.0f}"]
    if c.dry:
        cmd += ["--device", "cpu", "--tiny"]
    try:
        c.run("device_check", cmd, "decode_sweep")
    finally:
        report = json.loads((out / "device_check.json").read_text()) if (out / "device_check.json").exists() else {}
    bench = json.loads((out / "bench.json").read_text())
    correct = report["phases"]["correctness"]["result"]
    if not all(correct.values()):
        raise PhaseFailed(f"decoder correctness: {correct}")
    rows = bench["rows"]
    fractions = [r["bandwidth_fraction_of_peak"] for r in rows if r.get("bandwidth_fraction_of_peak")]
    return {"rows": len(rows), "skipped_cells": len(bench["skipped"]),
            "k4_over_ar": {str(r["batch"]): round(r["speedup_vs_ar"], 2) for r in rows
                           if r["mode"] == "pflm" and r["k"] == 4},
            "ar_tokens_per_s": {str(r["batch"]): round(r["tokens_per_s"]) for r in rows if r["mode"] == "ar"},
            "max_bandwidth_fraction": round(max(fractions), 3) if fractions else None,
            "length": report["settings"]["length"], "cuda_graphs": not c.dry}


def peak_flops(device_name: str) -> float | None:
    return next((f for name, f in PEAK_BF16_FLOPS.items() if name in device_name), None)


def teacher_parameters(config: str, overrides: list[str]) -> int:
    from kforcing_dist.config import load_config
    from kforcing_dist.parallel.plan import parameter_inventory, resolve_vocab_size

    cfg, _ = load_config(config, overrides)
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    return sum(p.numel for p in parameter_inventory(cfg.model, 1, noise_encoder=False))


def phase_distill_throughput(c: Check) -> dict:
    script = ROOT / "bench" / "distill_throughput.py"
    if not script.exists():
        return {"status": "not available", "why": "bench/distill_throughput.py is not in this checkout"}
    out = c.out / "distill_throughput.json"
    if c.dry:
        config, context, overrides = ROOT / "configs" / "smoke.yaml", 32, []
        extra = ["--device", "cpu", "--contexts", str(context), "--steps", "1", "--warmup", "0"]
    else:
        config, context, overrides = ROOT / "configs" / "demo.yaml", 1024, \
            THROUGHPUT_MODEL + ["parallel.zero_stage=1", "train.precision=bf16"]
        extra = ["--device", "cuda", "--contexts", str(context), "--steps", "3"]
    sets = [a for o in overrides for a in ("--set", o)]
    c.run("distill_throughput", [sys.executable, script, "-c", config, *sets, *extra, "--json-out", out],
          "distill_throughput")
    results = json.loads(out.read_text())["results"]
    cells = {r["k"]: r for r in results if r["context"] == context}
    missing = [k for k in (0, 1, 4) if k not in cells]
    if missing:
        raise PhaseFailed(f"distill_throughput.json lacks cells k={missing} at context {context}")
    figures = {"context": context, "teacher_tokens_per_s": round(cells[0]["tokens_per_s"]),
               "k1_target_tokens_per_s": round(cells[1]["tokens_per_s"]),
               "k4_target_tokens_per_s": round(cells[4]["tokens_per_s"]),
               "k1_over_teacher": round(cells[1]["ratio"], 3), "k4_over_teacher": round(cells[4]["ratio"], 3)}
    params = teacher_parameters(str(config), overrides)
    figures["teacher_parameters"] = params
    if not c.dry:
        import torch

        peak = peak_flops(torch.cuda.get_device_name())
        if peak:
            figures["teacher_mfu"] = round(6 * params * cells[0]["tokens_per_s"] / peak, 4)
    return figures


RUNNERS = {"install": phase_install, "pytest_gpu": phase_pytest_gpu, "train_smoke": phase_train_smoke,
           "decode_sweep": phase_decode_sweep, "distill_throughput": phase_distill_throughput}


def key_figures(name: str, fig: dict) -> str:
    """One line per phase for the table."""
    if not fig:
        return ""
    if name == "install":
        v = fig.get("versions", {})
        return (f"installed {len(fig.get('installed', []))}; deepspeed {v.get('deepspeed')}, "
                f"megatron-core {v.get('megatron-core')}, torch {v.get('torch')}")
    if name == "pytest_gpu":
        return f"{fig['passed']} passed, {fig['skipped']} skipped, {fig['failures'] + fig['errors']} failed"
    if name == "train_smoke":
        t, k = fig.get("teacher_loss", {}), fig.get("k1_loss", {})
        return (f"teacher loss {t.get('first')} -> {t.get('last')} ({fig.get('teacher_tokens_per_s')} tok/s), "
                f"k1 loss {k.get('first')} -> {k.get('last')}, consolidated, decoded")
    if name == "decode_sweep":
        k4 = ", ".join(f"b{b} {x}x" for b, x in fig["k4_over_ar"].items())
        return f"k4/AR {k4}; bandwidth {fig['max_bandwidth_fraction']} of peak; {fig['skipped_cells']} cells skipped"
    if name == "distill_throughput":
        if "why" in fig:  # not available
            return fig["why"]
        mfu = f", teacher MFU {fig['teacher_mfu']:.1%}" if fig.get("teacher_mfu") is not None else ""
        return (f"ctx {fig['context']}: teacher {fig['teacher_tokens_per_s']} tok/s, k1 {fig['k1_over_teacher']}x, "
                f"k4 {fig['k4_over_teacher']}x target tok/s{mfu}")
    return ""


def render(summary: dict) -> str:
    lines = [f"# GPU check: {summary['device']}{' (dry run)' if summary['dry_run'] else ''}", "",
             "| phase | status | seconds | key figures |", "|---|---|---|---|"]
    for name, p in summary["phases"].items():
        lines.append(f"| {name} | {p['status']} | {p['seconds']} | {p.get('key') or p.get('error', '')} |")
    lines += ["", f"total {summary['seconds']} s; exit {summary['exit_code']}"]
    return "\n".join(lines)


def device_description(dry: bool) -> str:
    if dry:
        return "CPU"
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    except Exception as exc:  # the summary still gets written
        return f"unknown ({type(exc).__name__}: {exc})"
    return "no CUDA device visible"


def main(argv=None) -> int:
    args = parse_args(argv)
    c = Check(args)
    start = time.time()
    summary = {"device": device_description(c.dry), "dry_run": c.dry, "phases": {}}
    budgets = DRY_BUDGETS if c.dry else BUDGETS
    for name in args.phases.split(","):
        t0 = time.time()
        c.deadline = t0 + budgets[name]
        entry = summary["phases"][name] = {"budget_s": budgets[name]}
        try:
            figures = RUNNERS[name](c)
            entry["status"] = figures.pop("status", "ok") if isinstance(figures, dict) else "ok"
            entry["figures"] = figures
            entry["key"] = key_figures(name, figures)
        except Exception as exc:  # recorded; the next phase runs all the same
            entry["status"] = "failed"
            entry["error"] = str(exc) if isinstance(exc, PhaseFailed) else f"{type(exc).__name__}: {exc}"
        entry["seconds"] = round(time.time() - t0, 1)
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s) "
              f"{entry.get('key') or entry.get('error', '')}", flush=True)
    failed = [n for n, p in summary["phases"].items() if p["status"] == "failed"]
    summary.update(seconds=round(time.time() - start, 1), failed=failed, exit_code=1 if failed else 0)
    (c.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = render(summary)
    (c.out / "summary.md").write_text(text + "\n")
    print(text, flush=True)
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
