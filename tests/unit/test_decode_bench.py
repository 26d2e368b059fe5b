"""The decode benchmark: the sweep runs end to end on a tiny model (CLI included), its JSON has
every field the issue lists, the cost model counts what each mode runs, and bad input is refused."""

from __future__ import annotations

import json

import pytest

from kforcing_dist.decode import DecodeError
from kforcing_dist.decode.bench import (ROW_FIELDS, bench_sweep, cost_model, random_models,
                                        speed_run, write_bench)
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TINY = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=0,
            ffn_hidden_size=0, max_seq_len=64, make_vocab_size_divisible_by=64)


def tiny_pair(max_k=4):
    from kforcing_dist.config.schema import ModelConfig
    import dataclasses

    m = {**dataclasses.asdict(ModelConfig()), **TINY}
    return random_models(m, max_k=max_k)


def test_sweep_rows_have_every_field_and_ratios_against_ar(tmp_path):
    ar, pflm = tiny_pair()
    seen = []
    result = bench_sweep(ar, pflm, batches=[1, 3], ks=[1, 2], contexts=[4, 9], new_tokens=6,
                         repeats=2, progress=seen.append)
    rows = result["rows"]
    # 2 contexts x 2 batches x (ar + pflm k1,k2 + lossless k1,k2)
    assert len(rows) == 2 * 2 * 5 and seen == rows
    for r in rows:
        assert set(ROW_FIELDS) <= set(r)
        assert r["device"].startswith("cpu") and r["mode"] in ("ar", "pflm", "lossless")
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["flops_per_token"] > 0 and r["achieved_bandwidth_gb_s"] is None  # CPU
    for context in (4, 9):
        for batch in (1, 3):
            cell = [r for r in rows if r["context"] == context and r["batch"] == batch]
            ar_row = next(r for r in cell if r["mode"] == "ar")
            assert ar_row["speedup_vs_ar"] == 1.0
            for r in cell:
                assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / ar_row["tokens_per_s"])
    assert all(r["acceptance_length"] >= 1 for r in rows if r["mode"] == "lossless")
    assert [r["steps"] for r in rows if r["mode"] == "pflm"][:2] == [6, 3]

    paths = write_bench(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["device"] == rows[0]["device"] and len(data["rows"]) == len(rows)
    md = paths["md"].read_text()
    assert data["device"] in md and "lossless" in md
    for name in ("tokens_per_s_vs_batch.png", "speedup_vs_batch.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


def test_sweep_decodes_every_cell_with_its_resolved_penalty(monkeypatch):
    import kforcing_dist.decode.bench as bench

    seen = []

    def recording(real):
        def call(*args, **kw):
            seen.append((kw.get("mode", "lossless"), kw["k"], kw["frequency_penalty"]))
            return real(*args, **kw)
        return call

    monkeypatch.setattr(bench, "generate", recording(bench.generate))
    monkeypatch.setattr(bench, "generate_lossless", recording(bench.generate_lossless))
    ar, pflm = tiny_pair()
    result = bench_sweep(ar, pflm, batches=[2], ks=[2, 4], contexts=[3], new_tokens=4, repeats=1,
                         frequency_penalty={2: 0.2})
    want = {("ar", 1): 0.0, ("pflm", 2): 0.2, ("pflm", 4): 0.5, ("lossless", 2): 0.2,
            ("lossless", 4): 0.5}
    assert {(m, k): p for m, k, p in seen} == want and len(seen) == 2 * len(want)
    assert {(r["mode"], r["k"]): r["frequency_penalty"] for r in result["rows"]} == want
    assert result["settings"]["frequency_penalty"] == {2: 0.2}
    # one number is for every decode, the AR teacher included
    seen.clear()
    bench_sweep(ar, pflm, batches=[1], ks=[2], contexts=[3], new_tokens=2, repeats=1,
                lossless=False, frequency_penalty=0.7)
    assert {p for _, _, p in seen} == {0.7}


def test_cost_model_counts_positions_per_token():
    ar, pflm = tiny_pair()
    a = cost_model("ar", 1, 2, 10, 10, ar)["flops_per_token"]
    p4 = cost_model("pflm", 4, 2, 10, 10, pflm)["flops_per_token"]
    # a PFLM step runs 2k positions (k tokens fed back + k noise slots) for k tokens, plus the
    # noise encoder: more FLOPs per token than AR, never fewer
    assert p4 > a
    full = cost_model("lossless", 4, 2, 10, 10, pflm, ar, acceptance_length=5.0)
    none = cost_model("lossless", 4, 2, 10, 10, pflm, ar, acceptance_length=1.0)
    assert none["flops_per_token"] > full["flops_per_token"]
    # bytes per pass: weights once plus the attended cache, which grows with the batch
    assert cost_model("ar", 1, 8, 10, 10, ar)["bytes_per_step"] > \
        cost_model("ar", 1, 1, 10, 10, ar)["bytes_per_step"]


def test_speed_run_lossless_reports_acceptance():
    ar, pflm = tiny_pair()
    r = speed_run(pflm, mode="lossless", k=2, batch=2, prompt_len=3, new_tokens=5, repeats=1,
                  teacher=ar)
    assert r["acceptance_length"] >= 1 and r["tokens_per_second_e2e"] <= r["tokens_per_second"]
    with pytest.raises(DecodeError, match="needs the AR teacher"):
        speed_run(pflm, mode="lossless", k=2, batch=1, new_tokens=2, repeats=1)


@pytest.mark.parametrize("kw, match", [
    (dict(batches=[]), "batches must be a non-empty list"),
    (dict(ks=[0]), "ks must be a non-empty list of positive"),
    (dict(repeats=0), "repeats must be"),
])
def test_sweep_refuses_bad_settings(kw, match):
    ar, pflm = tiny_pair()
    args = dict(batches=[1], ks=[1], contexts=[4], new_tokens=2, repeats=1)
    args.update(kw)
    with pytest.raises(DecodeError, match=match):
        bench_sweep(ar, pflm, **args)
    with pytest.raises(DecodeError, match="needs the AR teacher"):
        bench_sweep(pflm, pflm, batches=[1], ks=[1], contexts=[4], new_tokens=2, repeats=1)


def test_bench_cli_end_to_end_on_a_tiny_random_model(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "-o", out, "--set", "model.hidden_size=32", "--set",
                   "model.num_layers=2", "--set", "model.vocab_size=128", "--batches", "1,2",
                   "--ks", "1,2", "--contexts", "6", "--new-tokens", "4", "--repeats", "1",
                   "--threads", "1", "--device", "cpu", timeout=120)
    data = json.loads((out / "bench.json").read_text())
    assert len(data["rows"]) == 2 * 5 and data["source"]["weights"] == "random"
    assert all(set(ROW_FIELDS) <= set(r) for r in data["rows"])
    assert data["device"] in proc.stdout
    assert (out / "speedup_vs_batch.png").exists()
    # decode.frequency_penalty's default: the authors' per-k values for the PFLM and its drafts
    pen = {(r["mode"], r["k"]): r["frequency_penalty"] for r in data["rows"]}
    assert pen == {("ar", 1): 0.0, ("pflm", 1): 0.5, ("pflm", 2): 0.3, ("lossless", 1): 0.5,
                   ("lossless", 2): 0.3}
    assert "Frequency penalty" in (out / "bench.md").read_text()


def test_bench_cli_refusals(tmp_path, capsys):
    from kforcing_dist.cli import main

    assert main(["bench", "-o", str(tmp_path), "--batches", "1,x"]) == 2
    assert "--batches must be comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "-o", str(tmp_path), "--teacher", str(tmp_path / "nope")]) == 2
    assert "is not a decoder folder" in capsys.readouterr().err
    assert main(["bench", "--batches", "1"]) == 2
    assert "give -o DIR" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on refusal
