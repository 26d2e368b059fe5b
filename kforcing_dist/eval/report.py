"""The run report: ``report.json`` + ``report.md`` for a pipeline run folder.

Reads the exported decoder folders (``kK/export`` and the AR teacher's: ``teacher/export``, or
where ``distill.teacher`` names it) and the held-out split of the run's token shards, so it runs
engine-free on one process, after the pipeline or alone (``kforcing-dist evaluate``). Agreement is
measured on held-out contexts against chance and the mode baseline; samples are full-length
continuations of short held-out prompts (repetition drift shows only in long samples), students
with their per-k frequency penalty and without.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import Config, shards_dir_of
from ..decode.bench import device_name
from ..decode.errors import DecodeError
from ..decode.format import read_decoder_config
from ..decode.generate import generate, load_decoder
from ..decode.penalty import penalty_for_k
from ..stage import TEACHER, Stage
from .metrics import agreement, draw_noise, sample_stats, teacher_path
from .quality import (Judge, frontier_markdown, lossless_markdown, lossless_summary, plot_frontier,
                      quality_frontier)
from .speed import decode_speed

log = logging.getLogger("kforcing_dist")

NO_PENALTY = "@p0"  # suffix of the student sample rows decoded without frequency penalty
EXACT_TEACHER = "teacher@exact"  # the untruncated teacher's samples, beside a min-p truncated one's
EXAMPLE_CHARS = 600  # report.md shows this much of each example (report.json: all of it)


def heldout_windows(shards: Path, count: int, length: int) -> torch.Tensor:
    """``count`` evenly spaced windows of ``length`` tokens from the valid split (deterministic)."""
    from ..data.shards import TokenDataset

    ds = TokenDataset(shards, "valid")
    if len(ds) < length + 1:
        raise DecodeError(f"the valid split of {shards} has {len(ds)} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, len(ds) - length - 1, count).long().tolist()
    return torch.tensor([ds.window(s, length).tolist() for s in starts], dtype=torch.long)


def _stage_exports(run: Stage) -> dict[int, Path]:
    """{k: export folder} of the run's finished distillation stages."""
    found = {}
    for k in run.cfg.distill.stages:
        p = Stage(run.cfg, k).export_dir
        if (p / "config.json").exists():
            found[k] = p
    return found


def resolve_sample_len(prompt_len: int, sample_len: int, models) -> int:
    """eval.sample_len, or (0) every model's room after the prompt: max_seq_len - prompt_len."""
    room = min(m.max_seq_len for m in models) - prompt_len
    if room < 1:
        raise DecodeError(f"eval.prompt_len={prompt_len} leaves no room for samples in max_seq_len="
                          f"{room + prompt_len}; lower eval.prompt_len")
    if sample_len > room:
        raise DecodeError(f"eval.sample_len={sample_len} + eval.prompt_len={prompt_len} exceeds the "
                          f"models' max_seq_len={room + prompt_len}; lower it (0 = up to max_seq_len)")
    return sample_len or room


def tau_warnings(name: str, decoder_config: dict, taus: dict[str, float]) -> list[str]:
    """A warning per setting in ``taus`` ({"decode.tau": 1.0, ...}) outside the tau range the
    student was trained on (its config.json's optional ``tau_range`` [min, max]); none without it."""
    tr = decoder_config.get("tau_range")
    if tr is None:
        return []
    if not (isinstance(tr, (list, tuple)) and len(tr) == 2 and all(isinstance(x, (int, float))
                                                                    and not isinstance(x, bool) for x in tr)
            and tr[0] <= tr[1]):
        return [f"{name}: its config.json has tau_range={tr!r}, not [min, max]; decode taus not checked"]
    lo, hi = float(tr[0]), float(tr[1])
    outside = [f"{key}={tau:g}" for key, tau in taus.items() if not lo <= tau <= hi]
    if not outside:
        return []
    return [f"{name} was trained on tau in [{lo:g}, {hi:g}]; {', '.join(outside)} "
            f"lie{'s' if len(outside) == 1 else ''} outside it, so those measurements extrapolate"]


def _jsonable(setting):
    """decode.frequency_penalty as JSON can hold it (a map's keys become strings)."""
    if isinstance(setting, dict):
        return {str(k): v for k, v in setting.items()}
    return setting


def common_teacher_min_p(configs: dict[int, dict]) -> float:
    """The teacher truncation every stage was distilled against (their config.json's
    ``teacher_min_p``; 0 for folders without it). The report measures all stages against one
    teacher, so stages that disagree are refused."""
    values = {float(c.get("teacher_min_p") or 0.0) for c in configs.values()}
    if len(values) > 1:
        raise DecodeError(f"the stages were distilled against different teacher truncations "
                          f"(teacher_min_p {sorted(values)}); evaluate stages of one run, distilled with one "
                          f"distill.teacher_min_p")
    return values.pop() if values else 0.0


def evaluate_run(cfg: Config, root: Path) -> dict:
    """Measure every finished stage of the run in ``root`` and write report.json / report.md."""
    from .. import __version__

    t0 = time.time()
    ev, dec = cfg.eval, cfg.decode
    run = Stage(dataclasses.replace(cfg, output_dir=str(root)), TEACHER)
    teacher_dir = run.teacher_export
    if not (teacher_dir / "config.json").exists():
        raise DecodeError(f"no exported teacher at {teacher_dir}; run the pipeline (or train-teacher -o "
                          f"{run.run_dir}) first, or set distill.teacher")
    shards = shards_dir_of(cfg)
    teacher = load_decoder(teacher_dir)
    stages = _stage_exports(run)
    models = {k: load_decoder(path) for k, path in stages.items()}
    configs = {k: read_decoder_config(path) for k, path in stages.items()}
    orders = {k: c.get("cdf_order", "vocab") for k, c in configs.items()}
    min_p = common_teacher_min_p(configs)
    penalties = {k: penalty_for_k(dec.frequency_penalty, k) for k in models}
    sample_len = resolve_sample_len(ev.prompt_len, ev.sample_len, [teacher, *models.values()])
    contexts = heldout_windows(shards, ev.num_contexts, ev.context_len)
    windows = heldout_windows(shards, ev.num_samples, ev.prompt_len + sample_len)
    prompts, heldout = windows[:, :ev.prompt_len].tolist(), windows[:, ev.prompt_len:].tolist()
    checked_taus = {"decode.tau": dec.tau, **{f"eval.frontier_taus[{i}]": t
                                              for i, t in enumerate(ev.frontier_taus)}}
    warnings = [w for k in models for w in tau_warnings(f"k{k}", configs[k], checked_taus)]
    for w in warnings:
        log.warning("%s", w)
    report: dict = {"version": __version__, "device": device_name("cpu"), "run": str(root),
                    "tau": dec.tau, "frequency_penalty": _jsonable(dec.frequency_penalty),
                    "decode": {"tau": dec.tau, "frequency_penalty": {f"k{k}": p for k, p in penalties.items()},
                               "prompt_len": ev.prompt_len, "sample_len": sample_len, "seed": dec.seed,
                               "cdf_order": {f"k{k}": o for k, o in orders.items()},
                               "teacher_min_p": min_p,
                               "ignore_eos": True, "teacher_sampling": "multinomial"},
                    "warnings": warnings}

    summary_path = run.teacher_summary
    tsum = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    report["teacher"] = {"val_ppl": tsum.get("val_ppl"), "val_loss": tsum.get("val_loss"),
                         "tokens_per_s_train": tsum.get("tokens_per_s"), "params": teacher.num_parameters()
                         if hasattr(teacher, "num_parameters") else sum(p.numel() for p in teacher.parameters())}

    # every sample set runs the whole batch at once, EOS ignored: equal lengths keep per-sample
    # entropy and repetition comparable across models (documents are EOS-separated in training)
    # the teacher the students learned: its min-p truncated distribution when they were distilled so
    def teacher_samples_at(truncation: float) -> list[list[int]]:
        return generate(teacher, prompts, mode="ar", max_new_tokens=sample_len, tau=dec.tau, seed=dec.seed,
                        ignore_eos=True, min_p=truncation).tokens

    teacher_samples = teacher_samples_at(min_p)
    sample_tokens = {"teacher": teacher_samples}
    if min_p:  # what the truncation itself costs, beside it
        sample_tokens[EXACT_TEACHER] = teacher_samples_at(0.0)
    sample_tokens["data"] = heldout

    def student_samples(student, k: int, penalty: float) -> list[list[int]]:
        return generate(student, prompts, mode="pflm", k=k, max_new_tokens=sample_len, tau=dec.tau,
                        frequency_penalty=penalty, seed=dec.seed, ignore_eos=True).tokens

    penalty_of = {"teacher": 0.0, EXACT_TEACHER: 0.0, "data": None}
    report["stages"] = {}
    # one teacher path (of the largest k) per CDF order serves every stage: slot i of each
    # stage sees the same u and the same teacher token
    u = draw_noise(contexts.shape[0], max(models, default=1), dec.seed)
    paths = {order: teacher_path(teacher, contexts, u, dec.tau, order, min_p=min_p)
             for order in set(orders.values())}
    for k, student in models.items():
        previous = models.get(k // 2) if k % 2 == 0 else None
        s = agreement(teacher, student, contexts, k, dec.tau, orders[k], seed=dec.seed, previous=previous,
                      path=paths[orders[k]], min_p=min_p)
        if "vs_previous" in s:
            s["vs_previous"] = {"stage": f"k{k // 2}", **s["vs_previous"]}
        report["stages"][f"k{k}"] = {**s, "cdf_order": orders[k]}
        sample_tokens[f"k{k}"] = student_samples(student, k, penalties[k])
        # a default penalty of 0 gives the same samples: the row is repeated, not recomputed
        sample_tokens[f"k{k}{NO_PENALTY}"] = (student_samples(student, k, 0.0) if penalties[k]
                                              else sample_tokens[f"k{k}"])
        penalty_of.update({f"k{k}": penalties[k], f"k{k}{NO_PENALTY}": 0.0})
    report["samples"] = {name: {"frequency_penalty": penalty_of[name], **sample_stats(teacher, prompts, toks)}
                         for name, toks in sample_tokens.items()}
    report["samples"]["teacher"]["example"] = _decode_text(teacher_dir, prompts[0], teacher_samples[0])
    for k, path in stages.items():
        for name in (f"k{k}", f"k{k}{NO_PENALTY}"):
            report["samples"][name]["example"] = _decode_text(path, prompts[0], sample_tokens[name][0])

    judge = None
    if ev.judge_model:
        from ..decode.format import load_decoder_tokenizer

        judge = Judge(ev.judge_model, load_decoder_tokenizer(teacher_dir))
        report["judge"] = str(ev.judge_model)
        for name, toks in sample_tokens.items():
            report["samples"][name]["judge_nll"] = judge.nll(prompts, toks)
    if ev.frontier_taus:
        students = {f"k{k}": (m, k) for k, m in models.items()}
        few = prompts[: ev.frontier_samples or len(prompts)]
        report["frontier"] = quality_frontier(teacher, students, few, ev.frontier_taus, sample_len, dec.seed,
                                              dec.frequency_penalty, judge, ignore_eos=True,
                                              teacher_min_p=min_p)
        report["frontier_samples"] = len(few)
        plot_frontier(report["frontier"], root / "frontier.png",
                      f"NLL vs entropy, AR vs PFLM ({root.name})")
    if ev.lossless and models:
        k_max = max(models)
        report["lossless"] = lossless_summary(teacher, models[k_max], k_max, prompts,
                                              min(ev.speed_new_tokens, sample_len), dec.tau, dec.seed,
                                              ev.speed_repeats)

    if models and ev.speed_batches:  # eval.speed_batches: [] skips the speed measurement
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


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _agreement_rows(name: str, s: dict) -> list[str]:
    """One row per slot and one for the whole block (k >= 2): the agreement next to its
    baselines and, for k >= 2, to the chained k/2 student."""
    k = len(s["slot_agreement"])
    prev = s.get("vs_previous")
    mode = s.get("mode_baseline", {})
    rows = []
    for i in range(k):
        cells = [s["slot_agreement"][i], s["chance_level_per_slot"][i],
                 mode.get("slot", [None] * k)[i], s.get("mode_rate", [None] * k)[i],
                 prev["slot_agreement"][i] if prev else None,
                 prev["previous_vs_teacher"]["slot_agreement"][i] if prev else None]
        rows.append(f"| {name} | {i + 1} | " + " | ".join(map(_pct, cells)) + " |")
    if k > 1:
        cells = [s["block_agreement"], s.get("block_chance"), mode.get("block"), None,
                 prev["block_agreement"] if prev else None,
                 prev["previous_vs_teacher"]["block_agreement"] if prev else None]
        rows.append(f"| {name} | block | " + " | ".join(map(_pct, cells)) + " |")
    return rows


def _decode_line(r: dict) -> str:
    d = r.get("decode")
    if not d:
        return f"tau {r['tau']}, frequency penalty {r['frequency_penalty']}."
    pens = ", ".join(f"{k} {p:g}" for k, p in d["frequency_penalty"].items()) or "-"
    orders = sorted(set(d["cdf_order"].values())) or ["-"]
    min_p = d.get("teacher_min_p") or 0.0
    teacher = (f"the teacher: none, multinomial, min-p {min_p:g} truncated as the students were distilled "
               f"(row `{EXACT_TEACHER}`: untruncated)" if min_p else "the teacher: none, multinomial")
    return (f"Decode: tau {d['tau']:g}; student frequency penalty {pens} (rows `{NO_PENALTY}`: none; "
            f"{teacher}); samples: {d['prompt_len']}-token held-out prompts, "
            f"{d['sample_len']} new tokens{' (EOS ignored)' if d.get('ignore_eos') else ''}; seed "
            f"{d['seed']}; CDF order {'/'.join(orders)}.")


def render_markdown(r: dict) -> str:
    lines = [f"# K-Forcing report: {r['run']}", "", f"Device: {r['device']}. {_decode_line(r)}", ""]
    if r.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    t = r["teacher"]
    lines += [f"Teacher: validation perplexity {_fmt(t['val_ppl'], 2)} (loss {_fmt(t['val_loss'])}), "
              f"{t['params']:,} parameters.", ""]
    if r["stages"]:
        n = next(iter(r["stages"].values()))["contexts"]
        min_p = r.get("decode", {}).get("teacher_min_p") or 0.0
        lines += ["## Agreement with the AR teacher under the same noise "
                  f"({n} held-out contexts, tau {r['tau']:g}"
                  + (f", the teacher min-p {min_p:g} truncated" if min_p else "") + ")", "",
                  "| stage | slot | agreement | chance | mode baseline | emits teacher's mode | "
                  "vs chained k/2 student | chained k/2 vs teacher |",
                  "|" + " --- |" * 8]
        for name, s in r["stages"].items():
            lines += _agreement_rows(name, s)
        lines += ["", "chance: an independent draw from the teacher matches (slot: sum p^2; block: "
                  "E[p(block)]); mode baseline: a student that ignores u and always emits the teacher's "
                  "most likely token (slot: E[max p] along the teacher's path, i.e. from slot 2 on given "
                  "the teacher's own earlier tokens; block: the teacher's greedy block); a student that uses u "
                  "beats both, and emits the teacher's mode about "
                  "as often as the mode baseline (a collapsed one: nearly always). vs chained k/2 "
                  "student: agreement with the self-forcing target this stage learned (its new error); "
                  "chained k/2 vs teacher: the error it inherited.", ""]
    judge = bool(r.get("judge"))
    d = r.get("decode", {})
    lines += [f"## Samples ({d.get('sample_len', '?')} new tokens after {d.get('prompt_len', '?')}-token "
              f"held-out prompts; teacher NLL at tau 1; entropy in nats; data = the held-out text)", "",
              "| model | penalty | teacher NLL | entropy per sample | entropy (pooled) | distinct-1 | "
              "distinct-2 | distinct-3 | repetition |" + (" judge NLL |" if judge else ""),
              "|" + " --- |" * (9 + judge)]
    for name, s in r["samples"].items():
        lines.append(f"| {name} | {_fmt(s.get('frequency_penalty'), 2)} | {_fmt(s['nll'])} | "
                     f"{_fmt(s.get('entropy_per_sample'))} | {_fmt(s['entropy'])} | {_fmt(s['distinct_1'])} | "
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
        lines += frontier_markdown(r["frontier"], r.get("frontier_samples"))
    if r.get("lossless"):
        lines += lossless_markdown(r["lossless"])
    ex = [(n, s.get("example")) for n, s in r["samples"].items() if s.get("example")]
    if ex:
        lines += ["## Example continuations (prompt tail ‖ continuation)", ""]
        lines += [f"- **{n}**: {e[:EXAMPLE_CHARS] + ('…' if len(e) > EXAMPLE_CHARS else '')!r}"
                  for n, e in ex]
        lines.append("")
    return "\n".join(lines)
