"""K-Forcing core at TP=2 equals TP=1: student windows, targets, losses and gradients.

One 2-process launch; each rank also builds the TP=1 reference on a one-rank group of its own
(as tests/distributed/test_model_tp.py does).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

VOCAB = 100  # padded to 112 (8 * tp): the last shard holds padded entries
BATCH, N = 2, 8
CASES = {
    "rope-swiglu-gqa": dict(position="rope", activation="swiglu", norm="rmsnorm", num_kv_heads=2,
                            lm_head_bias=True),
    "learned-tied": dict(position="learned", tie_embeddings=True, norm_bias=True),
}


def _sharpen(model):
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(8.0)
            layer.attention.k_proj.weight.mul_(8.0)
    return model


def _vocab_parallel_cdf_checks(rank, world, groups):
    """The sharded inverse CDF against the one-process one on many rows, with padded entries
    (including a shard made only of padding) and u at the edges of [0, 1)."""
    import torch.distributed as dist

    from kforcing_dist.distill import vocab_parallel_cdf as vpc
    from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample, invert_noise_exact, probabilities

    res = {}
    gen = torch.Generator().manual_seed(21)
    rows, padded = 3000, 112
    local_v = padded // world
    for real_vocab in (100, 50):  # 50: rank 1's shard (ids 56..111) is all padding
        logits = torch.randn(rows, padded, generator=gen) * 3
        logits[:, real_vocab:] = -1e4
        u = torch.rand(rows, generator=gen, dtype=torch.float64)
        u[:3] = torch.tensor([0.0, 1.0 - 1e-17, 1.0 - 2 ** -53])
        tau = 0.5 + torch.rand(rows, generator=gen, dtype=torch.float64)
        shard = logits[:, rank * local_v:(rank + 1) * local_v]
        sizes = []
        real_gather = dist.all_gather

        def recording_gather(parts, tensor, group=None):
            sizes.append(tensor.numel())
            return real_gather(parts, tensor, group=group)

        for order in ("vocab", "sorted"):
            sizes.clear()
            vpc.dist.all_gather = recording_gather
            try:
                got = vpc.vp_inverse_cdf_sample(shard, u, tau, order, rank * local_v, real_vocab, groups,
                                                chunk_rows=700)
            finally:
                vpc.dist.all_gather = real_gather
            want = inverse_cdf_sample(logits[:, :real_vocab], u, tau, order)
            res[f"{real_vocab}_{order}_equal"] = torch.equal(got, want)
            res[f"{real_vocab}_{order}_max_gathered"] = max(sizes)
            tokens = want.clone()
            r = torch.rand(rows, generator=gen, dtype=torch.float64)
            u_inv = vpc.vp_invert_noise_exact(shard, tokens, r, tau, order, rank * local_v, real_vocab,
                                              groups, chunk_rows=700)
            ref_inv = invert_noise_exact(logits[:, :real_vocab], tokens, r, tau, order)
            res[f"{real_vocab}_{order}_inv_err"] = (u_inv - ref_inv).abs().max().item()
            res[f"{real_vocab}_{order}_roundtrip"] = torch.equal(
                vpc.vp_inverse_cdf_sample(shard, u_inv, tau, order, rank * local_v, real_vocab, groups),
                tokens)
            res[f"{real_vocab}_{order}_real_only"] = bool((got < real_vocab).all())
            # min-p truncation: the same tokens as one process, never a cut one, and the inverse
            # lands inside the truncated interval
            cut = vpc.vp_inverse_cdf_sample(shard, u, tau, order, rank * local_v, real_vocab, groups,
                                            chunk_rows=700, min_p=0.3)
            res[f"{real_vocab}_{order}_min_p_equal"] = torch.equal(
                cut, inverse_cdf_sample(logits[:, :real_vocab], u, tau, order, min_p=0.3))
            p = probabilities(logits[:, :real_vocab], tau)
            res[f"{real_vocab}_{order}_min_p_kept"] = bool(
                (p.gather(1, cut[:, None])[:, 0] >= 0.3 * p.max(1).values).all())
            res[f"{real_vocab}_{order}_min_p_changed"] = int((cut != got).sum())
            u_cut = vpc.vp_invert_noise_exact(shard, cut, r, tau, order, rank * local_v, real_vocab, groups,
                                              chunk_rows=700, min_p=0.3)
            res[f"{real_vocab}_{order}_min_p_roundtrip"] = torch.equal(
                vpc.vp_inverse_cdf_sample(shard, u_cut, tau, order, rank * local_v, real_vocab, groups,
                                          min_p=0.3), cut)
    return res


def _tp_worker(rank, world):
    import torch.distributed as dist

    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.nn.window import sample_window_starts
    from kforcing_dist.distill.losses import slot_metrics
    from kforcing_dist.distill.targets import (gather_full_vocab, noise_inversion_batch,
                                               self_forcing_targets, stage1_targets,
                                               teacher_chain_targets, vocab_parallel_argmax)
    from kforcing_dist.model import TransformerLM, full_grad_dict
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    device = init_distributed(resolve_launch(), "gloo")
    groups = init_model_parallel(world, 1, device)
    single = [dist.new_group([r]) for r in range(world)][rank]
    out = {}

    # Global argmax with ties across shards: the lowest id wins, as torch.argmax on the full row.
    full = torch.zeros(4, 112)
    full[0, [3, 60]] = 5.0   # tie across the two shards
    full[1, [70, 90]] = 5.0  # tie inside shard 1
    full[2, 111] = 1.0
    full[3] = torch.randn(112, generator=torch.Generator().manual_seed(0))
    shard = full.chunk(world, dim=-1)[rank]
    out["argmax_equal"] = torch.equal(vocab_parallel_argmax(shard, groups), full.argmax(-1))
    out["gather_equal"] = torch.equal(gather_full_vocab(shard, groups), full)
    out["vp_cdf"] = _vocab_parallel_cdf_checks(rank, world, groups)

    for name, kw in CASES.items():
        cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=8, hidden_size=32,
                          num_layers=2, num_heads=4, max_seq_len=32, **kw)
        padded = pad_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, world)
        models = {}
        for tag, group in (("ref", single), ("tp", groups)):
            torch.manual_seed(7)
            teacher = _sharpen(TransformerLM(cfg, padded, group)).eval()
            torch.manual_seed(8)
            student = PFLM(cfg, padded, group, max_k=2, noise_init_std=0.2)
            student.init_from_teacher(teacher, group)
            models[tag] = (teacher, student.eval(), group)

        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(0, VOCAB, (BATCH, N + 2), generator=gen)
        ctx = ids[:, :N]
        ws = sample_window_starts(BATCH, N, 5, torch.Generator().manual_seed(3))
        u = torch.rand(BATCH, 5, 4, generator=gen, dtype=torch.float64)
        real = torch.randint(0, VOCAB, (BATCH, 5, 1), generator=gen)
        tau = torch.tensor([1.0, 0.7])
        targets = torch.randint(0, VOCAB, (BATCH, 5, 2), generator=gen)
        res, got = {}, {}
        for tag, (teacher, student, group) in models.items():
            r = {}
            with torch.no_grad():
                r["logits"] = gather_full_vocab(student.forward_windows(ctx, ws, u[..., :2], tau), group)
                r["logits_real"] = gather_full_vocab(
                    student.forward_windows(ctx, ws, u[..., :1], tau, window_tokens=real), group)
                r["plain"] = gather_full_vocab(student(ctx), group)
                r["teacher"] = gather_full_vocab(teacher(ctx), group)
            for order in ("vocab", "sorted"):
                r[f"stage1_{order}"] = stage1_targets(teacher, ctx, ws, u[..., :1], tau, order, group)
                # 4 draws per start (distill.noise_draws_per_start): one CDF per start serves all
                r[f"stage1_draws_{order}"] = stage1_targets(teacher, ctx, ws, u, tau, order, group)
                r[f"inv_{order}"] = noise_inversion_batch(
                    teacher, ids, ws, 2, tau, order, torch.Generator().manual_seed(5), group)
                r[f"chain_{order}"] = teacher_chain_targets(teacher, ctx, ws, u, tau, order, group)
                # a random teacher is nearly uniform: 0.8 x max p still cuts part of the vocabulary
                r[f"stage1_min_p_{order}"] = stage1_targets(teacher, ctx, ws, u[..., :1], tau, order, group, 0.8)
                r[f"chain_min_p_{order}"] = teacher_chain_targets(teacher, ctx, ws, u, tau, order, group, 0.8)
            r["self_forcing"] = self_forcing_targets(student, ctx, ws, u, tau, group)
            student.zero_grad()
            loss, metrics = slot_metrics(student.forward_windows(ctx, ws, u[..., :2], tau), targets,
                                         group)
            loss.backward()
            r["loss"], r["metrics"] = loss.item(), metrics
            r["grads"] = full_grad_dict(student, group)
            got[tag] = r
        ref, tp = got["ref"], got["tp"]
        for key in ("logits", "logits_real", "plain"):
            res[f"{key}_err"] = (tp[key] - ref[key]).abs().max().item()
        res["student_is_teacher"] = (ref["plain"] - ref["teacher"]).abs().max().item()
        res["padded_masked"] = bool(torch.all(tp["logits"][..., VOCAB:] < -1e3))
        for order in ("vocab", "sorted"):
            res[f"stage1_{order}_equal"] = torch.equal(tp[f"stage1_{order}"], ref[f"stage1_{order}"])
            res[f"stage1_draws_{order}_equal"] = torch.equal(tp[f"stage1_draws_{order}"], ref[f"stage1_draws_{order}"])
            # each draw is the one-draw target of its own u
            res[f"stage1_draws_{order}_each"] = all(torch.equal(
                ref[f"stage1_draws_{order}"][..., j:j + 1],
                stage1_targets(models["ref"][0], ctx, ws, u[..., j:j + 1], tau, order, models["ref"][2]))
                for j in range(u.shape[-1]))
            res[f"inv_{order}_targets_equal"] = torch.equal(tp[f"inv_{order}"][1], ref[f"inv_{order}"][1])
            res[f"inv_{order}_u_err"] = (tp[f"inv_{order}"][0] - ref[f"inv_{order}"][0]).abs().max().item()
            res[f"chain_{order}_equal"] = torch.equal(tp[f"chain_{order}"], ref[f"chain_{order}"])
            for targets in ("stage1", "chain"):
                res[f"{targets}_min_p_{order}_equal"] = torch.equal(tp[f"{targets}_min_p_{order}"],
                                                                    ref[f"{targets}_min_p_{order}"])
                res[f"{targets}_min_p_{order}_changed"] = int((ref[f"{targets}_min_p_{order}"]
                                                               != ref[f"{targets}_{order}"]).sum())
            res[f"chain_{order}_distinct"] = len(set(ref[f"chain_{order}"].flatten().tolist()))
        res["self_forcing_equal"] = torch.equal(tp["self_forcing"], ref["self_forcing"])
        res["self_forcing_distinct"] = len(set(ref["self_forcing"].flatten().tolist()))
        res["loss_err"] = abs(tp["loss"] - ref["loss"])
        res["metrics_ref"], res["metrics_tp"] = ref["metrics"], tp["metrics"]
        res["grad_keys_equal"] = set(tp["grads"]) == set(ref["grads"]) == {
            n for n, _ in models["ref"][1].named_parameters()}
        res["grad_rel_err"] = {
            k: (tp["grads"][k] - ref["grads"][k]).abs().max().item()
            / max(ref["grads"][k].abs().max().item(), 1e-12) for k in ref["grads"]}
        out[name] = res
    shutdown()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_tp_worker, 2, timeout=240)


def test_vocab_parallel_argmax_and_gather(results):
    for rank, res in enumerate(results):
        assert res["argmax_equal"], f"rank {rank}: global argmax differs from torch.argmax"
        assert res["gather_equal"], f"rank {rank}: gathered logits differ"


@pytest.mark.parametrize("real_vocab", [100, 50])
@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_vocab_parallel_inverse_cdf_equals_one_process(results, real_vocab, order):
    for rank, res in enumerate(results):
        r = res["vp_cdf"]
        key = f"{real_vocab}_{order}"
        assert r[f"{key}_equal"], f"rank {rank}: sharded G(x, u) differs from the one-process G"
        assert r[f"{key}_real_only"], f"rank {rank}: a padded id was sampled"
        assert r[f"{key}_roundtrip"], f"rank {rank}: G(vp_invert_noise_exact(token)) != token"
        assert r[f"{key}_inv_err"] < 1e-12
        assert r[f"{key}_min_p_equal"], f"rank {rank}: sharded min-p G differs from the one-process one"
        assert r[f"{key}_min_p_kept"], f"rank {rank}: min-p G returned a token below min_p x max p"
        assert r[f"{key}_min_p_changed"] > 100, "min_p=0.3 should change many of 3000 tokens"
        assert r[f"{key}_min_p_roundtrip"], f"rank {rank}: min-p G(vp_invert_noise_exact(token)) != token"
        if order == "vocab":  # one float64 per row (the shard total), never the vocabulary
            assert r[f"{key}_max_gathered"] == 3000
        else:                 # sorted gathers whole rows, 700 rows at a time
            assert r[f"{key}_max_gathered"] == 700 * (112 // 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_student_windows_match_tp1(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        for key in ("logits", "logits_real", "plain"):
            assert r[f"{key}_err"] < 1e-5, f"rank {rank}: {key} differ by {r[f'{key}_err']:.3g}"
        assert r["student_is_teacher"] == 0  # init_from_teacher copied every weight
        assert r["padded_masked"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_targets_match_tp1(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        for order in ("vocab", "sorted"):
            assert r[f"stage1_{order}_equal"], f"rank {rank}: stage-1 targets ({order}) differ"
            assert r[f"stage1_draws_{order}_equal"] and r[f"stage1_draws_{order}_each"], \
                f"rank {rank}: stage-1 targets of several draws per start ({order}) differ"
            assert r[f"inv_{order}_targets_equal"]
            assert r[f"inv_{order}_u_err"] < 1e-6, f"rank {rank}: inverted noise ({order})"
            assert r[f"chain_{order}_equal"], f"rank {rank}: teacher-chain targets ({order}) differ"
            assert r[f"chain_{order}_distinct"] > 2
            for name in ("stage1", "chain"):
                assert r[f"{name}_min_p_{order}_equal"], f"rank {rank}: min-p {name} targets ({order}) differ"
                assert r[f"{name}_min_p_{order}_changed"] > 0, f"min_p cut none of the {name} targets ({order})"
        assert r["self_forcing_equal"], f"rank {rank}: self-forcing targets differ"
        assert r["self_forcing_distinct"] > 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_metrics_and_gradients_match_tp1(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        assert r["loss_err"] < 1e-5
        ref, tp = r["metrics_ref"], r["metrics_tp"]
        assert tp["acc_per_slot"] == ref["acc_per_slot"] and tp["block_match"] == ref["block_match"]
        assert tp["loss_per_slot"] == pytest.approx(ref["loss_per_slot"], abs=1e-5)
        assert r["grad_keys_equal"], f"rank {rank}: some parameter got no gradient"
        bad = {k: v for k, v in r["grad_rel_err"].items() if v > 1e-5}
        assert not bad, f"rank {rank}: gradients differ from TP=1 (relative max error): {bad}"
