"""GPU paths (CUDA only; skipped elsewhere): bf16 decoding with fused attention matches fp32 CPU."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_decode_generate import PROMPTS, make_model

pytestmark = pytest.mark.gpu


def test_bf16_cuda_pflm_logits_match_fp32_cpu():
    model = make_model("pflm", std=0.1)
    context = torch.tensor([PROMPTS[0]])
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = model.pflm_logits(context, u, 1.0)
    gpu = model.to("cuda", torch.bfloat16)
    out = gpu.pflm_logits(context.cuda(), u.cuda(), 1.0).float().cpu()
    assert torch.allclose(out[..., :100], ref[..., :100], atol=5e-2, rtol=5e-2)


def test_cuda_generation_runs_with_cache_and_counts_tokens():
    from kforcing_dist.decode import generate

    model = make_model("pflm").to("cuda", torch.bfloat16)
    res = generate(model, PROMPTS, mode="pflm", k=4, max_new_tokens=8, ignore_eos=True)
    assert res.new_tokens == 8 * len(PROMPTS) and res.steps == 2
