"""The ``bench`` command: the decode speed sweep (AR vs PFLM k vs lossless) into the -o folder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import Config
from ..decode import DecodeError, load_decoder
from ..decode.bench import bench_sweep, random_models, render_bench_markdown, write_bench
from .paths import output_folder

log = logging.getLogger("kforcing_dist")


def parse_int_list(text: str | None, name: str, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DecodeError(f"--{name} must be comma-separated integers, e.g. 1,8,32; got {text!r}")
    if not values or min(values) < 1:
        raise DecodeError(f"--{name} must list positive integers, got {text!r}")
    return values


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DecodeError(f"--device {device}: CUDA is not available on this machine; use "
                          f"--device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_graphs(choice: str, device: torch.device) -> bool:
    if choice == "auto":
        return device.type == "cuda"
    if choice == "on" and device.type != "cuda":
        raise DecodeError("--cuda-graphs on needs --device cuda; use auto or off on a CPU")
    return choice == "on"


def load_bench_models(cfg: Config, args, device, dtype, max_k: int, longest: int):
    """(AR teacher, PFLM or None, a description of where they came from)."""
    if args.teacher:
        for flag, folder in (("--teacher", args.teacher), ("--student", args.student)):
            if folder and not (Path(folder) / "config.json").is_file():
                raise DecodeError(f"{flag} {folder} is not a decoder folder (no config.json); "
                                  f"give a stage's export/ folder, e.g. runs/demo/k4/export")
        teacher = load_decoder(args.teacher, device=device, dtype=dtype)
        student = load_decoder(args.student, device=device, dtype=dtype) if args.student else None
        return teacher, student, {"teacher": str(args.teacher), "student": args.student,
                                  "weights": "trained"}
    if args.student:
        raise DecodeError("--student needs --teacher (the AR model every ratio is measured "
                          "against)")
    m = dataclasses.asdict(cfg.model)
    m["vocab_size"] = m["vocab_size"] or cfg.tokenizer.vocab_size
    teacher, student = random_models(m, max_k=max_k, device=device, dtype=dtype,
                                     seed=cfg.train.seed, max_seq_len=longest,
                                     noise_features=cfg.distill.noise_features,
                                     noise_max_freq=cfg.distill.noise_max_freq)
    return teacher, student, {"weights": "random", "model": m}


def run_bench(cfg: Config, args) -> int:
    if not args.output_dir:
        raise DecodeError("bench writes bench.json, bench.md and plots into the -o folder; give "
                          "-o DIR")
    output_folder(args.output_dir, "the bench folder (-o)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    ev = cfg.eval
    batches = parse_int_list(args.batches, "batches", ev.speed_batches)
    ks = parse_int_list(args.ks, "ks", [1, 2, 4])
    contexts = parse_int_list(args.contexts, "contexts", [ev.speed_context])
    new_tokens = args.new_tokens or ev.speed_new_tokens
    repeats = args.repeats or ev.speed_repeats
    longest = max(contexts) + new_tokens + 2 * max(ks) + 2
    teacher, student, source = load_bench_models(cfg, args, device, dtype, max(ks), longest)

    def progress(row):
        log.info("%s k=%d batch=%d context=%d: %.0f tokens/s (%.2fx AR)", row["mode"], row["k"],
                 row["batch"], row["context"], row["tokens_per_s"], row["speedup_vs_ar"])

    result = bench_sweep(teacher, student, batches=batches, ks=ks, contexts=contexts,
                         new_tokens=new_tokens, repeats=repeats,
                         lossless=not args.no_lossless and student is not None,
                         seed=cfg.decode.seed, frequency_penalty=cfg.decode.frequency_penalty,
                         progress=progress,
                         cuda_graphs=resolve_graphs(args.cuda_graphs, device))
    result["source"] = source
    paths = write_bench(result, args.output_dir)
    print(render_bench_markdown(result))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
