"""bench/budget_curve.py reads the figures it plots from run reports, in budget order."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("budget_curve", ROOT / "bench" / "budget_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(folder: Path, k1: float, k4_block: float) -> str:
    folder.mkdir()
    stage = {"mode_baseline": {"slot": [0.3], "block": 0.07}, "chance_level_per_slot": [0.19],
             "block_chance": 0.04, "contexts": 256}
    stages = {"k1": dict(stage, slot_agreement=[k1]),
              "k4": dict(stage, slot_agreement=[0.3] * 4, block_agreement=k4_block)}
    (folder / "report.json").write_text(json.dumps({"stages": stages}))
    return str(folder)


def test_table_and_plot_follow_the_budgets(tmp_path, capsys):
    curve = _load()
    big = _report(tmp_path / "4x", 0.5, 0.12)
    small = _report(tmp_path / "1x", 0.4, 0.07)
    out = tmp_path / "curve.png"
    assert curve.main([f"4={big}", f"1={small}", "--out", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1x") or
            line.startswith("| 4x")]
    assert rows[0].startswith("| 1x | 40.0% | 7.0%") and rows[1].startswith("| 4x | 50.0% | 12.0%")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec", ["two=runs/x", "0=runs/x", "runs/x"])
def test_bad_spec_is_a_usage_error(spec, capsys):
    with pytest.raises(SystemExit) as exc:
        _load().main([spec])
    assert exc.value.code == 2 and "MULTIPLIER=RUN_FOLDER" in capsys.readouterr().err


def test_a_run_without_k4_adds_a_k1_point_only(tmp_path, capsys):
    curve = _load()
    both = _report(tmp_path / "1x", 0.4, 0.07)
    k1_only = tmp_path / "4x"
    _report(k1_only, 0.5, 0.1)
    report = json.loads((k1_only / "report.json").read_text())
    del report["stages"]["k4"]
    (k1_only / "report.json").write_text(json.dumps(report))
    assert curve.main([f"1={both}", f"4={k1_only}", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| 4x | 50.0% | - |" in out and "k4 block chance 4.0%" in out


def test_missing_k1_names_it(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"stages": {"k4": {}}}))
    with pytest.raises(SystemExit) as exc:
        _load().main([f"1={folder}"])
    assert exc.value.code == 2 and "no stage k1" in capsys.readouterr().err
