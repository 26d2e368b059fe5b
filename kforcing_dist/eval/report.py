"""The run report: ``report.json`` + ``report.md`` for a pipeline run folder.

Reads the exported decoder folders (``teacher/export``, ``kK/export``) and the held-out split of
the run's token shards, so it runs engine-free on one process, after the pipeline or alone
(``kforcing-dist evaluate``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import Config
from ..decode.errors import DecodeError
from ..decode.format import read_decoder_config
from ..decode.generate import generate, load_decoder
from ..decode.penalty import penalty_for_k
from .metrics import agreement, sample_stats
from .quality import (Judge, frontier_markdown, lossless_markdown, lossless_summary, plot_frontier,
                      quality_frontier)
from ..decode.bench import device_name
from .speed import decode_speed

log = logging.getLogger("kforcing_dist")


def heldout_windows(shards: Path, count: int, length: int) -> torch.Tensor:
    """``count`` evenly spaced windows of ``length`` tokens from the valid split (deterministic)."""
    from ..data.shards import TokenDataset

    ds = TokenDataset(shards, "valid")
    if len(ds) < length + 1:
        raise DecodeError(f"the valid split of {shards} has {len(ds)} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, len(ds) - length - 1, count).long().tolist()
    return torch.tensor([ds.window(s, length).tolist() for s in starts], dtype=torch.long)


def _stage_exports(cfg: Config, root: Path) -> dict[int, Path]:
    found = {}
    for k in cfg.distill.stages:
        p = root / f"k{k}" / "export"
        if (p / "config.json").exists():
            found[k] = p
    return found


def evaluate_run(cfg: Config, root: Path) -> dict:
    """Measure every finished stage of the run in ``root`` and write report.json / report.md."""
    from ..app.teacher import shards_dir_of
    from .. import __version__

    t0 = time.time()
    ev, dec = cfg.eval, cfg.decode
    teacher_dir = root / "teacher" / "export"
    if not (teacher_dir / "config.json").exists():
        raise DecodeError(f"no exported teacher at {teacher_dir}; run the pipeline (or train-teacher -o "
                          f"{root / 'teacher'}) first")
    shards = Path(cfg.data.shards_dir) if cfg.data.shards_dir else shards_dir_of(cfg)
    teacher = load_decoder(teacher_dir)
    stages = _stage_exports(cfg, root)
    contexts = heldout_windows(shards, ev.num_contexts, ev.context_len)
    prompts = contexts[: ev.num_samples].tolist()
    report: dict = {"version": __version__, "device": device_name("cpu"), "run": str(root),
                    "tau": dec.tau, "frequency_penalty": {f"k{k}": penalty_for_k(dec.frequency_penalty, k) for k in stages}}

    summary_path = root / "teacher" / "teacher_summary.json"
    tsum = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    report["teacher"] = {"val_ppl": tsum.get("val_ppl"), "val_loss": tsum.get("val_loss"),
                         "tokens_per_s_train": tsum.get("tokens_per_s"), "params": teacher.num_parameters()
                         if hasattr(teacher, "num_parameters") else sum(p.numel() for p in teacher.parameters())}

    teacher_samples = generate(teacher, prompts, mode="ar", max_new_tokens=ev.sample_len, tau=dec.tau,
                               seed=dec.seed).tokens
    report["samples"] = {"teacher": sample_stats(teacher, prompts, teacher_samples),
                         "data": sample_stats(teacher, prompts, contexts[: ev.num_samples, :0].tolist())}
    report["samples"].pop("data")  # held-out text as a reference row is added below when long enough
    report["stages"] = {}
    models = {}
    sample_tokens = {"teacher": teacher_samples}
    for k, path in stages.items():
        student = load_decoder(path)
        models[k] = student
        order = read_decoder_config(path).get("cdf_order", "vocab")
        report["stages"][f"k{k}"] = {**agreement(teacher, student, contexts, k, dec.tau, order, seed=dec.seed),
                                     "cdf_order": order}
        samples = generate(student, prompts, mode="pflm", k=k, max_new_tokens=ev.sample_len, tau=dec.tau,
                           frequency_penalty=penalty_for_k(dec.frequency_penalty, k), seed=dec.seed).tokens
        report["samples"][f"k{k}"] = sample_stats(teacher, prompts, samples)
        sample_tokens[f"k{k}"] = samples
        report["samples"][f"k{k}"]["example"] = _decode_text(path, prompts[0], samples[0])
    report["samples"]["teacher"]["example"] = _decode_text(teacher_dir, prompts[0], teacher_samples[0])

    judge = None
    if ev.judge_model:
        from ..decode.format import load_decoder_tokenizer

        judge = Judge(ev.judge_model, load_decoder_tokenizer(teacher_dir))
        report["judge"] = str(ev.judge_model)
        for name, toks in sample_tokens.items():
            report["samples"][name]["judge_nll"] = judge.nll(prompts, toks)
    if ev.frontier_taus:
        students = {f"k{k}": (m, k) for k, m in models.items()}
        report["frontier"] = quality_frontier(teacher, students, prompts, ev.frontier_taus,
                                              ev.sample_len, dec.seed, dec.frequency_penalty, judge)
        plot_frontier(report["frontier"], root / "frontier.png",
                      f"NLL vs entropy, AR vs PFLM ({root.name})")
    if ev.lossless and models:
        k_max = max(models)
        report["lossless"] = lossless_summary(teacher, models[k_max], k_max, prompts,
                                              ev.sample_len, dec.tau, dec.seed, ev.speed_repeats)

    if models:
        biggest = models[max(models)]
        speed_prompts = contexts[:, : ev.speed_context].tolist()
        report["speed"] = decode_speed(teacher, biggest, speed_prompts, ev.speed_batches,
                                       [k for k in (1, 2, 4, 8) if k <= biggest.max_k],
                                       ev.speed_new_tokens, ev.speed_repeats, seed=dec.seed)
        report["speed"]["model"] = f"k{max(models)}"
    report["seconds"] = time.time() - t0
    (root / "report.json").write_text(json.dumps(report, indent=2))
    (root / "report.md").write_text(render_markdown(report))
    log.info("report written to %s and %s (%.0f s)", root / "report.json", root / "report.md", report["seconds"])
    print(render_markdown(report))
    return report


def _decode_text(folder: Path, prompt: list[int], tokens: list[int]) -> str | None:
    from ..decode.format import load_decoder_tokenizer

    tok = load_decoder_tokenizer(folder)
    if tok is None:
        return None
    return tok.decode(prompt)[-200:] + " ‖ " + tok.decode(tokens)


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(r: dict) -> str:
    lines = [f"# K-Forcing report: {r['run']}", "", f"Device: {r['device']}. tau {r['tau']}, "
             f"frequency penalty {r['frequency_penalty']}.", ""]
    t = r["teacher"]
    lines += [f"Teacher: validation perplexity {_fmt(t['val_ppl'], 2)} (loss {_fmt(t['val_loss'])}), "
              f"{t['params']:,} parameters.", ""]
    if r["stages"]:
        lines += ["## Agreement with the AR teacher under the same noise (held-out contexts)", "",
                  "| stage | order | " + " | ".join(f"slot {i + 1}" for i in range(max(len(s["slot_agreement"])
                                                                                      for s in r["stages"].values())))
                  + " | block | chance (slot 1) |", ""]
        lines.pop()
        width = max(len(s["slot_agreement"]) for s in r["stages"].values())
        lines.append("|" + " --- |" * (width + 4))
        for name, s in r["stages"].items():
            slots = [f"{a:.1%}" for a in s["slot_agreement"]] + ["-"] * (width - len(s["slot_agreement"]))
            lines.append(f"| {name} | {s['cdf_order']} | " + " | ".join(slots)
                         + f" | {s['block_agreement']:.1%} | {s['chance_level']:.1%} |")
        lines.append("")
    judge = bool(r.get("judge"))
    lines += ["## Samples (teacher NLL, tau=1; entropy in nats)", "",
              "| model | teacher NLL | unigram entropy | distinct-1 | distinct-2 | distinct-3 | repetition |"
              + (" judge NLL |" if judge else ""),
              "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if judge else "")]
    for name, s in r["samples"].items():
        lines.append(f"| {name} | {_fmt(s['nll'])} | {_fmt(s['entropy'])} | {_fmt(s['distinct_1'])} | "
                     f"{_fmt(s['distinct_2'])} | {_fmt(s['distinct_3'])} | {_fmt(s['repetition'])} |"
                     + (f" {_fmt(s.get('judge_nll'))} |" if judge else ""))
    lines.append("")
    if "speed" in r:
        sp = r["speed"]
        modes = list(next(iter(sp["tokens_per_s"].values())).keys())
        lines += [f"## Decode speed (tokens/s, median of {sp['repeats']}; PFLM = {sp['model']}, "
                  f"{sp['new_tokens']} new tokens after {sp['prompt_len']}-token prompts)", "",
                  "| batch | " + " | ".join(modes) + " | " + " | ".join(f"{m}/ar" for m in modes if m != "ar") + " |",
                  "|" + " --- |" * (1 + 2 * len(modes) - 1)]
        for b, cells in sp["tokens_per_s"].items():
            lines.append(f"| {b} | " + " | ".join(f"{cells[m]:,.0f}" for m in modes) + " | "
                         + " | ".join(f"{sp['speedup'][b][m]:.2f}x" for m in modes if m != "ar") + " |")
        lines.append("")
    if r.get("frontier"):
        lines += frontier_markdown(r["frontier"])
    if r.get("lossless"):
        lines += lossless_markdown(r["lossless"])
    ex = [(n, s.get("example")) for n, s in r["samples"].items() if s.get("example")]
    if ex:
        lines += ["## Example continuations (prompt tail ‖ continuation)", ""]
        lines += [f"- **{n}**: {e!r}" for n, e in ex]
        lines.append("")
    return "\n".join(lines)
