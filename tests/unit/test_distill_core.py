"""Single-process tests of the K-Forcing core: inverse CDF, window layout, PFLM, targets, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kforcing_dist.config.schema import ModelConfig

VOCAB = 100  # padded to 128, so padded logits are always present
PADDED = 128
N = 8  # context tokens




CONFIGS = {
    "rope": dict(),
    "learned-tied": dict(position="learned", tie_embeddings=True, norm_bias=True),
}


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, make_vocab_size_divisible_by=64, hidden_size=32, num_layers=2,
                num_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def sharpen(model, factor=8.0):
    """Scale q/k: near-uniform attention at init would hide position and mask effects."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(factor)
            layer.attention.k_proj.weight.mul_(factor)
    return model


def build_teacher(groups, cfg, seed=0):
    from kforcing_dist.model import TransformerLM

    torch.manual_seed(seed)
    return sharpen(TransformerLM(cfg, PADDED, groups)).eval()


def build_student(groups, cfg, max_k, seed=0, teacher=None):
    from kforcing_dist.model.student import PFLM

    torch.manual_seed(seed)
    student = PFLM(cfg, PADDED, groups, max_k=max_k, noise_init_std=0.2)
    if teacher is not None:
        student.init_from_teacher(teacher, groups)
    else:
        sharpen(student)
    return student.eval()


def ids_of(batch=2, seq=N, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def noise(*shape, seed=2):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def argmax_real(logits):
    return logits[..., :VOCAB].argmax(-1)


# ------------------------------------------------------------------------------ inverse CDF


def chi2_quantile(dof: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


Z_1E4 = 3.719  # standard normal quantile at 1 - 1e-4


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic, pooling cells with expected count < 5 into one; (stat, dof)."""
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("order", ["vocab", "sorted"])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_inverse_cdf_reproduces_p(order, tau):
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample, probabilities

    gen = torch.Generator().manual_seed(123)
    n, V = 20_000, 24
    for _ in range(3):
        logits = torch.randn(V, generator=gen) * 2.0
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        tokens = inverse_cdf_sample(logits.expand(n, V), u, tau, order)
        counts = torch.bincount(tokens, minlength=V).double()
        p = probabilities(logits, tau)
        stat, dof = chi2_statistic(counts, p, n)
        assert stat < chi2_quantile(dof, Z_1E4), f"chi2 {stat:.1f} with {dof} dof ({order}, tau={tau})"
        # The test has power: the same draws against the distribution at another temperature fail.
        stat_wrong, dof_wrong = chi2_statistic(counts, probabilities(logits, tau * 1.5), n)
        assert stat_wrong > chi2_quantile(dof_wrong, Z_1E4)
        # A uniform grid of u gives every token floor/ceil of n * p exactly.
        grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        grid_counts = torch.bincount(inverse_cdf_sample(logits.expand(n, V), grid, tau, order),
                                     minlength=V).double()
        assert (grid_counts - n * p).abs().max() <= 1.0 + 1e-9


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_cdf_interval_contains_u(order):
    from kforcing_dist.nn.inverse_cdf import cdf_interval, inverse_cdf_sample

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 50, generator=gen) * 3
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    tau = torch.linspace(0.5, 2.0, 64)
    tokens = inverse_cdf_sample(logits, u, tau, order)
    low, high = cdf_interval(logits, tokens, tau, order)
    assert torch.all(low <= u) and torch.all(u < high)


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_u_at_the_top_never_returns_a_zero_probability_token(order):
    """u at or past the float64 cumsum's last value (round-off: it can end below 1) must give the
    last token of nonzero probability, not a cut, masked or padded one; R draws per row (u one
    dim longer) give each draw's token."""
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample, probabilities

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 12, generator=gen)
    logits[:, 9:] = float("-inf")           # padded tail: probability 0
    logits[1, 3] = float("-inf")            # a masked token inside
    top = probabilities(logits, 1.0).cumsum(-1)[:, -1]
    for u in (top, torch.ones(6, dtype=torch.float64), torch.nextafter(top, torch.ones(()).double())):
        got = inverse_cdf_sample(logits, u, 1.0, order)
        if order == "vocab":
            assert got.tolist() == [8] * 6
        assert torch.all(torch.isfinite(logits.gather(-1, got[:, None])))
    as_given = logits.double()
    probabilities(as_given, torch.full((6,), 0.5))  # tempers a copy, never the caller's float64 logits
    assert torch.equal(as_given, logits.double())
    u = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    u[:, -1] = 1.0
    many = inverse_cdf_sample(logits, u, 0.7, order, min_p=0.05)
    assert many.shape == (6, 5)
    for j in range(5):
        assert torch.equal(many[:, j], inverse_cdf_sample(logits, u[:, j], 0.7, order, min_p=0.05))


def test_sorted_order_small_u_gives_argmax():
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample

    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(6))
    u = torch.full((32,), 1e-9, dtype=torch.float64)
    assert torch.equal(inverse_cdf_sample(logits, u, 1.0, "sorted"), logits.argmax(-1))
    assert torch.equal(inverse_cdf_sample(logits, u, 0.3, "sorted"), logits.argmax(-1))


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_invert_noise_exact(order):
    from kforcing_dist.nn.inverse_cdf import (cdf_interval, inverse_cdf_sample, invert_noise,
                                                   invert_noise_exact)

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(256, 30, generator=gen) * 2
    tokens = torch.randint(0, 30, (256,), generator=gen)
    r = torch.rand(256, generator=gen, dtype=torch.float64)
    r[:8] = 1.0 - 1e-17  # rounds to 1: the top of the interval
    r[8:16] = 0.0
    u = invert_noise_exact(logits, tokens, r, 0.8, order)
    assert torch.equal(inverse_cdf_sample(logits, u, 0.8, order), tokens)
    torch.testing.assert_close(u, invert_noise(logits, tokens, r, 0.8, order), rtol=0, atol=1e-12)
    low, high = cdf_interval(logits, tokens, 0.8, order)
    assert torch.all(u >= low - 1e-15) and torch.all(u < high)


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_min_p_samples_the_renormalised_truncated_distribution(order):
    from kforcing_dist.nn.inverse_cdf import (cdf_interval, chance_level, inverse_cdf_sample, invert_noise_exact,
                                              probabilities, truncate_min_p)

    # p = 0.5 / 0.3 / 0.15 / 0.05 at tau 1; min_p 0.2 cuts below 0.1, i.e. token 3 only
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    kept = torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.95
    torch.testing.assert_close(probabilities(logits, 1.0, 0.2), kept, rtol=0, atol=1e-15)
    assert float(chance_level(logits, 1.0, 0.2)) == pytest.approx(float((kept * kept).sum()), abs=1e-15)
    n = 10_000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = inverse_cdf_sample(logits.expand(n, 4), grid, 1.0, order, min_p=0.2)
    assert (torch.bincount(tokens, minlength=4).double() - n * kept).abs().max() <= 1.0
    # G of the truncated teacher = G of logits with the cut token at -inf
    cut = logits.clone()
    cut[3] = float("-inf")
    assert torch.equal(tokens, inverse_cdf_sample(cut.expand(n, 4), grid, 1.0, order))
    assert torch.equal(truncate_min_p(logits, 1.0, 0.2), cut)
    low, high = cdf_interval(logits, torch.tensor(1), 1.0, order, 0.2)
    assert (float(low), float(high)) == pytest.approx((0.5 / 0.95, 0.8 / 0.95), abs=1e-15)
    u = invert_noise_exact(logits.expand(3, 4), torch.tensor([0, 1, 2]), torch.rand(3, dtype=torch.float64),
                           1.0, order, 0.2)
    assert inverse_cdf_sample(logits.expand(3, 4), u, 1.0, order, 0.2).tolist() == [0, 1, 2]
    # min-p acts on the tempered distribution: at tau 2, p ~ 0.37 / 0.29 / 0.20 / 0.11 keeps all four
    assert bool((probabilities(logits, 2.0, 0.2) > 0).all())
    assert torch.equal(truncate_min_p(logits, 2.0, 0.2), logits)
    with pytest.raises(ValueError, match="min_p must be in"):
        probabilities(logits, 1.0, 1.0)


# ------------------------------------------------------------------------------ layout


def test_window_layout_by_hand():
    from kforcing_dist.nn.window import window_layout

    pos, mask = window_layout(3, torch.tensor([[0, 2]]), 2)
    assert pos.tolist() == [[0, 1, 2, 1, 2, 3, 4]]
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # context 0..2: causal
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0],  # window t=0, item 1: context <= 0, itself
        [1, 0, 0, 1, 1, 0, 0],  # item 2: context <= 0, items 1..2
        [1, 1, 1, 0, 0, 1, 0],  # window t=2: context <= 2, not window t=0
        [1, 1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 7, 7) and torch.equal(mask[0, 0], want)


def test_window_layout_rejects_bad_starts():
    from kforcing_dist.nn.window import window_layout

    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        window_layout(3, torch.tensor([[0, 3]]), 2)
    with pytest.raises(ValueError, match="integer"):
        window_layout(3, torch.tensor([[0.0]]), 2)
    with pytest.raises(ValueError, match="items"):
        window_layout(3, torch.tensor([[0]]), 0)


def test_sample_window_starts():
    from kforcing_dist.nn.window import sample_window_starts

    gen = torch.Generator().manual_seed(0)
    s = sample_window_starts(4, 10, 3, gen)
    assert s.shape == (4, 3) and s.dtype == torch.long
    assert torch.all(s[:, 1:] > s[:, :-1]) and s.min() >= 0 and s.max() <= 9
    assert torch.equal(sample_window_starts(2, 5, 0), torch.arange(5).expand(2, 5))
    capped = sample_window_starts(64, 10, 2, gen, max_start=4)
    assert capped.max() <= 4 and len(set(capped.flatten().tolist())) == 5
    again = sample_window_starts(4, 10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, s)
    with pytest.raises(ValueError, match="windows per sequence"):
        sample_window_starts(2, 5, 6)
    with pytest.raises(ValueError, match="max_start"):
        sample_window_starts(2, 5, 1, max_start=5)


# ------------------------------------------------------------------------------ PFLM


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_all_windows_equal_separate_windows(groups, cfg_name):
    """The staircase mask: one pass over all windows equals one pass per window."""
    student = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=2)
    ids = ids_of()
    ws = torch.tensor([[0, 3, 5, 7], [1, 2, 6, 7]])
    u = noise(2, 4, 2)
    tau = torch.tensor([1.0, 0.7])
    real = ids_of(2, 4, seed=9).view(2, 4, 1)  # one real token before the noise slots
    with torch.no_grad():
        together = student.forward_windows(ids, ws, u, tau)
        together_real = student.forward_windows(ids, ws, u, tau, window_tokens=real)
        assert together.shape == (2, 4, 2, PADDED)
        for i in range(2):
            for w in range(4):
                t = int(ws[i, w])
                ctx, one = ids[i:i + 1, :t + 1], torch.tensor([[t]])
                alone = student.forward_windows(ctx, one, u[i:i + 1, w:w + 1], tau[i:i + 1])
                torch.testing.assert_close(alone[0, 0], together[i, w], rtol=0, atol=1e-5)
                alone = student.forward_windows(ctx, one, u[i:i + 1, w:w + 1], tau[i:i + 1],
                                                window_tokens=real[i:i + 1, w:w + 1])
                torch.testing.assert_close(alone[0, 0], together_real[i, w], rtol=0, atol=1e-5)
    assert (together_real - together).abs().max() > 1e-5  # the real token does matter


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_last_window_is_a_plain_causal_pass(groups, cfg_name):
    """A window at t = N-1 is an ordinary causal sequence: context, then slot vectors at
    positions N..N+m-1 (learned position embeddings added like a token's)."""
    student = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=3)
    ids, u, tau = ids_of(), noise(2, 1, 3), torch.tensor([1.0, 0.5])
    with torch.no_grad():
        got = student.forward_windows(ids, torch.full((2, 1), N - 1), u, tau)
        slots = student.noise_encoder(u[:, 0], tau[:, None])
        if student.embed_positions is not None:
            slots = slots + student.embed_positions(torch.arange(N, N + 3))
        hidden = torch.cat([student.embed(ids), slots], dim=1)  # default positions 0..N+2
        want = student.head(student.backbone(hidden))[:, N:]
    torch.testing.assert_close(got[:, 0], want, rtol=0, atol=1e-5)


def _changed(a, b):
    return (a - b).abs().amax(dim=-1)  # per slot


def test_slot_visibility(groups):
    """Inputs the mask hides change nothing at a slot; visible ones change it."""
    from kforcing_dist.nn.window import all_window_starts

    student = build_student(groups, small_cfg(), max_k=3)
    ids, ws, u = ids_of(), all_window_starts(2, N), noise(2, N, 3)
    with torch.no_grad():
        base = student.forward_windows(ids, ws, u, 1.0)

        later = ids.clone()
        later[:, 5] = (later[:, 5] + 1) % VOCAB  # a context token: visible to windows t >= 5
        d = _changed(student.forward_windows(later, ws, u, 1.0), base)
        assert torch.all(d[:, :5] == 0)
        assert torch.all(d[:, 5:] > 1e-6)

        earlier = ids.clone()
        earlier[:, 1] = (earlier[:, 1] + 1) % VOCAB
        d = _changed(student.forward_windows(earlier, ws, u, 1.0), base)
        assert torch.all(d[:, :1] == 0) and torch.all(d[:, 1:] > 1e-6)

        for slot in range(3):
            moved = u.clone()
            moved[:, 4, slot] = (moved[:, 4, slot] + 0.37) % 1.0  # window t=4 only
            d = _changed(student.forward_windows(ids, ws, moved, 1.0), base)
            others = torch.ones(N, dtype=torch.bool)
            others[4] = False
            assert torch.all(d[:, others] == 0), "another window's u leaked in"
            assert torch.all(d[:, 4, :slot] == 0), "a later slot's u leaked into an earlier slot"
            assert torch.all(d[:, 4, slot:] > 1e-6), "own or earlier slot's u is not seen"

        d = _changed(student.forward_windows(ids, ws, u, torch.tensor([1.0, 0.5])), base)
        assert torch.all(d[0] == 0) and torch.all(d[1] > 1e-6)  # tau is per sequence


def test_forward_windows_errors(groups):
    student = build_student(groups, small_cfg(position="learned", max_seq_len=10), max_k=2)
    ids, ws = ids_of(), torch.tensor([[0, 7], [1, 2]])
    with pytest.raises(ValueError, match="max_k=2"):
        student.forward_windows(ids, ws, noise(2, 2, 3), 1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        student.forward_windows(ids, ws, noise(2, 2, 1), 1.0, window_tokens=ids[:, :4].view(2, 2, 2))
    with pytest.raises(ValueError, match="u must have shape"):
        student.forward_windows(ids, ws, noise(2, 3, 1), 1.0)
    with pytest.raises(ValueError, match="window starts"):
        student.forward_windows(ids, torch.tensor([[0, 8], [0, 0]]), noise(2, 2, 1), 1.0)
    with pytest.raises(ValueError, match="tau"):
        student.forward_windows(ids, ws, noise(2, 2, 1), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_init_from_teacher_and_from_student(groups, cfg_name):
    from kforcing_dist.model import full_state_dict
    from kforcing_dist.model.student import PFLM

    cfg = small_cfg(**CONFIGS[cfg_name])
    teacher = build_teacher(groups, cfg, seed=0)
    student = build_student(groups, cfg, max_k=1, seed=5)
    fresh = {n: p.detach().clone() for n, p in student.noise_encoder.named_parameters()}
    ids = ids_of()
    with torch.no_grad():
        assert (student(ids) - teacher(ids)).abs().max() > 1e-3
        student.init_from_teacher(teacher, groups)
        torch.testing.assert_close(student(ids), teacher(ids), rtol=0, atol=0)
    for n, p in student.noise_encoder.named_parameters():
        assert torch.equal(p, fresh[n]), f"noise encoder {n} was overwritten"
    t_names = {n for n, _ in teacher.named_parameters()}
    s_names = {n for n, _ in student.named_parameters()}
    assert s_names - t_names == {"noise_encoder." + n for n in fresh}

    # From a full state dict too (what a checkpoint loader hands over).
    other = build_student(groups, cfg, max_k=1, seed=6)
    other.init_from_teacher(full_state_dict(teacher, groups), groups)
    with torch.no_grad():
        torch.testing.assert_close(other(ids), teacher(ids), rtol=0, atol=0)

    rng = torch.get_rng_state()
    stage2 = PFLM.from_student(student)
    assert torch.equal(torch.get_rng_state(), rng)
    assert stage2.max_k == 2
    for n, p in student.named_parameters():
        assert torch.equal(dict(stage2.named_parameters())[n], p), n
    ws, u = torch.tensor([[2, 6], [0, 7]]), noise(2, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(stage2.forward_windows(ids, ws, u, 1.0),
                                   student.forward_windows(ids, ws, u, 1.0), rtol=0, atol=0)

    with pytest.raises(ValueError, match="num_layers"):
        build_student(groups, small_cfg(num_layers=1, **CONFIGS[cfg_name]), 1).init_from_teacher(
            teacher, groups)


# ------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_stage1_targets_equal_truncated_teacher(groups, order):
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
    from kforcing_dist.distill.targets import stage1_targets

    teacher = build_teacher(groups, small_cfg())
    ids = ids_of()
    ws = torch.tensor([[0, 2, 7], [3, 4, 5]])
    u = noise(2, 3, 1)
    tau = torch.tensor([1.0, 0.6])
    got = stage1_targets(teacher, ids, ws, u, tau, order, groups)
    assert got.shape == (2, 3, 1) and got.dtype == torch.long
    with torch.no_grad():
        for i in range(2):
            for w in range(3):
                t = int(ws[i, w])
                logits = teacher(ids[i:i + 1, :t + 1])[0, -1, :VOCAB]
                want = inverse_cdf_sample(logits, u[i, w, 0], float(tau[i]), order)
                assert int(got[i, w, 0]) == int(want), (i, w)
    assert got.max() < VOCAB


def test_stage1_targets_of_a_min_p_teacher(groups):
    from kforcing_dist.distill.targets import stage1_targets
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample, probabilities

    teacher = build_teacher(groups, small_cfg())
    ids = ids_of()
    ws = torch.tensor([[0, 2, 7], [3, 4, 5]])
    u = noise(2, 3, 1)
    tau = torch.tensor([1.0, 0.6])
    got = stage1_targets(teacher, ids, ws, u, tau, "vocab", groups, 0.3)
    with torch.no_grad():
        for i in range(2):
            for w in range(3):
                logits = teacher(ids[i:i + 1, :int(ws[i, w]) + 1])[0, -1, :VOCAB]
                assert int(got[i, w, 0]) == int(inverse_cdf_sample(logits, u[i, w, 0], float(tau[i]), "vocab", 0.3))
                p = probabilities(logits, float(tau[i]))
                assert float(p[got[i, w, 0]]) >= 0.3 * float(p.max())


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_self_forcing_equals_two_sequential_passes(groups, cfg_name):
    from kforcing_dist.distill.targets import self_forcing_targets

    k = 2
    prev = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=k, seed=3)
    ids = ids_of(seed=4)
    ws = torch.tensor([[0, 3, 6], [1, 5, 7]])
    u = noise(2, 3, 2 * k, seed=7)
    tau = torch.tensor([0.8, 1.0])
    got = self_forcing_targets(prev, ids, ws, u, tau, groups)
    assert got.shape == (2, 3, 2 * k) and got.dtype == torch.long
    with torch.no_grad():
        for i in range(2):
            for w in range(3):
                t = int(ws[i, w])
                ctx = ids[i:i + 1, :t + 1]
                first = argmax_real(prev.forward_windows(
                    ctx, torch.tensor([[t]]), u[i:i + 1, w:w + 1, :k], tau[i:i + 1]))
                longer = torch.cat([ctx, first.view(1, k)], dim=1)  # y_1..y_k as plain context
                second = argmax_real(prev.forward_windows(
                    longer, torch.tensor([[t + k]]), u[i:i + 1, w:w + 1, k:], tau[i:i + 1]))
                want = torch.cat([first.view(k), second.view(k)])
                assert torch.equal(got[i, w], want), (i, w, got[i, w], want)
    assert len(set(got.flatten().tolist())) > 2  # not a degenerate constant output
    with pytest.raises(ValueError, match="even"):
        self_forcing_targets(prev, ids, ws, u[..., :3], tau, groups)
    with pytest.raises(ValueError, match="max_k=2"):
        self_forcing_targets(prev, ids, ws, noise(2, 3, 6), tau, groups)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("m", [2, 4])
def test_teacher_chain_equals_sequential_teacher_passes(groups, cfg_name, m):
    """Each window's chain against the plain teacher on context[:t+1] + y_1..y_{j-1}, one
    ordinary causal pass per token (float64 weights)."""
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
    from kforcing_dist.distill.targets import teacher_chain_targets
    from kforcing_dist.model import TransformerLM

    torch.manual_seed(5)
    teacher = sharpen(TransformerLM(small_cfg(**CONFIGS[cfg_name]), PADDED, groups,
                                    params_dtype=torch.float64)).eval()
    ids = ids_of(seed=6)
    ws = torch.tensor([[0, 3, N - 1], [2, 5, N - 1]])  # the last window starts at the sequence end
    u = noise(2, 3, m, seed=8)
    tau = torch.tensor([1.0, 0.6])
    for order in ("vocab", "sorted"):
        got = teacher_chain_targets(teacher, ids, ws, u, tau, order, groups)
        assert got.shape == (2, 3, m) and got.dtype == torch.long
        with torch.no_grad():
            for i in range(2):
                for w in range(3):
                    seq = ids[i, :int(ws[i, w]) + 1]
                    for j in range(m):
                        logits = teacher(seq[None])[0, -1, :VOCAB]
                        y = inverse_cdf_sample(logits, u[i, w, j], float(tau[i]), order)
                        assert int(got[i, w, j]) == int(y), (order, i, w, j)
                        seq = torch.cat([seq, y.view(1)])
        assert len(set(got.flatten().tolist())) > 2  # not a degenerate constant output
    with pytest.raises(ValueError, match="at least one"):
        teacher_chain_targets(teacher, ids, ws, u[..., :0], tau, "vocab", groups)


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_noise_inversion_reproduces_data(groups, order):
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
    from kforcing_dist.nn.window import sample_window_starts
    from kforcing_dist.distill.targets import noise_inversion_batch

    k = 3
    teacher = build_teacher(groups, small_cfg())
    tokens = ids_of(2, N + k, seed=11)
    ws = sample_window_starts(2, N, 5, torch.Generator().manual_seed(1))
    tau = torch.tensor([1.0, 0.7])
    u, targets = noise_inversion_batch(teacher, tokens, ws, k, tau, order,
                                       torch.Generator().manual_seed(2), groups)
    assert u.shape == targets.shape == (2, 5, k) and u.dtype == torch.float64
    assert torch.all(u >= 0) and torch.all(u < 1)
    with torch.no_grad():
        for i in range(2):
            for w in range(5):
                t = int(ws[i, w])
                assert torch.equal(targets[i, w], tokens[i, t + 1:t + 1 + k])
                for j in range(k):  # x_{t+1+j} given x_<=t+j, on the truncated context
                    logits = teacher(tokens[i:i + 1, :t + j + 1])[0, -1, :VOCAB]
                    got = inverse_cdf_sample(logits, u[i, w, j], float(tau[i]), order)
                    assert int(got) == int(targets[i, w, j]), (i, w, j)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        noise_inversion_batch(teacher, tokens, torch.tensor([[8], [0]]), k, 1.0, order, None, groups)


# ------------------------------------------------------------------------------ losses


def test_slot_metrics_hand_built(groups):
    from kforcing_dist.distill.losses import slot_metrics

    V = 8
    logits = torch.randn(1, 2, 2, V, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[[1, 2], [3, 4]]])
    winners = torch.tensor([[[1, 2], [3, 5]]])  # window 0 all right; window 1 slot 2 wrong
    logits.scatter_add_(-1, winners[..., None], torch.full((1, 2, 2, 1), 20.0))
    logits.requires_grad_()
    loss, m = slot_metrics(logits, targets, groups)
    ref = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    per_slot = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(2, 2)
    assert m["loss_per_slot"] == pytest.approx(per_slot.mean(0).tolist(), rel=1e-6)
    assert m["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert m["acc_per_slot"] == [1.0, 0.5]
    assert m["acc"] == 0.75 and m["block_match"] == 0.5
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()

    # Weight 0 on window 1: only window 0 counts.
    loss_w, mw = slot_metrics(logits, targets, groups, weight=torch.tensor([[[1.0], [0.0]]]))
    torch.testing.assert_close(loss_w, per_slot[0].mean(), rtol=1e-6, atol=1e-6)
    assert mw["acc_per_slot"] == [1.0, 1.0] and mw["block_match"] == 1.0
    with pytest.raises(ValueError, match="targets"):
        slot_metrics(logits, targets[..., :1], groups)


def test_slot_metrics_on_student_logits_equal_torch(groups):
    from kforcing_dist.distill.losses import slot_metrics

    student = build_student(groups, small_cfg(), max_k=3)
    logits = student.forward_windows(ids_of(), torch.tensor([[1, 4], [0, 7]]), noise(2, 2, 3), 1.0)
    targets = torch.randint(0, VOCAB, (2, 2, 3), generator=torch.Generator().manual_seed(3))
    loss, m = slot_metrics(logits, targets, groups)
    ref = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    acc = (logits[..., :VOCAB].argmax(-1) == targets).float()
    assert m["acc_per_slot"] == pytest.approx(acc.mean((0, 1)).tolist())
    loss.backward()
    assert all(p.grad is not None for p in student.noise_encoder.parameters())


def _random_layout(gen, trial: int, seed: int, end_row: int, real_every: int):
    """Random staircase inputs for trial ``trial``: ids, window starts (row ``end_row`` with a
    window at the sequence end), noise for 1 + trial slots and, every other layout, real tokens."""
    ids = ids_of(seed=seed + trial)
    W = int(torch.randint(1, N + 1, (1,), generator=gen))
    ws = torch.stack([torch.randperm(N, generator=gen)[:W].sort().values for _ in range(2)])
    ws[end_row, -1] = N - 1
    m_real, m_noise = trial % real_every, 1 + trial
    u = noise(2, W, m_noise, seed=seed + 10 + trial)
    real = ids_of(2, W * m_real, seed=seed + 20 + trial).view(2, W, m_real) if m_real else None
    return ids, ws, u, real, W, m_noise


@pytest.mark.parametrize("cfg_name", [*sorted(CONFIGS), "gqa"])
def test_window_items_on_a_shared_context_pass_equal_forward_windows(groups, cfg_name):
    """One context pass serving several window passes (self-forcing's) computes what the full
    staircase pass does (float64), for random layouts with windows up to the sequence end, with
    and without real tokens in front of the noise slots; whether the context is given as each
    layer's input (``context_pass``) or as each layer's keys and values (``context_keys_values``,
    the frozen models' form); also with grouped-query attention (keys and values kept per KV head)."""
    student = build_student(groups, small_cfg(**{**CONFIGS, "gqa": dict(num_kv_heads=2)}[cfg_name]), max_k=4).double()
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        ids, ws, u, real, W, m_noise = _random_layout(gen, trial, 10, end_row=0, real_every=3)
        tau = torch.tensor([0.6, 1.3])
        with torch.no_grad():
            want = student.forward_windows(ids, ws, u, tau, window_tokens=real)
            for context in (student.context_pass(ids), student.context_keys_values(ids)):
                got = student.window_item_logits(context, ids, ws, u, tau, window_tokens=real)
                assert got.shape == want.shape == (2, W, m_noise, PADDED)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for wrong in (student.context_pass(ids)[:1], student.context_keys_values(ids[:1]),
                  student.context_keys_values(ids[:, :-1])):
        with pytest.raises(ValueError, match="context_pass"):
            student.window_item_logits(wrong, ids, ws, u, tau)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_staircase_causal_prefix_attention_equals_the_dense_masked_path(groups, cfg_name):
    """The student's staircase pass with the context on the causal fast path and only the window
    rows against the mask (causal_prefix = N) equals the dense masked pass, forward and gradients
    (float64), on random layouts with windows up to the sequence end."""
    student = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=4).double().train()
    gen = torch.Generator().manual_seed(8)
    for trial in range(3):
        ids, ws, u, real, W, m_noise = _random_layout(gen, trial, 40, end_row=1, real_every=2)
        tau = torch.tensor([0.9, 1.2])
        hidden, pos, mask, _ = student.window_inputs(ids, ws, u, tau, real)
        weight = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
        results = []
        for prefix in (N, 0):  # 0: the dense masked path
            student.zero_grad()
            x = hidden.detach().requires_grad_(True)
            out = student.backbone(x, pos, mask, causal_prefix=prefix)
            (out * weight).sum().backward()
            results.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in student.named_parameters()
                                                  if p.grad is not None}))
        (split, split_dx, split_g), (dense, dense_dx, dense_g) = results
        torch.testing.assert_close(split, dense, rtol=0, atol=1e-10)
        torch.testing.assert_close(split_dx, dense_dx, rtol=0, atol=1e-10)
        assert split_g.keys() == dense_g.keys() and len(dense_g) > 4
        for name in dense_g:
            torch.testing.assert_close(split_g[name], dense_g[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_last_layer_on_the_read_rows_only_equals_the_full_pass(groups, cfg_name):
    """``backbone(..., read_from=N)`` (the last layer runs its queries and MLP on the window rows
    only) gives the full dense pass's window rows, and the same gradients for a loss on those rows
    (float64, random staircase layouts with windows up to the sequence end, with and without real
    tokens); the student's forward takes that path. Without a mask it refuses."""
    student = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=4).double().train()
    gen = torch.Generator().manual_seed(12)
    for trial in range(3):
        ids, ws, u, real, W, m_noise = _random_layout(gen, trial, 50, end_row=trial % 2, real_every=2)
        tau = torch.tensor([1.0, 0.7])
        hidden, pos, mask, shape = student.window_inputs(ids, ws, u, tau, real)
        weight = torch.randn((2, hidden.shape[1] - N, hidden.shape[2]), generator=gen, dtype=torch.float64)
        results = []
        for prefix, read_from in ((N, N), (0, 0)):  # (0, 0): every row, dense masked attention
            student.zero_grad()
            x = hidden.detach().requires_grad_(True)
            out = student.backbone(x, pos, mask, causal_prefix=prefix, read_from=read_from)
            out = out if read_from else out[:, N:]
            (out * weight).sum().backward()
            results.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in student.named_parameters()
                                                  if p.grad is not None}))
        (read, read_dx, read_g), (full, full_dx, full_g) = results
        assert read.shape == full.shape
        torch.testing.assert_close(read, full, rtol=0, atol=1e-10)
        # The last layer's norm now runs twice (its read rows, every row's keys/values), so the
        # gradients add up in another order, and rotary positions rotate (and pass gradients) in
        # float32 even in a float64 model: float32-level differences (~1e-6 here). A real
        # mismatch is of the order of the values.
        torch.testing.assert_close(read_dx, full_dx, rtol=1e-5, atol=1e-5)
        assert read_g.keys() == full_g.keys() and len(full_g) > 4
        for name in full_g:
            torch.testing.assert_close(read_g[name], full_g[name], rtol=1e-5, atol=1e-5, msg=name)
        with torch.no_grad():
            want = student.window_logits(full, (0, shape[1], shape[2]))
            torch.testing.assert_close(student(ids, ws, u, tau, real), want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="read_from"):
        student.backbone(hidden, pos, None, read_from=N)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_teacher_head_rows_equal_the_full_pass_rows(groups, cfg_name):
    """``teacher(ids, head_rows=rows)`` with fewer rows than positions (the last layer then runs on
    those rows alone) gives the full pass's logits at those rows (float64), rows up to the last
    position, with the causal mask and with an explicit one; every row keeps the plain path."""
    teacher = build_teacher(groups, small_cfg(**CONFIGS[cfg_name])).double()
    gen = torch.Generator().manual_seed(13)
    ids = ids_of(seed=13)
    b, s = ids.shape
    pad = torch.ones(b, 1, s, s, dtype=torch.bool).tril()
    pad[1, :, :, 0] = False  # sequence 1 never attends to its first token (row 0 keeps itself)
    pad[1, :, 0, 0] = True
    with torch.no_grad():
        for mask in (None, pad):
            full = teacher(ids, attention_mask=mask)
            for r in (1, 3, s - 1, s):
                rows = torch.stack([torch.randperm(s, generator=gen)[:r].sort().values for _ in range(b)])
                rows[0, -1] = s - 1
                want = full.gather(1, rows[:, :, None].expand(b, r, full.shape[-1]))
                got = teacher(ids, attention_mask=mask, head_rows=rows)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _detached_context_reference(student, ids, ws, u, tau, real):
    """forward_windows' dense masked pass with the context rows' hidden states detached at every
    layer's input: what ``context_gradients=False`` must compute, written independently of
    ``context_pass``/``window_item_logits``."""
    hidden, pos, mask, shape = student.window_inputs(ids, ws, u, tau, real)
    N = shape[0]
    rotary = student.rotary_tables(pos)
    for layer in student.layers:
        hidden = torch.cat([hidden[:, :N].detach(), hidden[:, N:]], dim=1)
        hidden = layer(hidden, rotary, mask)
    return student.window_logits(student.final_norm(hidden), shape)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_training_without_context_gradients_equals_a_detached_context(groups, cfg_name):
    """``context_gradients=False`` gives the full pass's logits and the gradients of a pass whose
    context hidden states are detached at every layer (float64, random layouts with windows up to
    the sequence end, with and without real tokens); the last layer, final norm and noise encoder
    get the full pass's gradients, earlier layers do not."""
    student = build_student(groups, small_cfg(**CONFIGS[cfg_name]), max_k=4).double().train()
    gen = torch.Generator().manual_seed(9)
    for trial in range(3):
        ids, ws, u, real, W, m_noise = _random_layout(gen, trial, 60, end_row=trial % 2, real_every=2)
        tau = torch.tensor([0.8, 1.1])
        weight = torch.randn((2, W, m_noise, PADDED), generator=gen, dtype=torch.float64)
        grads = {}
        for name, run in (("fast", lambda: student(ids, ws, u, tau, real, context_gradients=False)),
                          ("reference", lambda: _detached_context_reference(student, ids, ws, u, tau, real)),
                          ("full", lambda: student(ids, ws, u, tau, real))):
            student.zero_grad(set_to_none=True)
            out = run()
            (out.masked_fill(out < -1e4, 0) * weight).sum().backward()
            # no gradient at all (a weight only the detached context uses) counts as zeros
            grads[name] = (out.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for n, p in student.named_parameters()})
        (fast, fast_g), (ref, ref_g), (full, full_g) = grads["fast"], grads["reference"], grads["full"]
        # logits leave the head in float32: its rounding (~1e-7 relative) sets the tolerances
        torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
        for name in ref_g:
            torch.testing.assert_close(fast_g[name], ref_g[name], rtol=1e-7, atol=1e-8, msg=name)
        last = f"layers.{len(student.layers) - 1}."
        differs = [n for n in ref_g if not torch.allclose(ref_g[n], full_g[n], rtol=1e-5, atol=1e-6)]
        assert differs and not [n for n in differs if n.startswith((last, "noise_encoder.", "final_norm."))]
