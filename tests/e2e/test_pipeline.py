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



def _random_exports(rank, world, root, shards):
    """Decoder folders of a random smoke-sized AR teacher (root/teacher/export) and a k1 student
    made from it (root/k1/export), in a process of their own (run_distributed)."""
    import dataclasses

    import torch

    from kforcing_dist.config import load_config
    from kforcing_dist.data.tokenizer import load_tokenizer
    from kforcing_dist.decode.format import save_decoder
    from kforcing_dist.model import TransformerLM, full_state_dict
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    groups = init_model_parallel(1, 1, init_distributed(resolve_launch(), "gloo"))
    cfg, _ = load_config(SMOKE)
    tokenizer = load_tokenizer(shards / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    padded = pad_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, 1)
    torch.manual_seed(0)
    teacher = TransformerLM(model_cfg, padded, groups)
    k1 = PFLM(model_cfg, padded, groups, max_k=1, noise_max_freq=cfg.distill.noise_max_freq)
    k1.init_from_teacher(teacher, groups)
    noise = {"max_freq": cfg.distill.noise_max_freq}
    for name, model, extra in (("teacher", teacher, {}), ("k1", k1, dict(max_k=1, noise=noise))):
        save_decoder(root / name / "export", kind="pflm" if extra else "ar", model_config=model_cfg,
                     padded_vocab_size=padded, state_dict=full_state_dict(model, groups), tokenizer=tokenizer,
                     **extra)
    shutdown()


def test_teacher_chain_stage_trains_from_the_ar_teacher(smoke_shards, tmp_path):
    """Stage k2 with distill.higher_stage_targets=teacher_chain from untrained exports: it trains two
    steps and records the AR teacher as the source of its targets."""
    from kforcing_dist.decode.format import read_decoder_config
    from tests.distributed.launcher import run_distributed

    run_distributed(_random_exports, 1, tmp_path, smoke_shards)
    run_cli("distill", "--stage", "k2", "-c", SMOKE, "-o", tmp_path, "--set", f"data.shards_dir={smoke_shards}",
            "--set", "distill.higher_stage_targets=teacher_chain", "--set", "distill.stage_steps=[1,2,1]",
            "--set", "train.eval_batches=1")
    log = [json.loads(line) for line in (tmp_path / "k2" / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)
    source = read_decoder_config(tmp_path / "k2" / "export")["source"]
    assert source["step"] == 2 and source["teacher"] == str(tmp_path / "teacher" / "export")
