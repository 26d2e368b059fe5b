"""The float32 head of a bf16 frozen model (distill.frozen_precision auto) at TP=2 (vocab-parallel
head) and under ZeRO-3 partitioning (the head stays whole and float32 while the body is
partitioned in bf16): its logits equal the float32 model's own final norm and head run on the
bf16 body's upcast hidden state, and an fp32 frozen model's targets equal the float32 model's."""

import pytest
import torch

from tests.distributed.launcher import run_distributed

VOCAB, SEQ, BATCH = 90, 12, 2


def _worker(rank, world, tp, partition):
    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.distill.frozen import Float32Island, freeze
    from kforcing_dist.distill.targets import gather_full_vocab, stage1_targets
    from kforcing_dist.model import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch

    device = init_distributed(resolve_launch(), "gloo")
    groups = init_model_parallel(tp, 1, device)
    cfg = ModelConfig(vocab_size=VOCAB, make_vocab_size_divisible_by=8, hidden_size=32, num_layers=2,
                      num_heads=4, max_seq_len=32, tie_embeddings=partition)
    padded = pad_vocab_size(VOCAB, cfg.make_vocab_size_divisible_by, tp)

    def build():
        torch.manual_seed(3)
        return TransformerLM(cfg, padded, groups.tp_group).eval()

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    starts = torch.arange(SEQ).expand(BATCH, SEQ)
    u = torch.rand(BATCH, SEQ, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference, body = build(), build().to(torch.bfloat16)
    seen = {}
    body.final_norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("h", args[0]))
    frozen = freeze(build(), groups, "bf16", partition, "auto")
    full32 = freeze(build(), groups, "bf16", partition, "fp32")
    with torch.no_grad():
        body(ids)
        want = reference.head(reference.final_norm(seen["h"].float()))
        got = frozen(ids)
    out = {"logits_equal": torch.equal(got, want), "logits_dtype": str(got.dtype),
           "island": isinstance(frozen.final_norm, Float32Island),
           "head_fp32": frozen.lm_head.module.weight.dtype == torch.float32 if not cfg.tie_embeddings
           else frozen.lm_head._held[1].dtype == torch.float32,
           "body_dtypes": sorted({str(p.dtype) for p in frozen.parameters()}),
           "full_logits": gather_full_vocab(got, groups.tp_group).tolist(),  # no tensors through the queue
           "fp32_targets_equal": torch.equal(stage1_targets(full32, ids, starts, u, 1.0, "vocab", groups.tp_group),
                                             stage1_targets(reference, ids, starts, u, 1.0, "vocab", groups.tp_group))}
    if partition:  # the body is partitioned: a rank holds about half of its weights
        out["partitioned"] = all(hasattr(p, "ds_tensor") for p in frozen.parameters())
    shutdown()
    return out


@pytest.mark.parametrize("tp,partition", [(2, False), (1, True)])
def test_float32_head_of_a_bf16_frozen_model(tp, partition):
    results = run_distributed(_worker, 2, tp, partition, timeout=240)
    for r in results:
        assert r["logits_equal"] and r["logits_dtype"] == "torch.float32"
        assert r["island"] and r["head_fp32"] and r["body_dtypes"] == ["torch.bfloat16"]
        assert r["fp32_targets_equal"]
        assert r.get("partitioned", True)
    assert results[0]["full_logits"] == results[1]["full_logits"]
