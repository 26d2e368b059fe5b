"""TP=2 equals TP=1: weights from the same seed, logits, loss and every parameter's gradient.

One 2-process launch runs every case: each rank also builds the TP=1 reference on a
one-rank group of its own, so the comparison needs no second launch.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

VOCAB = 100  # padded to 112 (8 * tp), so the last shard holds padded entries
BATCH, SEQ = 2, 10
CASES = {
    "rope-swiglu-rmsnorm-gqa": dict(position="rope", activation="swiglu", norm="rmsnorm",
                                    num_heads=4, num_kv_heads=2, qkv_bias=True,
                                    attn_out_bias=True, lm_head_bias=True),
    "layernorm-gelu-tied-learned": dict(position="learned", activation="gelu_tanh",
                                        norm="layernorm", norm_bias=True, tie_embeddings=True,
                                        num_heads=4),
}


def _gather_last_dim(t, group):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _max_err(a: dict, b: dict) -> dict:
    return {k: (a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12) for k in b}


def _tp_worker(rank, world):
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.model import TransformerLM, full_grad_dict, full_state_dict, lm_loss, load_full_state_dict
    from kforcing_dist.nn.sizes import PADDED_LOGIT_VALUE, pad_vocab_size
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    device = init_distributed(resolve_launch(), "gloo")
    groups = init_model_parallel(world, 1, device)
    # Every rank must create every group; each keeps the one-rank group it belongs to.
    single = [dist.new_group([r]) for r in range(world)][rank]
    out = {}
    for name, kw in CASES.items():
        cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=8, hidden_size=32,
                          num_layers=2, max_seq_len=32, **kw)
        padded = pad_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, world)
        torch.manual_seed(7)
        ref = TransformerLM(cfg, padded, single)
        torch.manual_seed(7)
        tp = TransformerLM(cfg, padded, groups)
        res = {"padded": padded, "local_vocab": tp.local_vocab_size}
        full_ref = full_state_dict(ref, single)
        full_tp = full_state_dict(tp, groups)
        res["same_keys"] = set(full_ref) == set(full_tp)
        res["weights_equal"] = all(torch.equal(full_tp[k], full_ref[k]) for k in full_ref)

        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
        # A per-head mask (different for every global head) checks the head slicing per rank.
        head_mask = torch.rand(BATCH, cfg.num_heads, SEQ, SEQ, generator=gen) > 0.5
        head_mask |= torch.eye(SEQ, dtype=torch.bool)
        position_ids = torch.arange(SEQ).expand(BATCH, SEQ) + 3

        logits_ref = ref(ids, position_ids=position_ids)
        logits_tp = tp(ids, position_ids=position_ids)
        loss_ref = lm_loss(logits_ref, labels, single, loss_mask=loss_mask)
        loss_tp = lm_loss(logits_tp, labels, groups, loss_mask=loss_mask)
        # Our explicit-group loss equals megatron's (which uses the global TP group = groups').
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits_tp.detach().clone(), labels)
        res["megatron_loss_err"] = abs(
            (per_token * loss_mask).sum().item() / loss_mask.sum().item() - loss_tp.item())
        with torch.no_grad():
            full_logits = _gather_last_dim(logits_tp, groups.tp_group)
            res["logits_err"] = (full_logits - logits_ref).abs().max().item()
            res["logits_scale"] = logits_ref[..., :VOCAB].abs().max().item()
            res["padded_masked"] = bool(torch.all(full_logits[..., VOCAB:] == PADDED_LOGIT_VALUE))
            masked_ref = ref(ids, attention_mask=head_mask)
            masked_tp = _gather_last_dim(tp(ids, attention_mask=head_mask), groups.tp_group)
            res["head_mask_err"] = (masked_tp - masked_ref).abs().max().item()
            res["head_mask_matters"] = (masked_ref - ref(ids)).abs().max().item()
        res["loss_err"] = abs(loss_tp.item() - loss_ref.item())
        loss_ref.backward()
        loss_tp.backward()
        grads_ref, grads_tp = full_grad_dict(ref, single), full_grad_dict(tp, groups)
        res["grad_keys_equal"] = set(grads_ref) == set(full_ref) == set(grads_tp)
        res["grad_rel_err"] = _max_err(grads_tp, grads_ref)

        # Loading full weights into a TP=2 model (slicing) reproduces the reference too.
        torch.manual_seed(99)
        other = TransformerLM(cfg, padded, groups)
        load_full_state_dict(other, full_ref, groups)
        with torch.no_grad():
            loaded = _gather_last_dim(other(ids, position_ids=position_ids), groups.tp_group)
        res["loaded_logits_err"] = (loaded - logits_ref).abs().max().item()
        out[name] = res
    shutdown()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_tp_worker, 2, timeout=240)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_full_weights(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        assert r["padded"] == 112 and r["local_vocab"] == 56
        assert r["same_keys"], f"rank {rank}: parameter names differ between TP=1 and TP=2"
        assert r["weights_equal"], f"rank {rank}: full weights differ between TP=1 and TP=2"


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_loss_match_tp1(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        assert r["logits_err"] < 1e-5, f"rank {rank}: logits differ by {r['logits_err']:.3g}"
        assert r["padded_masked"]
        assert r["head_mask_matters"] > 1e-4  # the per-head mask does change the output
        assert r["head_mask_err"] < 1e-5, f"rank {rank}: per-head mask: {r['head_mask_err']:.3g}"
        assert r["loss_err"] < 1e-5, f"rank {rank}: loss differs by {r['loss_err']:.3g}"
        assert r["megatron_loss_err"] < 1e-6, f"rank {rank}: differs from megatron's loss"
        assert r["loaded_logits_err"] < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_gradient_matches_tp1(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        assert r["grad_keys_equal"], f"rank {rank}: some parameter got no gradient"
        bad = {k: v for k, v in r["grad_rel_err"].items() if v > 1e-5}
        assert not bad, f"rank {rank}: gradients differ from TP=1 (relative max error): {bad}"
