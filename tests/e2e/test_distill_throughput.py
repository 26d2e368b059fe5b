"""bench/distill_throughput.py on tiny shapes: every cell, positive figures, slots counted from the
windows the task draws, and a phase breakdown that accounts for the step time (a few seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLOTS = 12      # distill.max_window_slots
MICRO = 2       # micro-batch of the teacher and the stages
CONTEXTS = (8, 16)


def test_throughput_bench_reports_every_cell_with_a_breakdown(tmp_path):
    out = tmp_path / "throughput.json"
    sets = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.vocab_size=64",
            f"train.micro_batch_size={MICRO}", f"distill.micro_batch_size={MICRO}",
            f"distill.max_window_slots={SLOTS}", "distill.stages=[1,2,4]"]
    cmd = [sys.executable, str(ROOT / "bench" / "distill_throughput.py"), "--device", "cpu", "--threads", "1",
           "--contexts", *map(str, CONTEXTS), "--steps", "2", "--warmup", "1", "--json-out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    cells = {(r["context"], r["stage"]): r for r in results}
    assert set(cells) == {(c, s) for c in CONTEXTS for s in ("teacher", "k1", "k2", "k4")}
    for (context, stage), r in cells.items():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["ratio"] > 0
        assert r["cpu_step_s"] > 0 and r["cpu_ratio"] > 0
        k = r["k"]
        # the teacher: training tokens; a stage: windows x k slots (windows capped by the context)
        want = MICRO * context if k == 0 else MICRO * min(context, SLOTS // k) * k
        assert r["tokens_per_step"] == want, (context, stage)
        ph = r["phases_s"]
        for p in ("forward", "backward", "optim"):
            assert ph[p] > 0, (context, stage, p)
        assert (ph["targets"] > 0) == (k > 0), (context, stage)
        measured = sum(ph[p] for p in ("targets", "forward", "backward", "optim"))
        # the four timed phases lie inside the step and make up most of it; "other" is the rest
        assert 0.5 * r["step_s"] <= measured <= r["step_s"] * 1.001, (context, stage, ph, r["step_s"])
        assert abs(sum(ph.values()) - r["step_s"]) < 1e-6 * max(1.0, r["step_s"])
    teacher = cells[(CONTEXTS[0], "teacher")]
    assert teacher["ratio"] == 1.0
    k1 = cells[(CONTEXTS[0], "k1")]
    assert abs(k1["ratio"] - k1["tokens_per_s"] / teacher["tokens_per_s"]) < 1e-9
    assert "ratio" in proc.stdout and "teacher" in proc.stdout  # the table
