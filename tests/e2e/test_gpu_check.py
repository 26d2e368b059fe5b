"""The GPU readiness check's dry run (CPU, tiny shapes, gloo, fp32, no CUDA graphs): every phase
runs and passes, its figures are written, and a failing phase fails the run without stopping the
others, so ``bench/gpu_check.py`` works when a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
PHASES = ["install", "pytest_gpu", "train_smoke", "decode_sweep", "distill_throughput"]


def probe_wheel(folder):
    """A one-module wheel of a distribution nothing here has: the install phase must put it in
    the scratch prefix without a registry."""
    folder.mkdir()
    info = "kfd_probe-0.1.dist-info"
    with zipfile.ZipFile(folder / "kfd_probe-0.1-py3-none-any.whl", "w") as z:
        z.writestr("kfd_probe/__init__.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: kfd-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder


def gpu_check(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_passes_every_phase_and_writes_its_figures(tmp_path):
    out, prefix = tmp_path / "out", tmp_path / "prefix"
    proc = gpu_check("-o", out, "--dry-run", "--wheels", probe_wheel(tmp_path / "wheels"), "--prefix", prefix)
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phases"]
    assert list(phases) == PHASES
    throughput_expected = "ok" if (ROOT / "bench" / "distill_throughput.py").exists() else "not available"
    statuses = {n: p["status"] for n, p in phases.items()}
    assert statuses == {**dict.fromkeys(PHASES[:-1], "ok"), "distill_throughput": throughput_expected}, \
        (statuses, {n: p.get("error") for n, p in phases.items()}, proc.stdout[-3000:])
    assert proc.returncode == 0 and summary["failed"] == [] and summary["dry_run"]

    install = phases["install"]["figures"]
    assert install["installed"] == ["kfd-probe"] and (prefix / "kfd_probe" / "__init__.py").is_file()
    assert {"deepspeed", "megatron-core", "datasets", "torch"} <= set(install["versions"])
    tests = phases["pytest_gpu"]["figures"]
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"]  # CUDA tests skip on a CPU
    smoke = phases["train_smoke"]["figures"]
    for run in ("teacher_loss", "k1_loss"):
        assert smoke[run]["last"] < smoke[run]["first"], smoke
    assert smoke["decoded_k1"] == smoke["decoded_teacher"] == 2 and smoke["teacher_tokens_per_s"] > 0
    assert list((out / "smoke" / "consolidated").glob("*.safetensors"))
    sweep = phases["decode_sweep"]["figures"]
    assert sweep["rows"] == 2 * 7 and sweep["skipped_cells"] == 0  # AR, k1, k2, k4, 3 lossless x 2 batches
    assert set(sweep["k4_over_ar"]) == {"1", "2"} and all(x > 0 for x in sweep["k4_over_ar"].values())
    if throughput_expected == "ok":
        tp = phases["distill_throughput"]["figures"]
        assert tp["teacher_tokens_per_s"] > 0 and tp["k1_over_teacher"] > 0 and tp["k4_over_teacher"] > 0
    table = (out / "summary.md").read_text()
    assert all(f"| {name} | {statuses[name]} |" in table for name in PHASES)
    assert "| phase | status | seconds | key figures |" in proc.stdout


def test_a_failing_phase_fails_the_run_and_the_next_phase_still_runs(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check("-o", out, "--dry-run", "--phases", "train_smoke,pytest_gpu",
                     "--smoke-config", tmp_path / "missing.yaml")
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 1 and summary["failed"] == ["train_smoke"]
    assert "missing.yaml" in summary["phases"]["train_smoke"]["error"]
    assert summary["phases"]["pytest_gpu"]["status"] == "ok"
