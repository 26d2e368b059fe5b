"""The smoke pipeline end to end: teacher -> k1 -> k2 -> k4 -> report, then decode from the exports."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import SMOKE, run_cli


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.fixture(scope="module")
def pipeline_run(smoke_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    run_cli("pipeline", "-c", SMOKE, "-o", out, "--set", f"data.shards_dir={smoke_shards}", timeout=900)
    return out


def test_report_contract_and_no_nans(pipeline_run):
    r = json.loads((pipeline_run / "report.json").read_text())
    assert r["teacher"]["val_ppl"] > 1 and r["device"]
    for k in (1, 2, 4):
        s = r["stages"][f"k{k}"]
        assert len(s["slot_agreement"]) == k
        assert 0 <= s["block_agreement"] <= min(s["slot_agreement"]) + 1e-9
        assert 0 < s["chance_level"] < 1
        for key in ("nll", "entropy"):
            assert r["samples"][f"k{k}"][key] > 0
    for key in ("nll", "entropy"):
        assert r["samples"]["teacher"][key] > 0
    for batch in ("1", "4"):
        assert set(r["speed"]["tokens_per_s"][batch]) == {"ar", "k1", "k2", "k4"}
    assert all(math.isfinite(x) for x in _numbers(r)), "NaN or inf in the report"
    assert (pipeline_run / "report.md").read_text().startswith("# K-Forcing report")


def test_stage1_beats_chance(pipeline_run):
    s = json.loads((pipeline_run / "report.json").read_text())["stages"]["k1"]
    assert s["slot_agreement"][0] > 1.5 * s["chance_level"], s


def test_stage_rerun_resumes_without_training(pipeline_run, smoke_shards):
    before = (pipeline_run / "k2" / "train_log.jsonl").read_text()
    run_cli("distill", "--stage", "k2", "-c", SMOKE, "-o", pipeline_run, "--set", f"data.shards_dir={smoke_shards}")
    assert (pipeline_run / "k2" / "train_log.jsonl").read_text() == before


def test_generate_cli_jsonl(pipeline_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The function returns\nParameters\n")
    out = tmp_path / "out.jsonl"
    run_cli("generate", "--model", pipeline_run / "k4" / "export", "--prompts", prompts, "--out", out,
            "--set", "decode.max_new_tokens=8")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The function returns", "Parameters"]
    assert all(r["mode"] == "pflm" and r["k"] == 4 and 0 < len(r["tokens"]) <= 8 for r in rows)


def test_generate_refuses_k_above_trained(pipeline_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    proc = run_cli("generate", "--model", pipeline_run / "k2" / "export", "--prompts", prompts, "--k", "4",
                   check=False)
    assert proc.returncode == 2 and "max_k=2" in proc.stderr


def test_distill_without_previous_stage_is_refused(smoke_shards, tmp_path):
    proc = run_cli("distill", "--stage", "k2", "-c", SMOKE, "-o", tmp_path, "--set",
                   f"data.shards_dir={smoke_shards}", check=False)
    assert proc.returncode == 2 and "stage-k1 export" in proc.stderr and "--stage k1" in proc.stderr
