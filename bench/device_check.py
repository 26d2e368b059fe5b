"""GPU device check: the default-size model (12 layers, 768 wide, 12 heads, vocab 50k, random
weights) through the decode benchmark at length 1024, in under 8 minutes on one H100/H200.

    python bench/device_check.py -o device_check            # on a GPU machine
    python bench/device_check.py -o /tmp/dc --device cpu --tiny   # dry run (what the tests run)

Writes into -o: bench.json / bench.md / PNG plots (CUDA graphs, bf16: the fast path), an eager
comparison (eager.json: the same engine without graphs at batch 1 and 64), and
device_check.json (environment, correctness checks, timings, errors). Every phase is guarded:
a failing phase is recorded and the next one runs; cells that would pass the time budget are
skipped and listed, so the folder always holds what was measured. Exit code 0 when every phase
ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from kforcing_dist.decode import generate, generate_lossless  # noqa: E402
from kforcing_dist.decode.bench import (bench_sweep, device_name, random_models,  # noqa: E402
                                        render_bench_markdown, write_bench)

DEFAULT_MODEL = dict(vocab_size=50257, make_vocab_size_divisible_by=128, hidden_size=768,
                     num_layers=12, num_heads=12, num_kv_heads=0, ffn_hidden_size=0,
                     max_seq_len=1024, norm="layernorm", norm_bias=False, norm_eps=1e-5,
                     activation="gelu_tanh", mlp_bias=True, qkv_bias=False, attn_out_bias=False,
                     position="rope", rope_base=10000.0, tie_embeddings=False, lm_head_bias=False,
                     init_std=0.02, attention_backend="auto")
TINY_MODEL = {**DEFAULT_MODEL, "vocab_size": 512, "make_vocab_size_divisible_by": 64,
              "hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_seq_len": 128}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and grid (dry run)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new cells after this many seconds (default 420: the "
                        "whole script stays under 8 minutes)")
    p.add_argument("--batches", default=None, help="default 1,8,64,256 (tiny: 1,2)")
    p.add_argument("--length", type=int, default=None,
                   help="context + new tokens (default 1024; tiny: 24)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (tiny: 8)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    return p.parse_args(argv)


class Phases:
    """Runs named phases, recording time, result or the error of each."""

    def __init__(self, report: dict):
        self.report = report
        self.failed = False

    def run(self, name, fn):
        t0 = time.time()
        entry = self.report.setdefault("phases", {})[name] = {}
        try:
            entry["result"] = fn()
            entry["ok"] = True
        except Exception as exc:  # recorded, and the next phase still runs
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-3000:])
            self.failed = True
        entry["seconds"] = round(time.time() - t0, 2)
        print(f"[device_check] {name}: {'ok' if entry['ok'] else entry['error']} "
              f"({entry['seconds']} s)", flush=True)
        return entry.get("result")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_check: CUDA is not available; use --device cpu --tiny for a dry run",
              file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    model_cfg = TINY_MODEL if args.tiny else DEFAULT_MODEL
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,64,256")).split(",")]
    length = args.length or (24 if args.tiny else 1024)
    new_tokens = args.new_tokens or (8 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    context = length - new_tokens
    report = {"device": device_name(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "dtype": str(dtype), "model": model_cfg,
              "settings": {"batches": batches, "length": length, "context": context,
                           "new_tokens": new_tokens, "repeats": repeats,
                           "budget_s": args.budget_s}}
    if gpu:
        report["capability"] = torch.cuda.get_device_capability(device)
        report["memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.backends.cuda.matmul.allow_tf32 = True
    phases = Phases(report)
    models = phases.run("build", lambda: random_models(
        model_cfg, max_k=4, device=device, dtype=dtype, max_seq_len=length + 16))
    if models is None:
        write_json(out / "device_check.json", report)
        return 1
    ar, pflm = models
    report["params"] = {"ar": sum(p.numel() for p in ar.parameters()),
                        "pflm": sum(p.numel() for p in pflm.parameters())}

    def correctness():
        # float32 tiny models with peaked logits (std 0.3): kernels of other shapes may differ
        # in round-off, and bf16 random models with flat logits would flip argmaxes on that
        ar, pflm = random_models(TINY_MODEL, max_k=4, device=device, dtype=torch.float32,
                                 seed=11, std=0.3)
        prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
        res = {}
        for name, fn in (
                ("pflm_graphs_equal_eager", lambda g: generate(
                    pflm, prompts, mode="pflm", k=4, max_new_tokens=12, seed=1, cuda_graphs=g)),
                ("ar_graphs_equal_eager", lambda g: generate(
                    ar, prompts, mode="ar", sampling="inverse_cdf", max_new_tokens=12, seed=1,
                    cuda_graphs=g)),
                ("lossless_graphs_equal_eager", lambda g: generate_lossless(
                    pflm, ar, prompts, k=4, max_new_tokens=12, seed=1, cuda_graphs=g))):
            res[name] = fn(False).tokens == fn(gpu).tokens
        ref = generate(ar, prompts, mode="ar", sampling="inverse_cdf", max_new_tokens=12, seed=1)
        ll = generate_lossless(pflm, ar, prompts, k=4, max_new_tokens=12, seed=1)
        res["lossless_equals_teacher"] = ll.tokens == ref.tokens
        return res

    phases.run("correctness", correctness)
    deadline = start + args.budget_s

    def main_sweep():
        result = bench_sweep(ar, pflm, batches=batches, ks=[1, 2, 4], contexts=[context],
                             new_tokens=new_tokens, repeats=repeats, cuda_graphs=gpu,
                             deadline=deadline, progress=lambda r: print(
                                 f"  {r['mode']} k={r['k']} b={r['batch']}: "
                                 f"{r['tokens_per_s']:,.0f} tok/s ({r['speedup_vs_ar']:.2f}x)",
                                 flush=True))
        result["source"] = {"weights": "random", "script": "bench/device_check.py"}
        write_bench(result, out)
        print(render_bench_markdown(result), flush=True)
        return {"rows": len(result["rows"]), "skipped": result["skipped"],
                "k4_speedup": {r["batch"]: r["speedup_vs_ar"] for r in result["rows"]
                               if r["mode"] == "pflm" and r["k"] == 4}}

    phases.run("bench_sweep", main_sweep)

    def eager_sweep():
        small = [b for b in batches if b in (1, 64)] or batches[:1]
        result = bench_sweep(ar, pflm, batches=small, ks=[4], contexts=[context],
                             new_tokens=new_tokens, repeats=repeats, lossless=False,
                             cuda_graphs=False, deadline=start + args.budget_s + 30)
        write_json(out / "eager.json", result)
        return {(f"{r['mode']}{r['k']}_b{r['batch']}"): r["tokens_per_s"] for r in result["rows"]}

    if gpu:
        phases.run("eager_comparison", eager_sweep)
    report["seconds"] = round(time.time() - start, 1)
    if gpu:
        report["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    write_json(out / "device_check.json", report)
    print(f"[device_check] done in {report['seconds']} s; outputs in {out}", flush=True)
    return 1 if phases.failed else 0


if __name__ == "__main__":
    sys.exit(main())
