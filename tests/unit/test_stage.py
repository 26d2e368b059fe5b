"""The Stage of a run: its folders, the AR teacher it reads (distill.teacher), the config it trains
with and the frozen models it holds; the memory plan sizes that very config."""

from __future__ import annotations

import pytest

from kforcing_dist.config import load_config
from kforcing_dist.parallel.plan import make_plan
from kforcing_dist.config import ConfigError
from kforcing_dist.stage import TEACHER, Stage, parse_stage


def _cfg(tmp_path, *overrides):
    return load_config(None, list(overrides), str(tmp_path / "run"))[0]


def test_folders_and_the_teacher_override(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    assert Stage(cfg, TEACHER).run_dir == run / "teacher" and Stage(cfg, 2).export_dir == run / "k2" / "export"
    assert Stage(cfg, 1).teacher_export == run / "teacher" / "export"
    elsewhere = tmp_path / "pretrained"
    (elsewhere / "export").mkdir(parents=True)
    named = _cfg(tmp_path, f"distill.teacher={elsewhere}")
    assert Stage(named, 1).teacher_export == elsewhere  # no export/config.json: the folder is the export
    (elsewhere / "export" / "config.json").write_text("{}")
    assert Stage(named, 1).teacher_export == elsewhere / "export"  # a run folder: its export
    assert Stage(named, 1).teacher_summary == elsewhere / "teacher_summary.json"
    assert parse_stage("k4") == parse_stage("4") == 4


def test_parse_stage_is_one_rule_for_distill_and_plan():
    assert parse_stage("K2", [1, 2, 4]) == 2 and parse_stage("teacher", [1, 2], teacher=True) == TEACHER
    for text, stages, teacher in (("teacher", None, False), ("k3", [1, 2, 4], True), ("k0", None, False),
                                  ("kx", None, False)):
        with pytest.raises(ConfigError, match=f"--stage '{text}'"):
            parse_stage(text, stages, teacher=teacher)
    with pytest.raises(ConfigError, match="use teacher or k1, k2 \\(distill.stages\\)"):
        parse_stage("k8", [1, 2], teacher=True)


def test_stage_config_takes_the_distill_schedule(tmp_path):
    cfg = _cfg(tmp_path, "distill.stages=[1,2]", "distill.stage_steps=[7,9]", "distill.seq_len=24",
               "distill.lr=0.01", "train.seq_len=64")
    k2 = Stage(cfg, 2).config({**vars(cfg.model), "hidden_size": 96}, {"features": "released", "max_freq": None})
    assert (k2.output_dir, k2.data.shards_dir) == (str(tmp_path / "run" / "k2"), str(tmp_path / "run" / "data"))
    assert (k2.train.max_steps, k2.train.seq_len, k2.train.lr, k2.model.hidden_size) == (9, 24, 0.01, 96)
    assert k2.distill.noise_features == "released" and cfg.distill.noise_features == "rising"
    teacher = Stage(cfg, TEACHER).config()
    assert teacher.output_dir == str(tmp_path / "run" / "teacher") and teacher.train == cfg.train
    assert make_plan(cfg, 1, 1, "k2").context_len == 24 and make_plan(cfg, 1, 1, "teacher").context_len == 64


@pytest.mark.parametrize("overrides,k,ar,prev", [
    ((), 1, True, False), ((), 2, False, True), (("distill.noise_inversion_weight=0.5",), 2, True, True),
    (("distill.higher_stage_targets=teacher_chain",), 4, True, False), (("distill.noise_inversion_weight=0.5",), 0,
                                                                        False, False)])
def test_frozen_models_of_a_stage(tmp_path, overrides, k, ar, prev):
    stage = Stage(_cfg(tmp_path, *overrides), k)
    assert (stage.needs_ar_teacher, stage.needs_previous_student) == (ar, prev)
    plan = make_plan(stage.cfg, 1, 1, stage.name) if k else None
    if plan:
        assert ("AR teacher" in plan.frozen_model, f"k{k // 2} student" in plan.frozen_model) == (ar, prev)


def test_export_fields(tmp_path):
    cfg = _cfg(tmp_path, "distill.tau_min=0.5", "distill.cdf_order=sorted")
    assert Stage(cfg, TEACHER).export_fields() == {"kind": "ar", "masked_token_ids": []}
    assert Stage(cfg, TEACHER).export_fields(masked_token_ids=[5]) == {"kind": "ar", "masked_token_ids": [5]}
    noise = {"features": "rising", "max_freq": 64.0}
    assert Stage(cfg, 2).export_fields(noise, [7]) == {
        "kind": "pflm", "max_k": 2, "noise": noise, "masked_token_ids": [7], "tau_range": (0.5, cfg.distill.tau_max),
        "cdf_order": "sorted", "teacher_min_p": 0.0}
