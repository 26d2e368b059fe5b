#!/usr/bin/env python
"""Where more distillation compute goes: agreement against the stage budget, from run reports.

Each argument is ``MULTIPLIER=RUN_FOLDER`` for a run evaluated with ``kforcing-dist evaluate``
(its ``report.json``), e.g. the demo's stage steps at 1x, 2x and 4x. Prints a Markdown table of
k1 slot-1 agreement and k4 block agreement (with the teacher's chance and mode baselines) and
draws both against the budget into ``--out``. A run evaluated without k4 adds a k1 point only::

    python bench/budget_curve.py 1=runs/demo 2=runs/demo-2x 4=runs/demo-4x --out budget_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_point(spec: str) -> dict:
    """``'2=runs/x'`` -> the budget multiplier and the figures the curve plots from its report."""
    multiplier, sep, folder = spec.partition("=")
    try:
        budget = float(multiplier)
    except ValueError:
        budget = None
    if not sep or budget is None or budget <= 0:
        raise ValueError(f"{spec!r} is not MULTIPLIER=RUN_FOLDER (e.g. 2=runs/demo-2x)")
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run `kforcing-dist evaluate` "
                         f"on {folder} first")
    stages = json.loads(path.read_text())["stages"]
    if "k1" not in stages:
        raise ValueError(f"{path} has no stage k1; the curve needs k1 (and k4) evaluated")
    k1, k4 = stages["k1"], stages.get("k4")
    point = {"budget": budget, "run": folder, "contexts": k1["contexts"],
             "k1_slot1": k1["slot_agreement"][0], "k1_mode": k1["mode_baseline"]["slot"][0],
             "k1_chance": k1["chance_level_per_slot"][0],
             "k4_block": None, "k4_mode": None, "k4_chance": None}
    if k4 is not None:
        point.update(k4_block=k4["block_agreement"], k4_mode=k4["mode_baseline"]["block"],
                     k4_chance=k4["block_chance"])
    return point


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(points: list[dict]) -> str:
    lines = ["| budget | k1 slot-1 agreement | k4 block agreement | contexts | run |",
             "| --- | --- | --- | --- | --- |"]
    for p in points:
        lines.append(f"| {p['budget']:g}x | {_percent(p['k1_slot1'])} | {_percent(p['k4_block'])} | {p['contexts']} "
                     f"| `{p['run']}` |")
    k1 = points[0]
    k4 = next((p for p in points if p["k4_block"] is not None), None)
    lines.append(f"\nTeacher baselines (same held-out contexts): k1 chance {k1['k1_chance']:.1%}, mode "
                 f"{k1['k1_mode']:.1%}" + ("" if k4 is None else f"; k4 block chance {k4['k4_chance']:.1%}, "
                                                                  f"mode {k4['k4_mode']:.1%}") + ".")
    return "\n".join(lines)


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    budgets = [p["budget"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title, baselines in (
            (axes[0], "k1_slot1", "k1 slot-1 agreement", (("k1_mode", "mode baseline"), ("k1_chance", "chance"))),
            (axes[1], "k4_block", "k4 block agreement", (("k4_mode", "mode baseline"), ("k4_chance", "chance")))):
        have = [p for p in points if p[key] is not None]
        ax.plot([p["budget"] for p in have], [100 * p[key] for p in have], "o-", label="student")
        for base_key, label in baselines:
            if have:
                ax.axhline(100 * have[0][base_key], linestyle="--", linewidth=1,
                           color="grey" if label == "chance" else "tab:orange", label=f"teacher {label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"{b:g}x" for b in budgets])
        ax.set_xlabel("stage budget (x the demo's steps)")
        ax.set_ylabel("agreement with the teacher (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="MULTIPLIER=RUN_FOLDER")
    parser.add_argument("--out", default="budget_curve.png", help="PNG to write")
    args = parser.parse_args(argv)
    try:
        points = sorted((read_point(spec) for spec in args.runs), key=lambda p: p["budget"])
    except ValueError as exc:
        parser.error(str(exc))  # one line, exit 2
    print(table(points))
    plot(points, Path(args.out))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
