"""The engine-free decoder against the training model: exported TransformerLM weights give the same
logits in DecoderLM (full forward, KV-cache steps, PFLM noise slots), and the package imports
without megatron/deepspeed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kforcing_dist.config.schema import ModelConfig
from kforcing_dist.decode import DecodeError, load_decoder, read_decoder_config, save_decoder
from kforcing_dist.nn.noise import NoiseEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100  # padded to 128: padding is always exercised
ATOL = 1e-5


VARIANTS = {
    "rope-layernorm-gelu-untied": dict(),
    "learned-layernorm-bias-gelu-tied": dict(position="learned", norm_bias=True, tie_embeddings=True),
    "rope-rmsnorm-swiglu-gqa-biases": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                                           qkv_bias=True, attn_out_bias=True, lm_head_bias=True),
    "learned-rmsnorm-swiglu-mqa-tied": dict(position="learned", norm="rmsnorm", activation="swiglu",
                                            num_kv_heads=1, tie_embeddings=True, mlp_bias=False),
    "rope-base500-gelu-gqa-ffn48": dict(rope_base=500.0, num_kv_heads=2, ffn_hidden_size=48,
                                        attention_backend="math"),
}



def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, make_vocab_size_divisible_by=64, hidden_size=32, num_layers=2,
                num_heads=4, max_seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


def build(groups, cfg: ModelConfig, seed: int = 0):
    """A random TransformerLM with sharpened attention (at init std 0.02 attention is almost
    uniform, which would hide position and mask mistakes under rounding)."""
    from kforcing_dist.model import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size

    torch.manual_seed(seed)
    padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, groups.tp_size)
    model = TransformerLM(cfg, padded, groups)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(8.0)
            layer.attention.k_proj.weight.mul_(8.0)
    return model.eval()


def export(groups, tmp_path, model, name="ckpt", noise_encoder=None, **kw):
    from kforcing_dist.model import full_state_dict

    sd = full_state_dict(model, groups)
    extra = {}
    if noise_encoder is not None:
        sd.update({f"noise_encoder.{k}": v for k, v in noise_encoder.state_dict().items()})
        extra = dict(max_k=4, noise={"max_freq": noise_encoder.max_freq})
    folder = save_decoder(tmp_path / name, kind="pflm" if noise_encoder is not None else "ar",
                          model_config=dataclasses.asdict(model.cfg),
                          padded_vocab_size=model.padded_vocab_size, state_dict=sd,
                          source={"test": name}, **extra, **kw)
    return folder


def random_noise_encoder(H: int, seed: int = 3) -> NoiseEncoder:
    torch.manual_seed(seed)
    # A larger init than training's 0.02 so that the slots' outputs clearly depend on u.
    return NoiseEncoder(H, max_freq=64.0, init_std=0.3).eval()


def ids(batch, seq, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_and_full_logits_match_transformer(groups, tmp_path, name):
    model = build(groups, small_cfg(**VARIANTS[name]))
    folder = export(groups, tmp_path, model)
    cfg = read_decoder_config(folder)
    assert cfg["kind"] == "ar" and cfg["max_k"] is None and cfg["padded_vocab_size"] == 128
    dec = load_decoder(folder)
    assert set(dict(dec.named_parameters())) == set(dict(model.named_parameters()))
    x = ids(3, 20)
    with torch.no_grad():
        ref = model(x)
    got = dec.logits(x)
    assert got.shape == ref.shape == (3, 20, 128)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert torch.all(got[..., VOCAB:] == ref[..., VOCAB:])  # padded columns: the same constant


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kv_cache_steps_equal_full_forward(groups, tmp_path, name):
    """Prefill of prompts of different lengths, then steps of 1 and of several tokens, with
    per-sequence chunk sizes (including 0): every real position equals the full forward."""
    model = build(groups, small_cfg(**VARIANTS[name]))
    dec = load_decoder(export(groups, tmp_path, model))
    B, L = 3, 20
    seqs = ids(B, L, seed=5)
    with torch.no_grad():
        full = model(seqs)
    cache = dec.allocate_cache(B, 24)
    lengths = [0] * B
    chunks = [[5, 9, 2], [1, 1, 1], [3, 1, 2], [0, 2, 1], [4, 4, 4]]
    for n in chunks:
        c = max(n)
        chunk = torch.zeros(B, c, dtype=torch.long)
        for b in range(B):
            chunk[b, :n[b]] = seqs[b, lengths[b]:lengths[b] + n[b]]
        out = dec.forward_step(cache, chunk, num_new=n, output="all")
        for b in range(B):
            torch.testing.assert_close(out[b, :n[b]], full[b, lengths[b]:lengths[b] + n[b]],
                                       rtol=0, atol=ATOL)
        lengths = [lengths[b] + n[b] for b in range(B)]
        assert cache.lengths.tolist() == lengths == cache.host_lengths.tolist()
    # output="last" on a fresh cache: each sequence's last real token
    cache.reset()
    n = [7, 3, 5]
    chunk = torch.zeros(B, 7, dtype=torch.long)
    for b in range(B):
        chunk[b, :n[b]] = seqs[b, :n[b]]
    last = dec.forward_step(cache, chunk, num_new=n, output="last")
    for b in range(B):
        torch.testing.assert_close(last[b], full[b, n[b] - 1], rtol=0, atol=ATOL)


def reference_pflm(model, enc, context, u, tau):
    """PFLM logits computed with the *training* model's embed/backbone/head and an explicit mask:
    slot i at position s + i, seeing the context and slots 0..i."""
    b, s = context.shape
    k = u.shape[1]
    pos = torch.arange(s + k).expand(b, s + k)
    hidden_ctx = model.embed(context, pos[:, :s])
    slots = enc(u, torch.full((b, 1), tau, dtype=torch.float64))
    if model.embed_positions is not None:
        slots = slots + model.embed_positions(pos[:, s:])
    n = s + k
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = (ki <= torch.where(qi < s, qi, torch.full_like(qi, s - 1))) | ((qi >= s) & (ki >= s) & (ki <= qi))
    hidden = model.backbone(torch.cat([hidden_ctx, slots], 1), pos, mask)
    return model.head(hidden[:, s:])


@pytest.mark.parametrize("name", ["rope-rmsnorm-swiglu-gqa-biases", "learned-layernorm-bias-gelu-tied"])
def test_pflm_reference_matches_training_model(groups, tmp_path, name):
    model = build(groups, small_cfg(**VARIANTS[name]))
    enc = random_noise_encoder(32)
    dec = load_decoder(export(groups, tmp_path, model, noise_encoder=enc))
    ctx = ids(2, 9)
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref = reference_pflm(model, enc, ctx, u, 0.7)
    got = dec.pflm_logits(ctx, u, 0.7)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    # per-sequence tau as a tensor
    tau = torch.tensor([0.7, 0.7], dtype=torch.float64)
    torch.testing.assert_close(dec.pflm_logits(ctx, u, tau), got, rtol=0, atol=0)
    # slot i depends on u_1..u_i only, and does depend on them
    u2 = u.clone()
    u2[:, 2] = (u2[:, 2] + 0.37) % 1.0
    changed = dec.pflm_logits(ctx, u2, 0.7)
    torch.testing.assert_close(changed[:, :2], got[:, :2], rtol=0, atol=ATOL)
    assert (changed[:, 2:] - got[:, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["rope-rmsnorm-swiglu-gqa-biases", "learned-layernorm-bias-gelu-tied"])
def test_pflm_cached_steps_match_reference_and_drop_noise_kv(groups, tmp_path, name):
    model = build(groups, small_cfg(**VARIANTS[name]))
    dec = load_decoder(export(groups, tmp_path, model, noise_encoder=random_noise_encoder(32)))
    B, k = 3, 3
    seqs = ids(B, 30, seed=7)
    gen = torch.Generator().manual_seed(1)
    cache = dec.allocate_cache(B, 40)
    prefill = [6, 10, 3]
    chunk = torch.zeros(B, max(prefill), dtype=torch.long)
    for b in range(B):
        chunk[b, :prefill[b]] = seqs[b, :prefill[b]]
    dec.forward_step(cache, chunk, num_new=prefill, output="none")
    contexts = [seqs[b, :prefill[b]].tolist() for b in range(B)]

    # step 1: real tokens (different counts, one sequence none) + k noise slots
    n = [2, 1, 0]
    feed = torch.zeros(B, 2, dtype=torch.long)
    for b in range(B):
        feed[b, :n[b]] = seqs[b, prefill[b]:prefill[b] + n[b]]
        contexts[b] += feed[b, :n[b]].tolist()
    for step in range(3):
        u = torch.rand(B, k, generator=gen, dtype=torch.float64)
        got = dec.forward_step(cache, feed, num_new=n, noise_u=u, tau=1.0)
        assert got.shape == (B, k, 128)
        assert cache.lengths.tolist() == [len(c) for c in contexts]
        for b in range(B):
            ref = dec.pflm_logits(torch.tensor([contexts[b]]), u[b:b + 1], 1.0)[0]
            torch.testing.assert_close(got[b], ref, rtol=0, atol=ATOL)
        # the next step feeds the k emitted tokens; a fresh full computation of context +
        # emitted tokens must agree, which fails if the noise slots' K/V were kept
        feed = got[..., :VOCAB].argmax(-1)
        n = [k] * B
        for b in range(B):
            contexts[b] += feed[b].tolist()


def test_bf16_export_loads_and_tracks_fp32(groups, tmp_path):
    model = build(groups, small_cfg(**VARIANTS["rope-rmsnorm-swiglu-gqa-biases"]))
    folder = export(groups, tmp_path, model, dtype="bfloat16")
    assert read_decoder_config(folder)["dtype"] == "bfloat16"
    dec = load_decoder(folder)
    assert dec.dtype == torch.bfloat16
    x = ids(2, 12)
    with torch.no_grad():
        ref = model(x)
    got = dec.logits(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got[..., :VOCAB] - ref[..., :VOCAB]).abs().max() < 0.1
    cache = dec.allocate_cache(2, 12)
    step = dec.forward_step(cache, x, output="all")
    torch.testing.assert_close(step, got, rtol=0, atol=0.05)
    # loaded up-cast to float32, the bf16-rounded weights still give consistent cached logits
    dec32 = load_decoder(folder, dtype=torch.float32)
    c32 = dec32.allocate_cache(2, 12)
    torch.testing.assert_close(dec32.forward_step(c32, x, output="all"), dec32.logits(x),
                               rtol=0, atol=ATOL)


def test_ar_mode_on_transformer_export_matches_greedy(groups, tmp_path):
    """generate (AR, near-zero temperature) continues like greedy decoding with the training model."""
    from kforcing_dist.decode import generate

    model = build(groups, small_cfg(**VARIANTS["rope-layernorm-gelu-untied"]))
    dec = load_decoder(export(groups, tmp_path, model))
    prompts = [ids(1, 5, seed=2)[0].tolist(), ids(1, 2, seed=3)[0].tolist()]
    res = generate(dec, prompts, mode="ar", max_new_tokens=8, tau=1e-4, seed=0)
    for p, out in zip(prompts, res.tokens):
        seq = list(p)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq]))[0, -1, :VOCAB].argmax()))
        assert out == seq[len(p):]


def test_import_without_megatron_or_deepspeed():
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None\n"
        "sys.modules['deepspeed'] = None\n"
        "import kforcing_dist.decode as d\n"
        "from kforcing_dist.decode import generate, load_decoder, save_decoder, DecoderLM\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('kforcing_dist.model', "
        "'kforcing_dist.parallel', 'kforcing_dist.training', 'kforcing_dist.distill')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_save_decoder_rejects_weights_that_do_not_match(groups, tmp_path):
    from kforcing_dist.model import full_state_dict

    model = build(groups, small_cfg())
    sd = full_state_dict(model, groups)
    enc = random_noise_encoder(32)
    with pytest.raises(DecodeError, match="noise_encoder.*pflm"):
        save_decoder(tmp_path / "x", kind="ar", model_config=model.cfg, padded_vocab_size=128,
                     state_dict={**sd, **{f"noise_encoder.{k}": v for k, v in enc.state_dict().items()}})
    with pytest.raises(DecodeError, match="noise_encoder"):
        save_decoder(tmp_path / "x", kind="pflm", model_config=model.cfg, padded_vocab_size=128,
                     state_dict=sd, max_k=2)
    assert not (tmp_path / "x").exists()
