"""Decode speed in one engine: the AR teacher, PFLM k=1,2,4 and lossless mode, side by side.

:func:`speed_run` times one cell (EOS ignored, so every run generates exactly ``new_tokens`` per
sequence; one untimed warm-up run first: allocations, kernel selection, graph capture).
:func:`bench_sweep` runs the grid batch x mode/k x context (per batch, the cells' timed runs
interleaved round-robin, so load changes on a shared machine hit every mode alike) and returns
rows with median and spread, the ratio to AR measured in the same run, analytic FLOPs per
output token and, on GPU, the achieved memory bandwidth against the card's peak.
:func:`write_bench` writes ``bench.json``, ``bench.md`` and two PNG plots (tokens/s and
speedup vs batch). Every output names the device. Plain torch (+ matplotlib for the plots, imported only there).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..fsio import write_atomic, write_text_atomic
from ..nn.noise import DEFAULT_NOISE_MAX_FREQ, noise_section
from .errors import DecodeError
from .format import FORMAT_VERSION, MODEL_FIELDS
from .generate import generate, generate_lossless
from .model import DecoderLM
from .penalty import PenaltySetting, penalty_for_mode

BENCH_MODES = ("ar", "pflm", "lossless")
ROW_FIELDS = ("device", "mode", "k", "batch", "context", "tokens_per_s", "tokens_per_s_min",
              "tokens_per_s_max", "speedup_vs_ar")
# Peak HBM bandwidth (bytes/s) of common cards, matched against torch.cuda.get_device_name.
# SXM figures; PCIe variants are listed first where their names differ.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-PCIE-40GB", 1.555e12), ("A100-SXM4-40GB", 1.555e12), ("A100", 2.039e12),
                  ("L40S", 0.864e12), ("4090", 1.008e12), ("A10G", 0.6e12), ("L4", 0.3e12))


def device_name(device: torch.device | str = "cpu") -> str:
    """A human-readable device name for reports: the GPU's name, or the CPU and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_bandwidth(device: torch.device | str) -> Optional[float]:
    """The card's peak memory bandwidth in bytes/s, or None (CPU, unknown card)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw
    return None


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_run(model: DecoderLM, *, mode: str, k: int = 1, batch: int = 1, prompt_len: int = 32,
              new_tokens: int = 64, repeats: int = 3, seed: int = 0,
              prompts: Optional[list[list[int]]] = None,
              teacher: Optional[DecoderLM] = None, cuda_graphs: bool = False,
              frequency_penalty: float = 0.0) -> dict:
    """Median decode tokens/s (prefill excluded) over ``repeats`` timed runs, with the details.

    mode "ar" / "pflm" as ``generate``; "lossless": ``model`` drafts, ``teacher`` verifies.
    ``tokens_per_second_e2e`` includes the prefill. ``cuda_graphs``: see ``generate``.
    ``frequency_penalty``: the (resolved) penalty of this cell's decode (lossless: the draft's).
    """
    _check_repeats(repeats)
    prompts = prompts or random_prompts(batch, prompt_len, model.vocab_size, seed)
    run = _runner(model, mode, k, prompts, new_tokens, seed, teacher, cuda_graphs,
                  frequency_penalty)
    run()
    return _summarise(mode, k, prompts, new_tokens, [run() for _ in range(repeats)])


def _check_repeats(repeats) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DecodeError(f"repeats must be a positive integer, got {repeats!r}")


def _runner(model, mode, k, prompts, new_tokens, seed, teacher, cuda_graphs, frequency_penalty):
    """A no-argument function running one generation of the cell (EOS ignored)."""
    if mode not in BENCH_MODES:
        raise DecodeError(f"mode must be one of {BENCH_MODES}, got {mode!r}")
    kw = dict(k=k, max_new_tokens=new_tokens, seed=seed, ignore_eos=True,  # exactly new_tokens
              cuda_graphs=cuda_graphs, frequency_penalty=frequency_penalty)
    if mode == "lossless":
        if teacher is None:
            raise DecodeError("mode 'lossless' needs the AR teacher (teacher=)")
        return lambda: generate_lossless(model, teacher, prompts, **kw)
    return lambda: generate(model, prompts, mode=mode, **kw)


def _summarise(mode, k, prompts, new_tokens, runs) -> dict:
    tps = [r.tokens_per_second for r in runs]
    e2e = [r.new_tokens / (r.seconds + r.prefill_seconds) for r in runs]
    out = {"mode": mode, "k": k, "batch": len(prompts), "prompt_len": len(prompts[0]),
           "new_tokens": new_tokens, "steps": runs[0].steps,
           "tokens_per_second": statistics.median(tps), "all_tokens_per_second": tps,
           "tokens_per_second_e2e": statistics.median(e2e),
           "decode_seconds": statistics.median(r.seconds for r in runs),
           "prefill_seconds": statistics.median(r.prefill_seconds for r in runs)}
    if mode == "lossless":
        out["acceptance_length"] = statistics.median(r.acceptance_length for r in runs)
        out["steps"] = statistics.median(r.steps for r in runs)
    return out


# --------------------------------------------------------------------------------------------
# Analytic cost model: FLOPs per output token and bytes per step (lower bounds: weights once,
# the attended KV cache once; activations and logits ignored).


def _matmul_params(model: DecoderLM) -> tuple[int, int, int]:
    """(per-position block weights, head weights, noise-encoder weights): multiply-adds per row."""
    blocks = sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("weight")
                 and p.dim() == 2)
    head = model.hidden_size * model.padded_vocab_size
    noise = 0
    if model.noise_encoder is not None:
        noise = sum(p.numel() for p in model.noise_encoder.parameters() if p.dim() == 2)
    return blocks, head, noise


def _pass_cost(model: DecoderLM, positions: float, head_rows: float, noise_rows: float,
               key_len: float, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward of ``positions`` rows per sequence over ``key_len`` keys."""
    blocks, head, noise = _matmul_params(model)
    H = model.model_config["num_heads"] * model.head_dim
    flops = batch * (2 * blocks * positions + 2 * head * head_rows + 2 * noise * noise_rows
                     + 4 * model.num_layers * H * key_len * positions)
    elem = model.dtype.itemsize
    weights = (blocks + head + (noise if noise_rows else 0)) * elem
    kv = 2 * model.num_layers * batch * model.num_kv_heads * model.head_dim * key_len * elem
    return flops, weights + kv


def cost_model(mode: str, k: int, batch: int, context: int, new_tokens: int, model: DecoderLM,
               teacher: Optional[DecoderLM] = None, acceptance_length: Optional[float] = None,
               steps: Optional[float] = None) -> dict:
    """FLOPs per output token and bytes read per decode pass (mean key length: middle of the
    run). Lossless counts the draft and the verify pass of each round."""
    key_len = context + new_tokens / 2
    if mode == "ar":
        flops, nbytes = _pass_cost(model, 1, 1, 0, key_len, batch)
        per_step_tokens = 1.0
    elif mode == "pflm":
        flops, nbytes = _pass_cost(model, 2 * k, k, k, key_len, batch)
        per_step_tokens = float(k)
    else:
        acc = acceptance_length or 1.0
        f1, b1 = _pass_cost(model, acc + k, k, k, key_len, batch)
        f2, b2 = _pass_cost(teacher, k + 1, k + 1, 0, key_len, batch)
        flops, nbytes, per_step_tokens = f1 + f2, b1 + b2, acc
    return {"flops_per_token": flops / (batch * per_step_tokens), "bytes_per_step": nbytes}


# --------------------------------------------------------------------------------------------
# The sweep


def bench_sweep(ar_model: DecoderLM, pflm_model: Optional[DecoderLM], *, batches: Sequence[int],
                ks: Sequence[int], contexts: Sequence[int], new_tokens: int, repeats: int,
                lossless: bool = True, seed: int = 0, cuda_graphs: bool = False,
                progress: Optional[Callable[[dict], None]] = None,
                deadline: Optional[float] = None,
                frequency_penalty: PenaltySetting = 0.0) -> dict:
    """Every cell of batch x context x (AR, PFLM k for k in ``ks``, lossless k): one dict with
    ``rows`` (the fields of ROW_FIELDS and more) and the settings. ``progress`` gets each row.
    ``frequency_penalty``: a ``decode.frequency_penalty`` setting, resolved per cell as
    ``generate`` decodes (:func:`.penalty.penalty_for_mode`; lossless: the draft's penalty).
    ``deadline`` (a time.time() value): cells not started by then are listed in ``skipped``
    instead of run, so a time-limited job still writes what it measured."""
    _check_sweep(ar_model, pflm_model, batches, ks, contexts, new_tokens, repeats)
    penalties = {(mode, k): penalty_for_mode(frequency_penalty, mode, k)
                 for mode, k in [("ar", 1)] + [(m, k) for m in ("pflm", "lossless") for k in ks]}
    dev = ar_model.device
    name = device_name(dev)
    peak = peak_bandwidth(dev)
    ks = [k for k in ks if pflm_model is not None and k <= pflm_model.max_k]
    rows, skipped = [], []
    t0 = time.time()
    for context in contexts:
        for batch in batches:
            prompts = random_prompts(batch, context, ar_model.vocab_size, seed)
            cells = [("ar", 1)] + [("pflm", k) for k in ks]
            if lossless:
                cells += [("lossless", k) for k in ks]
            # Warm up every cell, then time them round-robin (one run of each cell per round):
            # on a shared machine a load change then hits every mode alike, not one cell.
            runners = {}
            for mode, k in cells:
                if (deadline is not None and time.time() > deadline) or \
                        (mode != "ar" and ("ar", 1) not in runners):
                    skipped.append({"mode": mode, "k": k, "batch": batch, "context": context})
                    continue
                model = ar_model if mode == "ar" else pflm_model
                runners[(mode, k)] = _runner(model, mode, k, prompts, new_tokens, seed,
                                             ar_model if mode == "lossless" else None,
                                             cuda_graphs, penalties[(mode, k)])
                runners[(mode, k)]()
            timed = {cell: [] for cell in runners}
            for _ in range(repeats):
                for cell, run in runners.items():
                    timed[cell].append(run())
            ar_tps = None
            for (mode, k), runs in timed.items():
                run = _summarise(mode, k, prompts, new_tokens, runs)
                model = ar_model if mode == "ar" else pflm_model
                tps = run["all_tokens_per_second"]
                if mode == "ar":
                    ar_tps = run["tokens_per_second"]
                cost = cost_model(mode, k, batch, context, new_tokens, model, ar_model,
                                  run.get("acceptance_length"))
                passes_per_s = run["steps"] / run["decode_seconds"]
                bandwidth = cost["bytes_per_step"] * passes_per_s if dev.type == "cuda" else None
                row = {"device": name, "mode": mode, "k": k, "batch": batch, "context": context,
                       "tokens_per_s": run["tokens_per_second"], "tokens_per_s_min": min(tps),
                       "tokens_per_s_max": max(tps),
                       "speedup_vs_ar": run["tokens_per_second"] / ar_tps,
                       "e2e_tokens_per_s": run["tokens_per_second_e2e"],
                       "steps": run["steps"], "new_tokens": new_tokens, "repeats": repeats,
                       "flops_per_token": cost["flops_per_token"],
                       "achieved_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
                       "bandwidth_fraction_of_peak": None if bandwidth is None or peak is None
                       else bandwidth / peak,
                       "acceptance_length": run.get("acceptance_length"),
                       "frequency_penalty": penalties[(mode, k)]}
                rows.append(row)
                if progress is not None:
                    progress(row)
    return {"device": name, "torch": torch.__version__, "dtype": str(ar_model.dtype).split(".")[-1],
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "peak_bandwidth_gb_s": None if peak is None else peak / 1e9,
            "settings": {"batches": list(batches), "ks": list(ks), "contexts": list(contexts),
                         "new_tokens": new_tokens, "repeats": repeats, "lossless": lossless,
                         "seed": seed, "cuda_graphs": cuda_graphs,
                         "frequency_penalty": frequency_penalty},
            "models": {"ar": _describe(ar_model),
                       "pflm": None if pflm_model is None else _describe(pflm_model)},
            "seconds": time.time() - t0, "rows": rows, "skipped": skipped}


def _describe(model: DecoderLM) -> dict:
    m = model.model_config
    return {"layers": m["num_layers"], "hidden": m["hidden_size"], "heads": m["num_heads"],
            "vocab": model.vocab_size, "params": sum(p.numel() for p in model.parameters()),
            "kind": model.kind, "max_k": model.max_k}


def _positive_ints(values, name: str) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise DecodeError(f"{name} must be a non-empty list of positive integers, got {values!r}")


def _check_sweep(ar_model, pflm_model, batches, ks, contexts, new_tokens, repeats) -> None:
    if not isinstance(ar_model, DecoderLM) or ar_model.kind != "ar":
        raise DecodeError("the bench needs the AR teacher (a DecoderLM of kind 'ar')")
    if pflm_model is not None and (not isinstance(pflm_model, DecoderLM)
                                   or pflm_model.kind != "pflm"):
        raise DecodeError("the PFLM of the bench must be a DecoderLM of kind 'pflm'")
    for values, name in ((batches, "batches"), (ks, "ks"), (contexts, "contexts"),
                         ([new_tokens], "new_tokens"), ([repeats], "repeats")):
        _positive_ints(list(values), name)
    longest = max(contexts) + new_tokens + 2 * max(ks) + 2
    for model in (ar_model, pflm_model):
        if model is not None and not model.rope and longest > model.max_seq_len:
            raise DecodeError(f"context {max(contexts)} + {new_tokens} new tokens (+ 2k+2 "
                              f"scratch) exceed the learned max_seq_len={model.max_seq_len}; "
                              f"use shorter contexts or fewer new tokens")


# --------------------------------------------------------------------------------------------
# Random-weight models of a given architecture (speed does not depend on the weights)


def random_models(model_config: dict, *, max_k: int, device="cpu", dtype=torch.float32,
                  seed: int = 0, padded_vocab_size: Optional[int] = None,
                  max_seq_len: Optional[int] = None, std: float = 0.02,
                  noise_features: str = "rising",
                  noise_max_freq: Optional[float] = DEFAULT_NOISE_MAX_FREQ) -> tuple[DecoderLM, DecoderLM]:
    """(AR teacher, PFLM) of the architecture ``model_config`` (ModelConfig fields) with random
    N(0, std) weights; vocab_size must be set; max_seq_len may be raised for long contexts.
    ``noise_features``/``noise_max_freq``: the PFLM's noise-feature convention (nn.noise)."""
    m = {k: v for k, v in model_config.items() if k in MODEL_FIELDS}
    if m.get("vocab_size", 0) < 1:
        raise DecodeError("random_models needs model_config['vocab_size'] > 0")
    if max_seq_len:
        m["max_seq_len"] = max(m["max_seq_len"], max_seq_len)
    div = m.get("make_vocab_size_divisible_by", 64) or 1
    padded = padded_vocab_size or -(-m["vocab_size"] // div) * div
    out = []
    for i, kind in enumerate(("ar", "pflm")):
        cfg = {"format": FORMAT_VERSION, "kind": kind, "model": m, "padded_vocab_size": padded,
               "max_k": max_k if kind == "pflm" else None,
               "noise": noise_section(noise_features, noise_max_freq) if kind == "pflm" else None,
               "masked_token_ids": [], "eos_id": None}
        model = DecoderLM(cfg, dtype=torch.float32).init_random_(seed + i, std=std)
        out.append(model.to(device=device, dtype=dtype).eval())
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Outputs


def render_bench_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Decode benchmark on {result['device']}", "",
             f"torch {result['torch']}, {result['dtype']}, {s['new_tokens']} new tokens per "
             f"sequence, median of {s['repeats']} timed runs after a warm-up (min-max in "
             f"brackets); decode-only tokens/s, end-to-end (with prefill) in the e2e column. "
             f"Same engine for every mode: static KV cache"
             f"{', CUDA graphs' if s.get('cuda_graphs') else ''}; AR samples with "
             f"torch.multinomial.{_penalty_sentence(result['rows'])}",
             ""]
    for name, d in result["models"].items():
        if d:
            lines.append(f"- {name}: {d['layers']} layers, width {d['hidden']}, {d['heads']} "
                         f"heads, vocab {d['vocab']}, {d['params']:,} parameters")
    lines += ["", "| context | batch | mode | k | tokens/s | e2e tokens/s | vs AR | accept len "
              "| MFLOP/token | GB/s (peak frac) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        bw = "-" if r["achieved_bandwidth_gb_s"] is None else (
            f"{r['achieved_bandwidth_gb_s']:,.0f}" + (
                "" if r["bandwidth_fraction_of_peak"] is None
                else f" ({r['bandwidth_fraction_of_peak']:.0%})"))
        acc = "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
        lines.append(f"| {r['context']} | {r['batch']} | {r['mode']} | {r['k']} | "
                     f"{r['tokens_per_s']:,.0f} [{r['tokens_per_s_min']:,.0f}-"
                     f"{r['tokens_per_s_max']:,.0f}] | {r['e2e_tokens_per_s']:,.0f} | "
                     f"{r['speedup_vs_ar']:.2f}x | {acc} | {r['flops_per_token'] / 1e6:.3g} | "
                     f"{bw} |")
    lines.append("")
    return "\n".join(lines)


def _penalty_sentence(rows: list[dict]) -> str:
    """' Frequency penalty ...: AR 0, k2 0.3, ...' from the rows (lossless drafts as pflm)."""
    seen = {}
    for r in rows:
        if r.get("frequency_penalty") is not None and r["mode"] != "lossless":
            seen.setdefault("AR" if r["mode"] == "ar" else f"k{r['k']}", r["frequency_penalty"])
    if not seen:
        return ""
    return (" Frequency penalty (per slot, counted within a block; lossless drafts with the "
            "PFLM's): " + ", ".join(f"{name} {p:g}" for name, p in seen.items()) + ".")


def _series(rows: list[dict], context: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["context"] == context:
            label = "AR" if r["mode"] == "ar" else f"{r['mode']} k={r['k']}"
            out.setdefault(label, []).append(r)
    return out


def plot_bench(result: dict, folder: Path) -> list[Path]:
    """tokens_per_s_vs_batch.png and speedup_vs_batch.png (one panel per context length)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    contexts = result["settings"]["contexts"]
    paths = []
    for fname, key, ylabel in (("tokens_per_s_vs_batch.png", "tokens_per_s", "tokens/s (median)"),
                               ("speedup_vs_batch.png", "speedup_vs_ar", "speedup vs AR")):
        fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.2),
                                 squeeze=False)
        for ax, context in zip(axes[0], contexts):
            for label, rows in _series(result["rows"], context).items():
                rows = sorted(rows, key=lambda r: r["batch"])
                xs = [r["batch"] for r in rows]
                ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
                if key == "tokens_per_s":
                    ax.fill_between(xs, [r["tokens_per_s_min"] for r in rows],
                                    [r["tokens_per_s_max"] for r in rows], alpha=0.2)
            ax.set_xscale("log", base=2)
            batches = result["settings"]["batches"]
            ax.set_xticks(batches, [str(b) for b in batches])
            if key == "tokens_per_s":
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xlabel("batch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"context {context}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{ylabel}: {result['device']} ({result['dtype']})", fontsize=10)
        fig.tight_layout()
        path = folder / fname
        write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def write_bench(result: dict, folder) -> dict[str, Path]:
    """bench.json, bench.md and the plots into ``folder`` (created), each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "bench.json", "md": folder / "bench.md"}
    write_text_atomic(paths["json"], json.dumps(result, indent=2))
    write_text_atomic(paths["md"], render_bench_markdown(result))
    for p in plot_bench(result, folder):
        paths[p.stem] = p
    return paths
