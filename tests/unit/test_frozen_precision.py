"""The frozen teacher's precision: float32 target logits under bf16 training (distill/frozen.py).

A bf16 LM head rounds the logits to 8 mantissa bits, which moves inverse-CDF boundaries: u just
below a boundary then gives the next token, label noise the authors' float32 teacher does not
have. The noise u below is put within 1e-12 of the reference's boundaries, so the plain bf16
path must get some targets wrong while the float32 paths match token for token.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_distill_core import CONFIGS, PADDED, VOCAB, build_student, build_teacher, ids_of, small_cfg

SEQ = 16


def _capture_final_norm_input(model):
    """Run ``model`` and return the hidden state its final norm received (the body's output)."""
    seen = {}
    norm = model.final_norm
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("h", args[0]))
    return seen, handle


def _u_below_boundaries(logits: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """u [b, W, 1] just below the upper CDF boundary (vocab order, tau 1) of each window's most
    likely token: G gives that token under these logits, the next one if the boundary drops."""
    from kforcing_dist.nn.inverse_cdf import probabilities

    b, W = starts.shape
    at = logits.gather(1, starts[:, :, None].expand(b, W, logits.shape[-1]))[..., :VOCAB]
    probs = probabilities(at, 1.0)
    cdf = probs.cumsum(-1)
    upper = cdf.gather(-1, probs.argmax(-1, keepdim=True))
    return (upper - 1e-12).clamp(min=0.0)


def _stage1(model, ids, starts, u, groups):
    from kforcing_dist.distill.targets import stage1_targets

    return stage1_targets(model, ids, starts, u, 1.0, "vocab", groups)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_fp32_frozen_teacher_gives_the_fp32_targets_and_bf16_does_not(groups, one_thread, cfg_name):
    from kforcing_dist.distill.frozen import freeze

    cfg = small_cfg(**CONFIGS[cfg_name])
    reference = build_teacher(groups, cfg)  # each build_teacher gives the same weights
    ids = ids_of(batch=4, seq=SEQ)
    starts = torch.arange(SEQ).expand(4, SEQ)
    with torch.no_grad():
        u = _u_below_boundaries(reference(ids), starts)
    want = _stage1(reference, ids, starts, u, groups)
    # the student trains in bf16, the frozen teacher runs in float32 throughout
    frozen = freeze(build_teacher(groups, cfg), groups, "bf16", False, "fp32")
    assert torch.equal(_stage1(frozen, ids, starts, u, groups), want)
    # the plain bf16 teacher (what freeze did before) moves some boundaries
    plain_bf16 = build_teacher(groups, cfg).to(torch.bfloat16)
    assert not torch.equal(_stage1(plain_bf16, ids, starts, u, groups), want)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_bf16_frozen_teacher_has_a_float32_head(groups, one_thread, cfg_name):
    """frozen_precision auto under bf16: bf16 body, float32 final norm + head on its upcast output."""
    from kforcing_dist.distill.frozen import Float32Island, freeze

    cfg = small_cfg(**CONFIGS[cfg_name])
    reference = build_teacher(groups, cfg)
    frozen = freeze(build_teacher(groups, cfg), groups, "bf16", False, "auto")
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert isinstance(frozen.final_norm, Float32Island) and isinstance(frozen.lm_head, Float32Island)
    assert frozen.final_norm.module.weight.dtype == torch.float32
    ids = ids_of(batch=4, seq=SEQ)
    starts = torch.arange(SEQ).expand(4, SEQ)

    # the reference: the same bf16 body, then the float32 model's own final norm and head
    body = build_teacher(groups, cfg).to(torch.bfloat16)
    seen, handle = _capture_final_norm_input(body)
    with torch.no_grad():
        body(ids)
        handle.remove()
        hidden = seen["h"]
        assert hidden.dtype == torch.bfloat16
        want_logits = reference.head(reference.final_norm(hidden.float()))
        got_logits = frozen(ids)
    assert got_logits.dtype == torch.float32 and torch.equal(got_logits, want_logits)

    from kforcing_dist.distill.targets import stage1_targets_from_logits

    u = _u_below_boundaries(want_logits, starts)
    want = stage1_targets_from_logits(want_logits, starts, u, 1.0, "vocab", groups, VOCAB)
    assert torch.equal(_stage1(frozen, ids, starts, u, groups), want)
    # bf16 logits (the old path: the same body with a bf16 head) move some of these boundaries
    assert not torch.equal(_stage1(body, ids, starts, u, groups), want)


def test_bf16_frozen_student_self_forcing_logits_are_float32(groups, one_thread):
    """The previous stage's student: its window logits (self-forcing argmax) come from the
    float32 head too, tied embeddings included."""
    from kforcing_dist.distill.frozen import freeze
    from kforcing_dist.distill.targets import self_forcing_targets, vocab_parallel_argmax

    cfg = small_cfg(**CONFIGS["learned-tied"])
    reference = build_student(groups, cfg, max_k=2, seed=3)
    frozen = freeze(build_student(groups, cfg, max_k=2, seed=3), groups, "bf16", False, "auto")
    body = build_student(groups, cfg, max_k=2, seed=3).to(torch.bfloat16)
    ids = ids_of(batch=2, seq=SEQ)
    starts = torch.tensor([[0, 5, 15], [2, 9, 11]])
    u = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen, handle = _capture_final_norm_input(body)
    with torch.no_grad():
        body.forward_windows(ids, starts, u[..., :2], 1.0)
        handle.remove()
        want = reference.window_logits(reference.final_norm(seen["h"].float()), (0, 0, 2))  # window rows only
        got = frozen.forward_windows(ids, starts, u[..., :2], 1.0)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    targets = self_forcing_targets(frozen, ids, starts, u, 1.0, groups)
    assert torch.equal(targets[..., :2], vocab_parallel_argmax(want, groups))


def test_frozen_precision_is_validated(groups):
    from kforcing_dist.config import ConfigError, load_config
    from kforcing_dist.distill.frozen import freeze

    assert load_config(None, ["distill.frozen_precision=fp32"])[0].distill.frozen_precision == "fp32"
    with pytest.raises(ConfigError, match="frozen_precision"):
        load_config(None, ["distill.frozen_precision=bf16"])
    with pytest.raises(ValueError, match="frozen precision"):
        freeze(build_teacher(groups, small_cfg()), groups, "bf16", False, "fp16")


@pytest.mark.parametrize("frozen_precision,dtype", [("fp32", torch.float32), ("auto", torch.bfloat16)])
def test_distill_loads_frozen_models_at_the_configured_precision(groups, tmp_path, frozen_precision, dtype):
    """The stage's frozen-model loader under bf16 training: distill.frozen_precision reaches freeze."""
    from kforcing_dist.config import load_config
    from kforcing_dist.decode import save_decoder
    from kforcing_dist.distill.frozen import Float32Island, load_frozen
    from kforcing_dist.model.state import full_state_dict

    cfg = small_cfg()
    folder = save_decoder(tmp_path / "export", kind="ar", model_config=cfg, padded_vocab_size=PADDED,
                          state_dict=full_state_dict(build_teacher(groups, cfg), groups))
    run_cfg, _ = load_config(None, ["train.precision=bf16", "parallel.zero_stage=1",
                                    f"distill.frozen_precision={frozen_precision}"])
    frozen = load_frozen(folder, lambda: build_teacher(groups, cfg, seed=9), groups, run_cfg, None)
    assert {p.dtype for p in frozen.parameters()} == {dtype}
    assert isinstance(frozen.lm_head, Float32Island) == (frozen_precision == "auto")
    with torch.no_grad():
        assert torch.equal(frozen(ids_of()), build_teacher(groups, cfg)(ids_of())) == (frozen_precision == "fp32")
