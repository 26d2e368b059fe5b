"""Single-process tests of the Transformer LM: config variants, masking, positions, loss, state."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kforcing_dist.config.schema import ModelConfig

VOCAB = 100  # padded to 128 below, so padding is always exercised
SEQ = 12




def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, make_vocab_size_divisible_by=64, hidden_size=32, num_layers=2,
                num_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def build(groups, cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    from kforcing_dist.model import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size

    torch.manual_seed(seed)
    padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, groups.tp_size)
    return TransformerLM(cfg, padded, groups, params_dtype=dtype)


def sharpen(model, factor=8.0):
    """Scale the q/k projections: at init (std 0.02) attention is almost uniform, which would
    make position and mask effects too small to tell from rounding."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(factor)
            layer.attention.k_proj.weight.mul_(factor)
    return model


def tokens(batch=2, seq=SEQ, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


VARIANTS = {
    "layernorm-gelu-rope-untied": dict(),
    "layernorm-bias-learned-tied": dict(norm_bias=True, position="learned", tie_embeddings=True),
    "rmsnorm-swiglu-gqa-biases": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                                      qkv_bias=True, attn_out_bias=True, lm_head_bias=True),
    "no-mlp-bias-mqa-ffn": dict(mlp_bias=False, num_kv_heads=1, ffn_hidden_size=48),
    "swiglu-tied-learned-math": dict(activation="swiglu", tie_embeddings=True, position="learned",
                                     attention_backend="math"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_forward_backward(groups, name):
    from kforcing_dist.model import lm_loss

    model = build(groups, small_cfg(**VARIANTS[name]))
    ids = tokens()
    logits = model(ids)
    assert logits.shape == (2, SEQ, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    loss = lm_loss(logits, tokens(seed=2), groups)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    # The head's padded rows never contribute, so they get no gradient.
    head_w = model.embed_tokens.weight if model.cfg.tie_embeddings else model.lm_head.weight
    if not model.cfg.tie_embeddings:
        assert head_w.grad[VOCAB:].abs().max() == 0


def test_parameter_layout(groups):
    model = build(groups, small_cfg(**VARIANTS["rmsnorm-swiglu-gqa-biases"]))
    names = dict(model.named_parameters())
    assert names["layers.0.attention.k_proj.weight"].shape == (16, 32)  # 2 kv heads x 8
    assert names["layers.0.mlp.gate_proj.weight"].shape == (128, 32)  # 8*32/3 -> 128
    assert "final_norm.bias" not in names  # rmsnorm: no bias
    tied = build(groups, small_cfg(tie_embeddings=True))
    assert "lm_head.weight" not in dict(tied.named_parameters())


def test_initialisation(groups):
    cfg = small_cfg(num_layers=8, hidden_size=64, mlp_bias=True, norm_bias=True)
    model = build(groups, cfg)
    p = dict(model.named_parameters())
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    assert p["layers.0.mlp.fc2.weight"].std().item() == pytest.approx(out_std, rel=0.1)
    assert p["layers.0.mlp.fc1.weight"].std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert p["embed_tokens.weight"].std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert torch.all(p["layers.0.mlp.fc1.bias"] == 0)
    assert torch.all(p["layers.0.input_norm.weight"] == 1)
    assert torch.all(p["final_norm.bias"] == 0)
    again = build(groups, cfg)
    for name, q in again.named_parameters():
        assert torch.equal(q, p[name]), f"{name} is not deterministic given the seed"


def test_causality(groups):
    model = build(groups, small_cfg())
    ids = tokens()
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_explicit_causal_mask_equals_none(groups, backend):
    model = build(groups, small_cfg(attention_backend=backend, num_kv_heads=2))
    ids = tokens()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(model(ids, attention_mask=causal), ref, rtol=0, atol=1e-6)
        mask4 = causal.expand(2, 4, SEQ, SEQ)  # per batch and per (global) head
        torch.testing.assert_close(model(ids, attention_mask=mask4), ref, rtol=0, atol=1e-6)


def two_document_mask(seq=SEQ, split=5):
    """Packed documents [0, split) and [split, seq), causal within each."""
    doc = (torch.arange(seq) >= split).long()
    same = doc[:, None] == doc[None, :]
    return same & torch.ones(seq, seq, dtype=torch.bool).tril()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_custom_mask_is_honoured(groups, backend):
    model = build(groups, small_cfg(attention_backend=backend))
    mask = two_document_mask()[None, None]
    ids = tokens()
    in_first, in_second = ids.clone(), ids.clone()
    in_first[:, 2] = (in_first[:, 2] + 1) % VOCAB
    in_second[:, 6] = (in_second[:, 6] + 1) % VOCAB
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        a = model(in_first, attention_mask=mask)
        b = model(in_second, attention_mask=mask)
        plain = model(in_first)
    # The second document cannot see the first one, through any number of layers.
    torch.testing.assert_close(a[:, 5:], ref[:, 5:], rtol=0, atol=0)
    assert (a[:, 2:5] - ref[:, 2:5]).abs().amax(dim=-1).min() > 0
    torch.testing.assert_close(b[:, :6], ref[:, :6], rtol=0, atol=0)
    assert (b[:, 6:] - ref[:, 6:]).abs().amax(dim=-1).min() > 0
    # Without the mask, the same change is visible to the later positions.
    assert (plain[:, 5:] - ref[:, 5:]).abs().max() > 0


def test_noncausal_mask_lets_earlier_positions_see_later_ones(groups):
    model = build(groups, small_cfg())
    full = torch.ones(SEQ, SEQ, dtype=torch.bool)
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids, attention_mask=full), model(changed, attention_mask=full)
    assert (a[:, 0] - b[:, 0]).abs().max() > 0


def test_rope_positions_are_relative(groups):
    model = sharpen(build(groups, small_cfg(position="rope")))
    ids = tokens()
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(model(ids, position_ids=pos), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, position_ids=pos + 17), ref, rtol=0, atol=2e-5)
        permuted = model(ids, position_ids=pos.flip(-1))
        repeated = model(ids, position_ids=torch.zeros_like(pos))
        # One row per sequence: shapes [1, s] broadcast over the batch.
        torch.testing.assert_close(model(ids, position_ids=pos[:1] + 3), ref, rtol=0, atol=2e-5)
    assert (permuted - ref).abs().max() > 1e-3
    assert (repeated - ref).abs().max() > 1e-3


def test_learned_positions_are_absolute(groups):
    model = sharpen(build(groups, small_cfg(position="learned")))
    ids = tokens()
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(model(ids, position_ids=pos), ref, rtol=0, atol=0)
        shifted = model(ids, position_ids=pos + 17)
        permuted = model(ids, position_ids=pos.flip(-1))
    assert (shifted - ref).abs().max() > 1e-3
    assert (permuted - ref).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["plain", "gqa", "learned"])
def test_math_backend_equals_sdpa(groups, variant):
    kw = {"plain": {}, "gqa": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm"),
          "learned": dict(position="learned")}[variant]
    model = sharpen(build(groups, small_cfg(**kw)))
    ids = tokens()
    mask = two_document_mask()
    results = {}
    for backend in ("sdpa", "math"):
        for layer in model.layers:
            layer.attention.backend = backend
        model.zero_grad()
        out = model(ids)
        out_masked = model(ids, attention_mask=mask)
        (out[..., :VOCAB].square().mean() + out_masked[..., :VOCAB].mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[backend] = (out.detach(), out_masked.detach(), grads)
    s, m = results["sdpa"], results["math"]
    torch.testing.assert_close(m[0], s[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(m[1], s[1], rtol=0, atol=1e-5)
    for name in s[2]:
        torch.testing.assert_close(m[2][name], s[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fully_masked_rows_are_zero_in_both_backends():
    from kforcing_dist.model.layers import attention_core

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False
    a = attention_core(q, k, v, mask, "sdpa")
    b = attention_core(q, k, v, mask, "math")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.all(b[:, :, 2] == 0)


def test_keys_longer_than_queries(groups):
    """A block given extra context as keys/values equals the tail of a full pass over both."""
    model = build(groups, small_cfg(num_kv_heads=2))
    block = model.layers[0]
    gen = torch.Generator().manual_seed(3)
    ctx, x = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    both = torch.cat([ctx, x], dim=1)
    pos = torch.arange(12).expand(2, 12)
    rot_all = model.rotary_tables(pos)
    rot_q = model.rotary_tables(pos[:, 5:])
    with torch.no_grad():
        full = block(both, rot_all)
        for backend in ("sdpa", "math"):
            block.attention.backend = backend
            tail = block(x, rot_q, kv_x=both, kv_rotary=rot_all)
            torch.testing.assert_close(tail, full[:, 5:], rtol=0, atol=1e-5)
            # An explicit [s_q, s_k] mask: here every query sees only the context and itself.
            mask = torch.zeros(7, 12, dtype=torch.bool)
            mask[:, :5] = True
            mask[torch.arange(7), 5 + torch.arange(7)] = True
            out = block(x, rot_q, attention_mask=mask, kv_x=both, kv_rotary=rot_all)
            assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="kv_rotary"):
        block(x, rot_q, kv_x=both)


def test_padded_vocab_never_wins(groups):
    from kforcing_dist.nn.sizes import PADDED_LOGIT_VALUE

    model = build(groups, small_cfg(lm_head_bias=True))
    with torch.no_grad():
        model.lm_head.bias[:VOCAB] = -50.0  # push every real logit down hard
        logits = model(tokens())
    assert torch.all(logits[..., VOCAB:] == PADDED_LOGIT_VALUE)
    assert logits.argmax(-1).max() < VOCAB
    assert torch.all(torch.softmax(logits, -1)[..., VOCAB:] == 0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_lm_loss_equals_torch_cross_entropy(groups, with_mask):
    from kforcing_dist.model import lm_loss

    model = build(groups, small_cfg())
    ids, labels = tokens(), tokens(seed=5)
    mask = (torch.rand(2, SEQ, generator=torch.Generator().manual_seed(6)) > 0.3).float()
    with torch.no_grad():
        logits = model(ids)
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    before = mine.detach().clone()
    if with_mask:
        ignored = labels.masked_fill(mask == 0, -100)  # the label under a 0 mask is irrelevant
        loss = lm_loss(mine, ignored, groups, loss_mask=mask)
        ref_loss = F.cross_entropy(ref[..., :VOCAB].reshape(-1, VOCAB), ignored.reshape(-1),
                                   ignore_index=-100)
    else:
        loss = lm_loss(mine, labels, groups)
        ref_loss = F.cross_entropy(ref[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(mine.detach(), before, rtol=0, atol=0)  # not modified in place
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(mine.grad[..., :VOCAB], ref.grad[..., :VOCAB], rtol=1e-5, atol=1e-7)
    assert torch.all(mine.grad[..., VOCAB:] == 0)


def test_lm_loss_on_shifted_slices(groups):
    """The usual next-token call on non-contiguous views: logits[:, :-1] against ids[:, 1:]."""
    from kforcing_dist.model import lm_loss

    model = build(groups, small_cfg())
    ids = tokens()
    logits = model(ids)
    loss = lm_loss(logits[:, :-1], ids[:, 1:], groups)
    ref = F.cross_entropy(logits[:, :-1, :VOCAB].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lm_loss_rejects_bad_shapes(groups):
    from kforcing_dist.model import lm_loss

    logits = torch.zeros(2, 4, 128)
    with pytest.raises(ValueError, match="labels"):
        lm_loss(logits, torch.zeros(2, 5, dtype=torch.long), groups)
    with pytest.raises(ValueError, match="loss_mask"):
        lm_loss(logits, torch.zeros(2, 4, dtype=torch.long), groups, loss_mask=torch.ones(2, 5))


def test_full_state_dict_round_trip(groups):
    from kforcing_dist.model import count_parameters, full_state_dict, load_full_state_dict

    cfg = small_cfg(**VARIANTS["rmsnorm-swiglu-gqa-biases"])
    src, dst = build(groups, cfg, seed=0), build(groups, cfg, seed=1)
    sd = full_state_dict(src, groups)
    assert set(sd) == {n for n, _ in src.named_parameters()}
    assert count_parameters(src) == count_parameters(src, groups) == sum(t.numel() for t in sd.values())
    ids = tokens()
    with torch.no_grad():
        assert (dst(ids) - src(ids)).abs().max() > 0
        load_full_state_dict(dst, sd, groups)
        torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)
    for name, t in full_state_dict(dst, groups).items():
        assert torch.equal(t, sd[name]), name
    # The returned tensors are copies: changing them does not touch the model.
    sd["final_norm.weight"].add_(1.0)
    assert torch.all(dict(src.named_parameters())["final_norm.weight"] == 1)


def test_load_full_state_dict_errors(groups):
    from kforcing_dist.model import full_state_dict, load_full_state_dict

    model = build(groups, small_cfg())
    sd = full_state_dict(model, groups)
    missing = {k: v for k, v in sd.items() if k != "final_norm.weight"}
    with pytest.raises(ValueError, match="final_norm.weight"):
        load_full_state_dict(model, missing, groups)
    with pytest.raises(ValueError, match="surplus"):
        load_full_state_dict(model, {**sd, "surplus": torch.zeros(1)}, groups)
    bad = dict(sd)
    bad["layers.1.mlp.fc1.weight"] = torch.zeros(7, 32)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc1\.weight.*\(7, 32\).*\(128, 32\)"):
        load_full_state_dict(model, bad, groups)


def test_bf16_params(groups):
    from kforcing_dist.model import lm_loss

    model = build(groups, small_cfg(norm="rmsnorm", activation="swiglu"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = model(tokens())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    lm_loss(logits, tokens(seed=2), groups).backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_pad_vocab_size():
    from kforcing_dist.nn.sizes import pad_vocab_size

    assert pad_vocab_size(100, 64, 1) == 128
    assert pad_vocab_size(128, 64, 1) == 128
    assert pad_vocab_size(129, 64, 2) == 256
    assert pad_vocab_size(50257, 128, 4) == 50688
    with pytest.raises(ValueError):
        pad_vocab_size(0, 64, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(tie_embeddings=True, lm_head_bias=True), "lm_head_bias"),
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(hidden_size=36, num_heads=12), "even head dimension"),
])
def test_impossible_configs_raise(groups, kw, match):
    with pytest.raises(ValueError, match=match):
        build(groups, small_cfg(**kw))


def test_bad_inputs_raise(groups):
    from kforcing_dist.model import TransformerLM

    model = build(groups, small_cfg())
    ids = tokens()
    with pytest.raises(ValueError, match="boolean"):
        model(ids, attention_mask=torch.ones(SEQ, SEQ))
    with pytest.raises(ValueError, match="broadcast"):
        model(ids, attention_mask=torch.ones(SEQ, SEQ + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        model(ids, attention_mask=torch.ones(2, 3, SEQ, SEQ, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(SEQ + 1).expand(2, SEQ + 1))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(SEQ, dtype=torch.float32).expand(2, SEQ))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="padded_vocab_size"):
        TransformerLM(small_cfg(), 64, groups)
    with pytest.raises(ValueError, match="process group"):
        TransformerLM(small_cfg(), 128, None)
    learned = build(groups, small_cfg(position="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        learned(ids)
