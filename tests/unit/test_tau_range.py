"""The tau range a student was trained on: recorded in its decoder config.json (``tau_range``),
read back, and a warning when decoding outside it (library and CLI); old folders never warn."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kforcing_dist.config import load_config
from kforcing_dist.decode import (DecodeError, TauRangeWarning, generate, generate_lossless, load_decoder,
                                  read_decoder_config, save_decoder)
from tests.unit.test_decode_generate import PROMPTS, hf_tokenizer, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(folder, tau_range, kind="pflm", **kw):
    model = make_model(kind)
    extra = {"max_k": 4, "noise": {"max_freq": 64.0}} if kind == "pflm" else {}
    return save_decoder(folder, kind=kind, model_config=model.model_config, padded_vocab_size=128,
                        state_dict=model.state_dict(), tau_range=tau_range, **extra, **kw)


def _no_tau_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TauRangeWarning)
        return fn(*args, **kwargs)


def test_tau_range_is_written_and_read_back(tmp_path):
    folder = _save(tmp_path / "pf", (0.7, 1.3))
    assert json.loads((folder / "config.json").read_text())["tau_range"] == [0.7, 1.3]
    assert read_decoder_config(folder)["tau_range"] == [0.7, 1.3]
    assert load_decoder(folder).config["tau_range"] == [0.7, 1.3]
    assert read_decoder_config(_save(tmp_path / "ar", None, kind="ar"))["tau_range"] is None


@pytest.mark.parametrize("bad", [[1.3, 0.7], [0.0, 1.0], [1.0], "1.0", [1.0, float("inf")], [True, 2.0]])
def test_invalid_tau_range_is_refused(tmp_path, bad):
    with pytest.raises(DecodeError, match="tau_range must be"):
        _save(tmp_path / "pf", bad)


def test_ar_model_has_no_tau_range(tmp_path):
    with pytest.raises(DecodeError, match="tau_range belongs to pflm"):
        _save(tmp_path / "ar", [1.0, 1.0], kind="ar")


def test_decoding_outside_the_trained_range_warns_once(tmp_path):
    model = load_decoder(_save(tmp_path / "pf", [0.8, 1.2]))
    for tau in (0.8, 1.0, 1.2):  # inside, ends included
        _no_tau_warning(generate, model, PROMPTS, mode="pflm", k=2, max_new_tokens=6, tau=tau)
    for tau, shown in ((1.5, "1.5"), (0.5, "0.5")):
        with pytest.warns(TauRangeWarning) as caught:
            generate(model, PROMPTS, mode="pflm", k=2, max_new_tokens=6, tau=tau)
        assert len(caught) == 1  # one per call, not one per decode step
        assert str(caught[0].message) == (f"tau {shown} is outside the range [0.8, 1.2] this student was "
                                          "trained on; quality there is untested")
    teacher = make_model("ar")
    with pytest.warns(TauRangeWarning, match="tau 2 is outside"):
        generate_lossless(model, teacher, PROMPTS, k=2, max_new_tokens=4, tau=2.0)
    _no_tau_warning(generate_lossless, model, teacher, PROMPTS, k=2, max_new_tokens=4, tau=1.0)


def test_old_folder_without_the_key_loads_and_never_warns(tmp_path):
    folder = _save(tmp_path / "pf", [1.0, 1.0])
    path = folder / "config.json"
    conf = json.loads(path.read_text())
    del conf["tau_range"]  # as written before the key existed
    path.write_text(json.dumps(conf))
    model = load_decoder(folder)
    assert model.config["tau_range"] is None
    _no_tau_warning(generate, model, PROMPTS, mode="pflm", k=2, max_new_tokens=4, tau=3.0)


def test_generate_cli_prints_the_warning_once(tmp_path, capsys):
    from kforcing_dist.cli import main

    folder = _save(tmp_path / "pf", [1.0, 1.0], tokenizer=hf_tokenizer())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w17\nw42\nw3 w3\n")
    args = ["generate", "--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
            "--set", "decode.batch_size=1", "--set", "decode.max_new_tokens=3", "--set", "decode.k=2"]
    assert main(args + ["--set", "decode.tau=1.0"]) == 0
    assert "outside the range" not in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TauRangeWarning)
        assert main(args + ["--set", "decode.tau=1.5"]) == 0
    assert not [w for w in caught if w.category is TauRangeWarning]  # printed by the CLI, not per batch
    err = capsys.readouterr().err
    assert err.count("tau 1.5 is outside the range [1, 1] this student was trained on") == 1
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_training_exports_record_the_configured_range(groups, tmp_path):
    """The two writers of a student's decoder folder: the stage export and offline consolidation."""
    from kforcing_dist.convert.training import TrainingCheckpoint, decoder_fields
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.training.export import export_decoder

    cfg, _ = load_config(None, ["distill.tau_min=0.6", "distill.tau_max=1.4", "model.vocab_size=100",
                                "model.hidden_size=32", "model.num_layers=1", "model.num_heads=4"])
    ck = TrainingCheckpoint(tmp_path, {"kind": "pflm-k2", "k": 2, "padded_vocab_size": 128}, {}, cfg)
    assert decoder_fields(ck)["tau_range"] == (0.6, 1.4)
    torch.manual_seed(0)
    student = PFLM(cfg.model, 128, groups.tp_group, max_k=2)
    d = cfg.distill
    folder = export_decoder(student, groups, tmp_path / "export", kind="pflm", model_cfg=cfg.model,
                            padded_vocab_size=128, zero_stage=0, max_k=2, tau_range=(d.tau_min, d.tau_max))
    assert read_decoder_config(folder)["tau_range"] == [0.6, 1.4]
