"""A student distilled against a min-p truncated teacher (``distill.teacher_min_p``): the value is
recorded in its decoder folder, and AR sampling and lossless decoding reproduce that truncated
teacher (never a cut token); an AR folder cannot carry it and old folders read as 0."""

from __future__ import annotations

import json

import pytest
import torch

from kforcing_dist.config import load_config
from kforcing_dist.decode import DecodeError, generate, generate_lossless, load_decoder, read_decoder_config, \
    save_decoder
from kforcing_dist.nn.inverse_cdf import probabilities
from tests.unit.test_decode_generate import PROMPTS, V, make_model
from tests.unit.test_decode_lossless import teacher_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _save(folder, kind="pflm", **kw):
    model = make_model(kind)
    extra = {"max_k": 4, "noise": {"max_freq": 64.0}} if kind == "pflm" else {}
    return save_decoder(folder, kind=kind, model_config=model.model_config, padded_vocab_size=128,
                        state_dict=model.state_dict(), **extra, **kw)


def test_teacher_min_p_is_written_read_back_and_checked(tmp_path):
    folder = _save(tmp_path / "pf", teacher_min_p=0.1)
    assert json.loads((folder / "config.json").read_text())["teacher_min_p"] == 0.1
    assert load_decoder(folder).config["teacher_min_p"] == 0.1
    assert read_decoder_config(_save(tmp_path / "plain"))["teacher_min_p"] == 0.0
    assert read_decoder_config(_save(tmp_path / "ar", kind="ar"))["teacher_min_p"] is None
    with pytest.raises(DecodeError, match="teacher_min_p belongs to pflm"):
        _save(tmp_path / "ar2", kind="ar", teacher_min_p=0.1)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(DecodeError, match=r"teacher_min_p must be a number in \[0, 1\)"):
            _save(tmp_path / "bad", teacher_min_p=bad)
    conf = json.loads((folder / "config.json").read_text())
    del conf["teacher_min_p"]  # as written before the key existed
    (folder / "config.json").write_text(json.dumps(conf))
    assert read_decoder_config(folder)["teacher_min_p"] == 0.0


def _cut_tokens(teacher, prompts, tokens, tau, min_p):
    """How many sampled tokens lie below min_p x the most likely token's probability."""
    cut = 0
    for p, row in zip(prompts, tokens):
        logits = teacher.logits(torch.tensor([p + row]))[0, len(p) - 1:-1, :V]
        probs = probabilities(logits, tau)
        chosen = probs.gather(1, torch.tensor(row)[:, None])[:, 0]
        cut += int((chosen < min_p * probs.max(1).values).sum())
    return cut


@pytest.mark.parametrize("sampling", ["multinomial", "inverse_cdf"])
def test_ar_sampling_with_min_p_never_emits_a_cut_token(sampling):
    teacher = make_model("ar", seed=1, std=0.6)
    kw = dict(mode="ar", max_new_tokens=30, tau=1.0, seed=2, sampling=sampling)
    exact = generate(teacher, PROMPTS, **kw).tokens
    cut = generate(teacher, PROMPTS, **kw, min_p=0.3).tokens
    assert _cut_tokens(teacher, PROMPTS, exact, 1.0, 0.3) > 5  # the exact teacher does sample the tail
    assert _cut_tokens(teacher, PROMPTS, cut, 1.0, 0.3) == 0
    with pytest.raises(DecodeError, match=r"min_p must be a number in \[0, 1\)"):
        generate(teacher, PROMPTS, **kw, min_p=1.5)


def test_lossless_reproduces_the_truncated_teacher_of_its_student(tmp_path):
    teacher = make_model("ar", seed=1, std=0.6)
    student = load_decoder(_save(tmp_path / "pf", teacher_min_p=0.3))
    res = generate_lossless(student, teacher, PROMPTS, k=3, max_new_tokens=12, seed=4)  # min_p: the student's
    ref = generate(teacher, PROMPTS, mode="ar", sampling="inverse_cdf", max_new_tokens=12, seed=4, min_p=0.3)
    assert res.tokens == ref.tokens
    assert res.tokens != teacher_reference(teacher, PROMPTS, 12, 1.0, 4, "vocab")  # the exact teacher's
    assert generate_lossless(student, teacher, PROMPTS, k=3, max_new_tokens=12, seed=4,
                             min_p=0.0).tokens == teacher_reference(teacher, PROMPTS, 12, 1.0, 4, "vocab")


def test_training_exports_record_the_configured_truncation(groups, tmp_path):
    """The two writers of a student's decoder folder: the stage export and offline consolidation."""
    from kforcing_dist.convert.training import TrainingCheckpoint, decoder_fields
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.stage import Stage
    from kforcing_dist.training.export import export_decoder

    cfg, _ = load_config(None, ["distill.teacher_min_p=0.05", "model.vocab_size=100", "model.hidden_size=32",
                                "model.num_layers=1", "model.num_heads=4"], str(tmp_path / "run"))
    ck = TrainingCheckpoint(tmp_path, {"kind": "pflm-k2", "k": 2, "padded_vocab_size": 128}, {}, cfg)
    assert decoder_fields(ck)["teacher_min_p"] == 0.05
    torch.manual_seed(0)
    student = PFLM(cfg.model, 128, groups.tp_group, max_k=2)
    fields = {k: v for k, v in Stage(cfg, 2).export_fields().items() if k != "kind"}
    folder = export_decoder(student, groups, tmp_path / "export", kind="pflm", model_cfg=cfg.model,
                            padded_vocab_size=128, zero_stage=0, **fields)
    assert read_decoder_config(folder)["teacher_min_p"] == 0.05
