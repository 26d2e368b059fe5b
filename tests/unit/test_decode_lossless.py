"""Lossless mode: the PFLM drafts, the AR teacher verifies each block in one pass; the output
must equal the teacher's own sequential inverse-CDF sample for the same noise, token for token."""

from __future__ import annotations

import pytest
import torch

from kforcing_dist.decode import DecodeError, generate, generate_lossless, noise_table
from kforcing_dist.distill.inverse_cdf import inverse_cdf_sample
from tests.unit.test_decode_generate import PROMPTS, V, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def teacher_reference(teacher, prompts, n, tau, seed, order):
    """The teacher alone, one token per full (cache-free) forward: y_i = G(x y_<i, u[b, i])."""
    u = noise_table(len(prompts), n, seed, "cpu")
    out = []
    for b, p in enumerate(prompts):
        seq = list(p)
        for i in range(n):
            logits = teacher.logits(torch.tensor([seq]))[0, -1, :V]
            seq.append(int(inverse_cdf_sample(logits, u[b, i], tau, order)))
        out.append(seq[len(p):])
    return out


def biased(model, token: int, bias: float):
    """Make ``token`` likely (the head bias adds to every context's logits)."""
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[token] = bias
    return model


@pytest.mark.parametrize("k, tau, order", [(1, 1.0, "vocab"), (2, 0.7, "sorted"), (4, 1.3, "vocab"),
                                           (3, 1.0, "sorted")])
def test_lossless_equals_sequential_teacher_samples(k, tau, order):
    # teacher: token 7 has ~0.6 of the mass, the rest depends on the context; the student
    # always drafts 7, so blocks are partly accepted, partly corrected by the teacher
    teacher = biased(make_model("ar", seed=1, std=0.3, lm_head_bias=True), 7, 5.0)
    student = biased(make_model("pflm", seed=2, std=0.3, lm_head_bias=True), 7, 50.0)
    n = 13
    res = generate_lossless(student, teacher, PROMPTS, k=k, max_new_tokens=n, tau=tau, seed=3,
                            cdf_order=order)
    ref = teacher_reference(teacher, PROMPTS, n, tau, 3, order)
    assert res.tokens == ref
    # the teacher alone through the cached engine gives the same tokens too
    ar = generate(teacher, PROMPTS, mode="ar", sampling="inverse_cdf", max_new_tokens=n, tau=tau,
                  seed=3, cdf_order=order)
    assert ar.tokens == ref
    assert res.new_tokens == n * len(PROMPTS) and res.mode == "lossless"
    # some drafts were accepted (fewer teacher passes than tokens), some were not
    assert 1.0 < res.acceptance_length < k + 1 or k == 1
    assert res.steps < n
    flat = [t for row in ref for t in row]
    assert 0 < flat.count(7) < len(flat)


def test_lossless_with_a_random_student_still_exact():
    teacher, student = make_model("ar", seed=4), make_model("pflm", seed=5)
    res = generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=10, seed=1)
    assert res.tokens == teacher_reference(teacher, PROMPTS, 10, 1.0, 1, "vocab")
    assert res.acceptance_length >= 1.0


def test_lossless_accepts_whole_blocks_and_the_bonus_token():
    teacher = biased(make_model("ar", seed=1, lm_head_bias=True), 9, 60.0)
    student = biased(make_model("pflm", seed=2, lm_head_bias=True), 9, 60.0)
    res = generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=12, seed=0)
    assert res.tokens == [[9] * 12] * len(PROMPTS)
    assert res.steps == 3  # 5 tokens per pass (4 drafted + the teacher's bonus): 5 + 5 + 2
    assert res.acceptance_length == pytest.approx(12 / 3)


def test_lossless_stops_sequences_at_eos_like_the_teacher():
    teacher = biased(make_model("ar", seed=1, std=0.3, lm_head_bias=True, eos_id=3), 7, 4.0)
    student = biased(make_model("pflm", seed=2, std=0.3, lm_head_bias=True, eos_id=3), 7, 50.0)
    for seed in range(4):
        res = generate_lossless(student, teacher, PROMPTS, k=3, max_new_tokens=30, seed=seed)
        ar = generate(teacher, PROMPTS, mode="ar", sampling="inverse_cdf", max_new_tokens=30,
                      seed=seed)
        assert res.tokens == ar.tokens and res.finished == ar.finished
    assert any(res.finished)


def test_lossless_request_errors():
    teacher, student = make_model("ar"), make_model("pflm")
    with pytest.raises(DecodeError, match="needs the AR teacher"):
        generate_lossless(student, student, PROMPTS, k=2, max_new_tokens=4)
    with pytest.raises(DecodeError, match="drafts with a PFLM"):
        generate_lossless(teacher, teacher, PROMPTS, k=1, max_new_tokens=4)
    with pytest.raises(DecodeError, match="differs from the teacher's"):
        generate_lossless(student, make_model("ar", vocab_size=90), PROMPTS, k=2, max_new_tokens=4)
    with pytest.raises(DecodeError, match="exceeds the checkpoint's max_k=4"):
        generate_lossless(student, teacher, PROMPTS, k=5, max_new_tokens=4)
    learned_t = make_model("ar", position="learned", max_seq_len=16)
    learned_s = make_model("pflm", position="learned", max_seq_len=16)
    with pytest.raises(DecodeError, match="learned max_seq_len=16"):
        generate_lossless(learned_s, learned_t, [[1] * 5], k=4, max_new_tokens=10)
    with pytest.raises(DecodeError, match="sampling must be one of"):
        generate(teacher, PROMPTS, mode="ar", max_new_tokens=2, sampling="greedy")


def test_cache_rewind_forgets_tokens_and_refuses_too_many():
    model = make_model("ar")
    cache = model.allocate_cache(2, 10)
    model.forward_step(cache, torch.tensor([[1, 2, 3], [4, 5, 6]]), output="none")
    cache.rewind(torch.tensor([1, 3]))
    assert cache.lengths.tolist() == [2, 0] and cache.host_lengths.tolist() == [2, 0]
    with pytest.raises(DecodeError, match="rewind by"):
        cache.rewind(3)
    assert cache.host_lengths.tolist() == [2, 0]  # unchanged by the refused call
