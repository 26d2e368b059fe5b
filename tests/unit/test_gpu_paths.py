"""GPU paths (CUDA only; skipped elsewhere): bf16 decoding with fused attention matches fp32 CPU,
CUDA-graph steps equal eager steps, lossless mode and the bench run on the GPU."""

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


@pytest.mark.parametrize("mode, k, penalty", [("ar", 1, 0.0), ("pflm", 4, 0.0), ("pflm", 4, 2.0)])
def test_cuda_graphs_equal_eager_steps(mode, k, penalty):
    from kforcing_dist.decode import generate

    model = make_model(mode, seed=3).to("cuda")  # fp32: same kernels, tokens must agree
    kw = dict(mode=mode, k=k, max_new_tokens=12, seed=2, frequency_penalty=penalty)
    if mode == "ar":
        kw["sampling"] = "inverse_cdf"
    eager = generate(model, PROMPTS, **kw)
    graphs = generate(model, PROMPTS, cuda_graphs=True, **kw)
    assert graphs.tokens == eager.tokens


def test_cuda_lossless_equals_teacher_with_and_without_graphs():
    from kforcing_dist.decode import generate, generate_lossless

    teacher, student = make_model("ar", seed=1).to("cuda"), make_model("pflm", seed=2).to("cuda")
    ref = generate(teacher, PROMPTS, mode="ar", sampling="inverse_cdf", max_new_tokens=10, seed=5)
    for graphs in (False, True):
        for penalty in (0.0, 0.5):  # the penalty changes the drafts, never the output
            res = generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=10, seed=5,
                                    cuda_graphs=graphs, frequency_penalty=penalty)
            assert res.tokens == ref.tokens


def test_bench_sweep_on_cuda_reports_bandwidth(tmp_path):
    from kforcing_dist.decode.bench import bench_sweep, write_bench

    teacher = make_model("ar").to("cuda", torch.bfloat16)
    student = make_model("pflm").to("cuda", torch.bfloat16)
    result = bench_sweep(teacher, student, batches=[1, 4], ks=[2], contexts=[8], new_tokens=8,
                         repeats=2, cuda_graphs=True)
    assert all(r["achieved_bandwidth_gb_s"] > 0 for r in result["rows"])
    assert torch.cuda.get_device_name() in result["device"]
    write_bench(result, tmp_path)
