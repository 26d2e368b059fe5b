"""The GPU device check script's dry run (CPU, tiny model): every phase runs and every output
is written, so the script works when a session is lent a GPU."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kforcing_dist.decode.bench import ROW_FIELDS
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def load_script():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_dry_run_writes_every_output(tmp_path):
    script = load_script()
    assert script.main(["-o", str(tmp_path), "--device", "cpu", "--tiny"]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert all(p["ok"] for p in report["phases"].values()), report["phases"]
    assert all(report["phases"]["correctness"]["result"].values())
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["rows"]) == 2 * 7 and not bench["skipped"]
    assert all(set(ROW_FIELDS) <= set(r) for r in bench["rows"])
    assert (tmp_path / "tokens_per_s_vs_batch.png").exists()


def test_device_check_budget_skips_cells_but_still_writes(tmp_path):
    script = load_script()
    assert script.main(["-o", str(tmp_path), "--device", "cpu", "--tiny", "--budget-s", "0"]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["rows"] == [] and len(bench["skipped"]) == 2 * 7
