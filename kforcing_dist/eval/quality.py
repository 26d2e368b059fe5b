"""The quality suite beyond one temperature: the NLL-vs-entropy frontier, lossless mode on real
text, and an optional judge model.

- frontier: at each tau, samples of the AR teacher and of every stage from the same prompts,
  scored by the teacher's NLL, unigram entropy, distinct-n and repetition (a lower NLL bought by
  collapsed entropy is not better: the plot shows both);
- lossless: the largest stage drafts, the teacher verifies; checks the output equals the
  teacher's own inverse-CDF samples and measures acceptance length and tokens/s vs AR and PFLM;
- judge: any AR decoder folder scores the same samples (re-tokenised when its tokenizer
  differs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..decode.bench import speed_run
from ..decode.errors import DecodeError
from ..decode.generate import generate, generate_lossless
from ..decode.penalty import PenaltySetting, penalty_for_k
from .metrics import sample_stats, teacher_nll


class Judge:
    """An AR decoder that scores continuations; ``run_tokenizer`` decodes the run's ids when the
    judge's tokenizer is another one."""

    def __init__(self, folder, run_tokenizer):
        from ..decode.format import load_decoder_tokenizer, read_decoder_config
        from ..decode.generate import load_decoder

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DecodeError(f"eval.judge_model={folder} is not a decoder folder (no "
                              f"config.json); give an AR model's export/ folder")
        if read_decoder_config(folder)["kind"] != "ar":
            raise DecodeError(f"eval.judge_model={folder} is a PFLM; the judge must be an AR model")
        self.folder = folder
        self.model = load_decoder(folder)
        self.tokenizer = load_decoder_tokenizer(folder)
        same = run_tokenizer is not None and self.tokenizer is not None and \
            getattr(self.tokenizer, "fingerprint", None) == getattr(run_tokenizer, "fingerprint", 0)
        if not same and (self.tokenizer is None or run_tokenizer is None):
            raise DecodeError(f"the judge {folder} uses another vocabulary and one side has no "
                              f"tokenizer/ folder to re-tokenise the samples; export both with "
                              f"their tokenizers")
        self.run_tokenizer = None if same else run_tokenizer

    def nll(self, prompts: list[list[int]], samples: list[list[int]]) -> float:
        if self.run_tokenizer is not None:
            prompts = [self.tokenizer.encode(self.run_tokenizer.decode(p)) or [0] for p in prompts]
            samples = [self.tokenizer.encode(self.run_tokenizer.decode(s)) for s in samples]
        return teacher_nll(self.model, prompts, samples)


def quality_frontier(teacher, students: dict, prompts: list[list[int]], taus: list[float],
                     sample_len: int, seed: int, frequency_penalty: PenaltySetting = 0.0,
                     judge: Optional[Judge] = None, ignore_eos: bool = False,
                     teacher_min_p: float = 0.0) -> dict:
    """{model name: [{"tau", "nll", "entropy", "entropy_per_sample", "distinct_1..3",
    "repetition", "frequency_penalty", ...}]}; ``students``: {"k2": (model, k)}, each sampling
    with ``penalty_for_k(frequency_penalty, k)``. The teacher samples with torch.multinomial,
    without penalty, from its ``teacher_min_p`` truncated distribution (the one the students learned)."""
    out: dict = {"teacher": []}
    penalties = {"teacher": 0.0, **{name: penalty_for_k(frequency_penalty, k)
                                    for name, (_, k) in students.items()}}
    for tau in taus:
        samples = {"teacher": generate(teacher, prompts, mode="ar", max_new_tokens=sample_len,
                                       tau=tau, seed=seed, ignore_eos=ignore_eos,
                                       min_p=teacher_min_p).tokens}
        for name, (model, k) in students.items():
            samples[name] = generate(model, prompts, mode="pflm", k=k, max_new_tokens=sample_len,
                                     tau=tau, seed=seed, frequency_penalty=penalties[name],
                                     ignore_eos=ignore_eos).tokens
        for name, toks in samples.items():
            row = {"tau": tau, "frequency_penalty": penalties[name],
                   **sample_stats(teacher, prompts, toks)}
            if judge is not None:
                row["judge_nll"] = judge.nll(prompts, toks)
            out.setdefault(name, []).append(row)
    return out


def lossless_summary(teacher, student, k: int, prompts: list[list[int]], new_tokens: int,
                     tau: float, seed: int, repeats: int) -> dict:
    """Exactness and speed of lossless mode on real prompts, next to AR and the PFLM alone.

    The student drafts without frequency penalty: the teacher verifies against its own
    unpenalised inverse-CDF sample, so a penalised draft could only lower the acceptance. The
    teacher's sample is of the distribution the student was distilled against (its
    ``teacher_min_p`` truncation)."""
    min_p = student.config.get("teacher_min_p") or 0.0
    ref = generate(teacher, prompts, mode="ar", sampling="inverse_cdf", max_new_tokens=new_tokens,
                   tau=tau, seed=seed, ignore_eos=True, min_p=min_p)
    ll = generate_lossless(student, teacher, prompts, k=k, max_new_tokens=new_tokens, tau=tau,
                           seed=seed, ignore_eos=True)
    same = sum(a == b for r, s in zip(ref.tokens, ll.tokens) for a, b in zip(r, s))
    margins = _first_difference_margins(teacher, prompts, ref.tokens, ll.tokens, tau, seed,
                                        student.config.get("cdf_order") or "vocab", min_p)
    runs = {mode: speed_run(student if mode != "ar" else teacher, mode=mode,
                            k=1 if mode == "ar" else k, new_tokens=new_tokens, repeats=repeats,
                            seed=seed, prompts=prompts, teacher=teacher)
            for mode in ("ar", "pflm", "lossless")}
    tps = {m: r["tokens_per_second"] for m, r in runs.items()}
    return {"k": k, "batch": len(prompts), "new_tokens": new_tokens, "tau": tau, "teacher_min_p": min_p,
            "draft_frequency_penalty": 0.0, "exact": ll.tokens == ref.tokens,
            "token_agreement_with_teacher": same / max(sum(map(len, ref.tokens)), 1),
            "sequences_identical": sum(a == b for a, b in zip(ref.tokens, ll.tokens)),
            # per differing sequence: how far u was from the teacher's CDF boundary at the first
            # differing token (float round-off between a 1-token and a (k+1)-token pass can only
            # move a boundary by ~1e-7)
            "u_boundary_distance_at_first_difference": margins,
            "acceptance_length": runs["lossless"]["acceptance_length"],
            "teacher_passes": ll.steps,
            "tokens_per_s": tps["lossless"], "ar_tokens_per_s": tps["ar"],
            "pflm_tokens_per_s": tps["pflm"], "vs_ar": tps["lossless"] / tps["ar"],
            "vs_pflm": tps["lossless"] / tps["pflm"]}


@torch.no_grad()
def _first_difference_margins(teacher, prompts, ref, other, tau, seed, order, min_p) -> list[float]:
    from ..decode.generate import noise_table
    from ..nn.inverse_cdf import cdf_interval

    u = noise_table(len(prompts), max(map(len, ref)), seed, "cpu")
    out = []
    for b, (r, o) in enumerate(zip(ref, other)):
        diff = [i for i, (x, y) in enumerate(zip(r, o)) if x != y]
        if not diff:
            continue
        i = diff[0]
        logits = teacher.logits(torch.tensor([prompts[b] + r[:i]], device=teacher.device))
        low, high = cdf_interval(logits[0, -1, :teacher.vocab_size].cpu(), torch.tensor(r[i]),
                                 tau, order, min_p)
        out.append(min(abs(float(u[b, i]) - float(low)), abs(float(high) - float(u[b, i]))))
    return out


def plot_frontier(frontier: dict, path: Path, title: str) -> Path:
    """Teacher NLL (y) against per-sample unigram entropy (x; the pooled entropy for rows that
    lack it), one line per model through its taus."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from ..fsio import write_atomic

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rows in frontier.items():
        xs, ys = [r.get("entropy_per_sample", r["entropy"]) for r in rows], [r["nll"] for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"{r['tau']:g}", (x, y), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    ax.set_xlabel("unigram entropy per sample (nats; higher = more diverse)")
    ax.set_ylabel("teacher NLL of samples (nats/token; lower = more likely)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def frontier_markdown(frontier: dict, samples: Optional[int] = None) -> list[str]:
    judge = any("judge_nll" in r for rows in frontier.values() for r in rows)
    count = f"{samples} samples per model and tau, " if samples else ""
    lines = [f"## Quality frontier ({count}same prompts; teacher NLL vs unigram entropy, "
             f"frontier.png)", "",
             "| model | tau | penalty | teacher NLL | entropy per sample | entropy (pooled) | "
             "distinct-2 | repetition |" + (" judge NLL |" if judge else ""),
             "|" + " --- |" * (8 + judge)]
    for name, rows in frontier.items():
        for r in rows:
            lines.append(f"| {name} | {r['tau']:g} | {r.get('frequency_penalty', 0.0):g} | "
                         f"{r['nll']:.3f} | {r.get('entropy_per_sample', float('nan')):.3f} | "
                         f"{r['entropy']:.3f} | {r['distinct_2']:.3f} | {r['repetition']:.3f} |"
                         + (f" {r['judge_nll']:.3f} |" if judge else ""))
    lines.append("")
    return lines


def lossless_markdown(s: dict) -> list[str]:
    return ["## Lossless mode (the largest stage drafts, the teacher verifies)", "",
            f"k={s['k']}, batch {s['batch']}, {s['new_tokens']} tokens, tau {s['tau']:g}: output "
            f"{'equals' if s['exact'] else 'differs from'} the teacher's own inverse-CDF samples "
            f"({s['sequences_identical']}/{s['batch']} sequences identical, "
            f"{s['token_agreement_with_teacher']:.1%} of tokens"
            + ("" if s["exact"] else "; u was within "
               f"{max(s['u_boundary_distance_at_first_difference']):.1e} of a CDF boundary at "
               f"each first difference: float round-off between the teacher's one-token and "
               f"(k+1)-token passes") + "); acceptance length "
            f"{s['acceptance_length']:.2f} tokens per teacher pass; {s['tokens_per_s']:,.0f} "
            f"tokens/s = {s['vs_ar']:.2f}x AR ({s['ar_tokens_per_s']:,.0f}), "
            f"{s['vs_pflm']:.2f}x PFLM alone ({s['pflm_tokens_per_s']:,.0f}).", ""]


__all__ = ["Judge", "frontier_markdown", "lossless_markdown", "lossless_summary", "plot_frontier",
           "quality_frontier"]
