"""Parity with the paper authors' own model code (tests/fixtures/released_parity): a released AR
model and a released PFLM imported with the library importer compute the authors' outputs in the
engine-free decoder and in the tensor-parallel training model (TP=1 here; TP=2 in
tests/distributed/test_released_parity_tp.py), and decoder folders record the noise-feature
convention (an old folder without it reads as ``rising``)."""

from __future__ import annotations

import json

import pytest
import torch

from kforcing_dist.decode import DecodeError, load_decoder
from kforcing_dist.decode.format import read_decoder_config, save_decoder
from tests.released_parity import TOL, errors, imported, reference, tp_model_errors


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {kind: save_decoder(root / kind, **imported(kind)) for kind in ("ar", "pflm")}


def _decoder_errors(folders) -> dict:
    ref = reference()
    ar, pflm = load_decoder(folders["ar"]), load_decoder(folders["pflm"])
    return errors(ar.logits(ref["context"]), pflm.pflm_logits(ref["context"], ref["noise"], ref["tau"]), ref)


def test_imported_pflm_records_released_features(folders):
    conf = read_decoder_config(folders["pflm"])
    assert conf["noise"] == {"features": "released", "max_freq": None}
    assert conf["masked_token_ids"] == [60] and conf["max_k"] == 4


def test_decoder_matches_the_authors_outputs(folders, one_thread):
    err = _decoder_errors(folders)
    assert err["ar"] < TOL, f"AR log-probs differ from the authors' by {err['ar']:.3g}"
    assert err["pflm"] < TOL, f"PFLM logits differ from the authors' by {err['pflm']:.3g}"
    assert err["tokens"], "PFLM argmax differs from the authors' tokens"


def test_the_convention_matters(folders, tmp_path, one_thread):
    """The same weights under the rising convention are far off: the reference pins the convention."""
    conf = json.loads((folders["pflm"] / "config.json").read_text())
    conf["noise"] = {"features": "rising", "max_freq": 256.0}
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(conf))
    (wrong / "model.safetensors").write_bytes((folders["pflm"] / "model.safetensors").read_bytes())
    assert _decoder_errors({"ar": folders["ar"], "pflm": wrong})["pflm"] > 100 * TOL


def test_tp1_training_model_matches_the_authors_outputs(groups, one_thread):
    err = tp_model_errors(groups.tp_group)
    assert err["ar"] < TOL, f"TransformerLM log-probs differ from the authors' by {err['ar']:.3g}"
    assert err["pflm"] < TOL, f"PFLM logits differ from the authors' by {err['pflm']:.3g}"
    assert err["tokens"]


def test_run_models_match_the_authors_outputs(groups, one_thread):
    """What `distill` (frozen teacher / previous student, new student) and `reshard` build from an
    exported folder's or checkpoint's noise features and masked tokens."""
    from kforcing_dist.model.pipeline import build_model

    def build(model_cfg, padded, max_k, noise, masked):
        return build_model(model_cfg, padded, groups, 1, max_k=max_k, noise=noise, masked_token_ids=masked)

    err = tp_model_errors(groups.tp_group, build)
    assert err["ar"] < TOL and err["pflm"] < TOL and err["tokens"], err


def test_old_folder_without_features_loads_as_rising(tmp_path, one_thread):
    """Folders exported before the convention was recorded hold {"max_freq": ...} only: rising."""
    fields = imported("pflm")
    fields["noise"] = {"features": "rising", "max_freq": 64.0}
    new = save_decoder(tmp_path / "new", **fields)
    conf = json.loads((new / "config.json").read_text())
    conf["noise"] = {"max_freq": 64.0}
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(conf))
    (old / "model.safetensors").write_bytes((new / "model.safetensors").read_bytes())
    assert read_decoder_config(old)["noise"] == {"features": "rising", "max_freq": 64.0}
    ref = reference()
    a, b = (load_decoder(f).pflm_logits(ref["context"], ref["noise"], ref["tau"]) for f in (new, old))
    assert torch.equal(a, b)


@pytest.mark.parametrize("noise, match", [
    ({"features": "sideways", "max_freq": 64.0}, "noise.features must be one of"),
    ({"features": "released", "max_freq": 256.0}, "applies to rising features only"),
    ({"features": "rising"}, "rising noise features need noise.max_freq"),
    ({"features": "rising", "max_freq": 64.0, "extra": 1}, "unknown noise fields"),
])
def test_bad_noise_sections_are_refused(noise, match, tmp_path):
    with pytest.raises(DecodeError, match=match):
        save_decoder(tmp_path / "x", **{**imported("pflm"), "noise": noise})


def test_released_noise_encoder_is_the_documented_maths():
    """The released convention written out from the authors' description, with weights large
    enough that the exact and tanh GELU differ (the fixture's small pre-activations hide it)."""
    import math

    import torch.nn.functional as F

    from kforcing_dist.nn.noise import NoiseEncoder

    H = 16
    torch.manual_seed(0)
    enc = NoiseEncoder(H, max_freq=None, init_std=1.0, features="released")
    u, tau = torch.rand(3, 5, dtype=torch.float64), torch.tensor([[1.0], [0.8], [1.3]])
    freqs = 10000 ** (-torch.arange(H // 2, dtype=torch.float64) / (H // 2))

    def feats(x):
        args = x[..., None] * freqs * 2 * math.pi
        return torch.cat([args.cos(), args.sin()], -1)

    x = enc.combined_proj(torch.cat([feats(u), feats(tau.double().expand(u.shape))], -1).float())
    h = F.layer_norm(x, (H,), enc.norm.weight, enc.norm.bias, 1e-5)
    want = x + enc.mlp[2](F.gelu(enc.mlp[0](h)))  # exact (erf) GELU
    with torch.no_grad():
        assert (enc(u, tau) - want).abs().max().item() < 1e-5
        tanh = x + enc.mlp[2](F.gelu(enc.mlp[0](h), approximate="tanh"))
        assert (tanh - want).abs().max().item() > 1e-3  # the check can tell the two apart
