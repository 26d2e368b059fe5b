"""The decoder's fast paths against plain ones: the fused step (one q/k/v matmul, rotary rows from
a table) == the per-projection step, the static-shape step (attention over the whole cache, what
CUDA graphs capture) == the prefix step, and the preallocated static KV cache == a growing
(concatenated) cache as in the paper's harness; tokens identical for the same noise. The step's
CPU savings: the last layer runs only the rows the output reads (every row still cached), a
pre-encoded noise table, input-major head/down-projection weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kforcing_dist.decode import generate, generate_lossless, noise_table
from kforcing_dist.nn.rotary import apply_rotary, rotary_tables
from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
from tests.unit.test_decode_generate import PROMPTS, V, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def both_paths(model, run):
    model.fast = False
    plain = run()
    model.fast = True
    fast = run()
    return plain, fast


@pytest.mark.parametrize("mode, k, model_kw", [
    ("ar", 1, {}), ("pflm", 4, {}), ("pflm", 3, dict(num_kv_heads=4, qkv_bias=True)),
    ("pflm", 2, dict(position="learned")), ("ar", 1, dict(activation="swiglu", num_kv_heads=1))])
def test_fast_step_equals_plain_step(mode, k, model_kw):
    model = make_model(mode, seed=3, **model_kw)
    kw = dict(mode=mode, k=k, max_new_tokens=11, tau=0.9, seed=7)
    if mode == "ar":
        kw["sampling"] = "inverse_cdf"
    plain, fast = both_paths(model, lambda: generate(model, PROMPTS, **kw))
    assert fast.tokens == plain.tokens


def test_fast_step_logits_match_and_track_weight_edits():
    model = make_model("pflm", seed=1, num_kv_heads=2)
    u = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7], [1, 2, 3], [9, 9, 9]])

    def step():
        cache = model.allocate_cache(3, 12)
        return model.forward_step(cache, ids, noise_u=u, output="all")

    plain, fast = both_paths(model, step)
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-5)
    # the fused q/k/v weight is rebuilt after an in-place edit of any projection
    with torch.no_grad():
        model.layers[0].attention.k_proj.weight.mul_(2.0)
    plain2, fast2 = both_paths(model, step)
    assert torch.allclose(fast2, plain2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast2, fast, atol=1e-3)


@pytest.mark.parametrize("mode, k", [("ar", 1), ("pflm", 4)])
def test_static_shape_step_equals_prefix_step(mode, k):
    model = make_model(mode, seed=2)
    u = noise_table(len(PROMPTS), 8, 0, "cpu")
    outs = []
    for static in (False, True):
        cache = model.allocate_cache(len(PROMPTS), 30)
        pending = torch.tensor([[p[-1]] for p in PROMPTS])
        head = max(map(len, PROMPTS)) - 1
        ids = torch.tensor([p[:-1] + [0] * (head - len(p) + 1) for p in PROMPTS])
        model.forward_step(cache, ids, num_new=[len(p) - 1 for p in PROMPTS], output="none",
                           static=static)
        toks = []
        for step in range(2):
            if mode == "ar":
                logits = model.forward_step(cache, pending, static=static)[:, :V]
                new = inverse_cdf_sample(logits, u[:, step], 1.0, "vocab")[:, None]
            else:
                logits = model.forward_step(cache, pending, noise_u=u[:, 4 * step:4 * step + 4],
                                            static=static)[..., :V]
                new = logits.argmax(-1)
            toks.append(new)
            outs.append(logits)
            pending = new
        outs.append(torch.cat(toks, 1))
    half = len(outs) // 2
    for a, b in zip(outs[:half], outs[half:]):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def growing_cache_decode(model, prompt: list[int], n: int, k: int, u: torch.Tensor) -> list[int]:
    """One sequence, keys/values concatenated onto per-layer tensors every step (the released
    harness's growing cache); noise slots' keys/values used in their step only. Same maths as
    DecoderLM, written out layer by layer."""
    past = [None] * model.num_layers
    seq, out = list(prompt), []
    pending, cached = list(prompt), 0
    while len(out) < n:
        m = min(k, n - len(out)) if model.kind == "pflm" else 0
        c = len(pending)
        pos = torch.arange(cached, cached + c + m)[None]
        h = F.embedding(torch.tensor([pending]), model.embed_tokens.weight)
        if m:
            slots = model._embed_noise(u[None, len(out):len(out) + m], 1.0, pos[:, c:])
            h = torch.cat([h, slots], 1)
        cos, sin = rotary_tables(pos, model.head_dim, model.rope_base)
        q_idx = torch.arange(c + m)[:, None]
        key_idx = torch.arange(cached + c + m)[None]
        causal = key_idx <= cached + torch.clamp(q_idx, max=c - 1)
        own_slots = (q_idx >= c) & (key_idx >= cached + c) & (key_idx <= cached + q_idx)
        mask = (causal | own_slots)[None, None]
        for i, layer in enumerate(model.layers):
            a = layer.attention
            x = layer.input_norm(h)
            q = a.q_proj(x).view(1, c + m, a.num_heads, a.head_dim).transpose(1, 2)
            kk = a.k_proj(x).view(1, c + m, a.num_kv_heads, a.head_dim).transpose(1, 2)
            vv = a.v_proj(x).view(1, c + m, a.num_kv_heads, a.head_dim).transpose(1, 2)
            q, kk = apply_rotary(q, cos, sin), apply_rotary(kk, cos, sin)
            keys = kk if past[i] is None else torch.cat([past[i][0], kk], 2)
            vals = vv if past[i] is None else torch.cat([past[i][1], vv], 2)
            rep = a.num_heads // a.num_kv_heads
            att = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, 1),
                                                 vals.repeat_interleave(rep, 1), attn_mask=mask)
            h = h + a.out_proj(att.transpose(1, 2).reshape(1, c + m, -1))
            h = h + layer.mlp(layer.mlp_norm(h))
            past[i] = (keys[:, :, :cached + c], vals[:, :, :cached + c])  # drop the slots
        logits = model._head(model.final_norm(h))[0, :, :V]
        cached += c
        if m:
            new = logits[c:].argmax(-1).tolist()
        else:
            new = [int(inverse_cdf_sample(logits[-1], u[len(out)], 1.0, "vocab"))]
        out += new
        seq += new
        pending = new
    return out


@pytest.mark.parametrize("mode, k", [("ar", 1), ("pflm", 4), ("pflm", 3)])
def test_static_cache_equals_growing_cache(mode, k):
    model = make_model(mode, seed=4, num_kv_heads=2)
    n = 10
    u = noise_table(len(PROMPTS), n, 5, "cpu")
    kw = dict(sampling="inverse_cdf") if mode == "ar" else dict(k=k)
    res = generate(model, PROMPTS, mode=mode, max_new_tokens=n, seed=5, **kw)
    for b, p in enumerate(PROMPTS):
        assert res.tokens[b] == growing_cache_decode(model, p, n, k, u[b])


def test_lossless_fast_equals_plain():
    teacher, student = make_model("ar", seed=8), make_model("pflm", seed=9)

    def run():
        teacher.fast = student.fast
        return generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=9, seed=2).tokens

    plain, fast = both_paths(student, run)
    assert fast == plain


@pytest.mark.parametrize("mode, k", [("ar", 1), ("pflm", 4), ("pflm", 3)])
def test_graph_stepper_static_buffers_equal_plain_steps(mode, k):
    # on CPU the GraphStepper runs its static-buffer steps eagerly: the logic CUDA graphs replay
    model = make_model(mode, seed=6, num_kv_heads=2)
    kw = dict(mode=mode, k=k, max_new_tokens=10, seed=3)
    if mode == "ar":
        kw["sampling"] = "inverse_cdf"
    assert generate(model, PROMPTS, cuda_graphs=True, **kw).tokens == \
        generate(model, PROMPTS, **kw).tokens


def test_graph_stepper_lossless_equals_plain():
    teacher, student = make_model("ar", seed=8), make_model("pflm", seed=9)
    kw = dict(k=3, max_new_tokens=11, seed=4)
    assert generate_lossless(student, teacher, PROMPTS, cuda_graphs=True, **kw).tokens == \
        generate_lossless(student, teacher, PROMPTS, **kw).tokens


def test_last_layer_runs_only_the_rows_the_output_reads_and_still_caches_every_row():
    model = make_model("pflm", seed=2, num_kv_heads=2)
    rows_seen = []
    hooks = [layer.mlp.register_forward_hook(lambda mod, args, out: rows_seen.append(
        args[0].shape[0] * args[0].shape[1])) for layer in model.layers]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (2, 5), generator=gen)
    fed = torch.randint(0, V, (2, 3), generator=gen)
    u1, u2 = (torch.rand(2, 3, dtype=torch.float64, generator=gen) for _ in range(2))

    def run(first_output):
        cache = model.allocate_cache(2, 20)
        rows_seen.clear()
        model.forward_step(cache, prompt, output=first_output)  # the prefill's layers
        prefill_rows = list(rows_seen)
        rows_seen.clear()
        first = model.forward_step(cache, fed, noise_u=u1, output="noise" if first_output == "none"
                                   else "all")
        step_rows = list(rows_seen)
        # the next step reads the fed tokens' keys/values in every layer, the last one included
        nxt = model.forward_step(cache, fed.flip(1), noise_u=u2, output="noise")
        return prefill_rows, step_rows, first, nxt

    try:
        prefill_rows, step_rows, noise, nxt = run("none")
        _, _, full, nxt_full = run("all")
    finally:
        for h in hooks:
            h.remove()
    n = model.num_layers
    assert prefill_rows == [2 * 5] * (n - 1) + [0]  # the prefill's last layer only caches
    assert step_rows == [2 * 6] * (n - 1) + [2 * 3]  # the 3 fed tokens skip the last MLP
    torch.testing.assert_close(noise, full[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt, nxt_full, atol=1e-5, rtol=1e-5)


def test_encoded_noise_rows_equal_raw_noise():
    model = make_model("pflm", seed=3)
    ids = torch.tensor([[5, 6], [1, 2]])
    u = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    raw = model.forward_step(model.allocate_cache(2, 10), ids, noise_u=u, tau=0.8)
    encoded = model.forward_step(model.allocate_cache(2, 10), ids,
                                 noise_u=model.encode_noise(u, 0.8), tau=123.0)  # tau unused
    torch.testing.assert_close(encoded, raw, atol=1e-6, rtol=1e-6)


def test_fast_cpu_step_keeps_head_and_down_projection_weights_input_major_with_same_values():
    model = make_model("pflm", seed=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.forward_step(model.allocate_cache(1, 8), torch.tensor([[1, 2]]))
    assert model.lm_head.weight.stride(0) == 1 and model.layers[0].mlp.fc2.weight.stride(0) == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cpu_gelu_tanh_equals_torch_gelu_tanh():
    from kforcing_dist.decode.model import gelu_tanh

    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4])])
    want = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x), want, rtol=1e-6, atol=5e-7)
    x64 = x.double()
    torch.testing.assert_close(gelu_tanh(x64), F.gelu(x64, approximate="tanh"), rtol=1e-12, atol=1e-13)
    assert torch.equal(gelu_tanh(x.bfloat16()), F.gelu(x.bfloat16(), approximate="tanh"))  # F.gelu itself
    assert x.equal(torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4])]))
