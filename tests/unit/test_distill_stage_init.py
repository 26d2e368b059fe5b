"""Where a distillation stage starts: the previous student (its run's stage export or
distill.init_from_student, e.g. an imported released PFLM), and the noise-feature convention it
inherits from that student (a config that explicitly asks for another is refused)."""

from __future__ import annotations

import pytest

from kforcing_dist.config import ConfigError, load_config, validate
from kforcing_dist.config.schema import Config
from kforcing_dist.decode.format import save_decoder
from kforcing_dist.training.checkpoint import CheckpointError
from kforcing_dist.stage import Stage
from tests.released_parity import imported


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {kind: save_decoder(root / kind, **imported(kind)) for kind in ("ar", "pflm")}


def _cfg(tmp_path, *overrides):
    return load_config(None, list(overrides), str(tmp_path / "run"))[0]


def previous_student(cfg, k):
    return Stage(cfg, k).previous()


def stage_noise(cfg, prev_conf):
    return Stage(cfg, 2).noise(prev_conf)


def test_init_from_student_starts_the_stage_after_it(released, tmp_path):
    cfg = _cfg(tmp_path, f"distill.init_from_student={released['pflm']}")
    path, conf = previous_student(cfg, 8)
    assert path == released["pflm"] and conf["max_k"] == 4
    with pytest.raises(CheckpointError, match=r"holds a k=4 student .* stage k4 starts from a k=2 one; run the "
                                              r"stage it continues: --stage k8"):
        previous_student(cfg, 4)
    with pytest.raises(CheckpointError, match="must be 'pflm'"):
        previous_student(_cfg(tmp_path, f"distill.init_from_student={released['ar']}"), 8)


def test_without_init_from_student_the_run_export_is_read(released, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(CheckpointError, match="set distill.init_from_student"):
        previous_student(cfg, 8)
    export = tmp_path / "run" / "k4" / "export"
    export.parent.mkdir(parents=True)
    export.symlink_to(released["pflm"], target_is_directory=True)
    assert previous_student(cfg, 8)[1]["noise"]["features"] == "released"


def test_a_later_stage_takes_its_students_noise_features(released, tmp_path):
    from kforcing_dist.decode.format import read_decoder_config

    prev = read_decoder_config(released["pflm"])
    assert stage_noise(_cfg(tmp_path), prev) == {"features": "released", "max_freq": None}
    assert stage_noise(Config(), prev)["features"] == "released"  # a config not read from YAML
    assert stage_noise(_cfg(tmp_path, "distill.noise_features=released"), prev)["features"] == "released"
    with pytest.raises(ConfigError, match="distill.noise_features='rising' but the student it starts from uses "
                                          "'released'"):
        stage_noise(_cfg(tmp_path, "distill.noise_features=rising"), prev)
    rising = {**prev, "noise": {"features": "rising", "max_freq": 64.0}}
    assert stage_noise(_cfg(tmp_path), rising) == {"features": "rising", "max_freq": 64.0}
    with pytest.raises(ConfigError, match="distill.noise_max_freq=256.0 but the student it starts from uses 64.0"):
        stage_noise(_cfg(tmp_path, "distill.noise_max_freq=256"), rising)
    # stage 1 trains a fresh noise encoder: the config decides
    assert stage_noise(_cfg(tmp_path, "distill.noise_features=released"), None)["features"] == "released"
    assert stage_noise(_cfg(tmp_path), None) == {"features": "rising", "max_freq": 256.0}


def test_a_later_stage_distils_the_teacher_truncation_of_its_student(released, tmp_path):
    stage = Stage(_cfg(tmp_path, f"distill.init_from_student={released['pflm']}", "distill.stages=[1,2,4,8]"), 8)
    assert stage.inputs().previous_conf["teacher_min_p"] == 0.0  # an imported model: the exact teacher
    assert stage.export_fields()["teacher_min_p"] == 0.0
    cut = Stage(_cfg(tmp_path, f"distill.init_from_student={released['pflm']}", "distill.stages=[1,2,4,8]",
                     "distill.teacher_min_p=0.1"), 8)
    with pytest.raises(ConfigError, match=r"distill.teacher_min_p=0.1 but the student it starts from .* was "
                                          r"distilled against teacher_min_p=0.0"):
        cut.inputs()


def test_config_checks(tmp_path):
    problems = validate(_cfg(tmp_path, f"distill.init_from_student={tmp_path / 'nope'}"))
    assert any("distill.init_from_student" in p and "not a decoder folder" in p for p in problems)
    problems = validate(_cfg(tmp_path, "distill.noise_max_freq=0.5"))
    assert any("distill.noise_max_freq=0.5 must be >= 1" in p for p in problems)
    assert not validate(_cfg(tmp_path, "distill.noise_max_freq=0.5", "distill.noise_features=released"))
    with pytest.raises(ConfigError, match="'sideways' is not one of 'rising', 'released'"):
        _cfg(tmp_path, "distill.noise_features=sideways")


def test_stage_inputs_name_the_targets_and_the_starting_weights(released, tmp_path):
    """Stage 8 from an imported k4 student: self-forcing targets from that student, teacher_chain
    targets from the AR teacher named by distill.teacher (which the stage then loads too)."""
    base = ("distill.stages=[1,2,4,8]", f"distill.init_from_student={released['pflm']}",
            f"distill.teacher={released['ar']}")
    own = Stage(_cfg(tmp_path, *base), 8).inputs()
    assert (own.targets_from, own.init_from, own.teacher_conf) == (released["pflm"], released["pflm"], None)
    assert own.noise["features"] == "released" and own.arch == own.previous_conf["model"]
    chain = Stage(_cfg(tmp_path, *base, "distill.higher_stage_targets=teacher_chain"), 8).inputs()
    assert (chain.targets_from, chain.init_from) == (released["ar"], released["pflm"])
    assert chain.teacher_conf["kind"] == "ar"
    with pytest.raises(ConfigError, match="stage k8 is not in distill.stages"):
        Stage(_cfg(tmp_path, *base[1:]), 8).inputs()
    with pytest.raises(ConfigError, match="stage k1 starts from the AR teacher"):
        Stage(_cfg(tmp_path, *base), 1).inputs()


def test_a_teacher_fine_tuned_from_a_released_model_keeps_its_mask_token(released, tmp_path):
    """train.init_from of an imported released AR model: its masked token stays masked in the teacher
    (and so in the teacher's export); a resume reads the run's own checkpoint instead."""
    from kforcing_dist.stage_trainer import teacher_masked_token_ids
    from kforcing_dist.training.checkpoint import MARKER

    assert teacher_masked_token_ids(_cfg(tmp_path)) == []
    cfg = _cfg(tmp_path, f"train.init_from={released['ar']}")
    assert teacher_masked_token_ids(cfg) == [60]  # the released model's mask token
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text('{"masked_token_ids": [7]}')
    assert teacher_masked_token_ids(cfg) == [60]  # not complete yet: still the folder's
    (step / MARKER).write_text("")
    assert teacher_masked_token_ids(cfg) == [7]
    # a damaged newest checkpoint is the checkpointer's to report (or skip): the previous one's ids
    newer = step.parent / "step-00000004"
    newer.mkdir()
    (newer / "metadata.json").write_text('{"masked_token_ids": [7')
    (newer / MARKER).write_text("")
    assert teacher_masked_token_ids(cfg) == [7]
    with pytest.raises(CheckpointError, match="train.init_from: decoder folder .* does not exist"):
        teacher_masked_token_ids(_cfg(tmp_path / "other", f"train.init_from={tmp_path / 'missing'}"))
