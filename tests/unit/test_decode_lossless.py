"""Lossless mode: the PFLM drafts, the AR teacher verifies each block in one pass; the output
must equal the teacher's own sequential inverse-CDF sample for the same noise, token for token."""

from __future__ import annotations

import pytest
import torch

from kforcing_dist.decode import DecodeError, generate, generate_lossless, noise_table
from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
from tests.unit.test_decode_generate import PROMPTS, V, biased, make_model

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


@pytest.mark.parametrize("cuda_graphs", [False, True])  # True on a CPU: the static-shape steps
def test_lossless_output_ignores_the_frequency_penalty(cuda_graphs):
    # the student drafts 7 (bias 3) unless penalised; the teacher emits 7 about 60% of the time
    teacher = biased(make_model("ar", seed=1, std=0.3, lm_head_bias=True), 7, 5.0)
    student = biased(make_model("pflm", seed=2, std=0.3, lm_head_bias=True), 7, 3.0)
    kw = dict(k=4, max_new_tokens=13, tau=1.0, seed=3, cuda_graphs=cuda_graphs)
    ref = teacher_reference(teacher, PROMPTS, 13, 1.0, 3, "vocab")
    runs = {p: generate_lossless(student, teacher, PROMPTS, frequency_penalty=p, **kw)
            for p in (0.0, 0.5, 20.0)}
    for res in runs.values():
        assert res.tokens == ref
    # a penalty that stops the student drafting 7 after its first use costs acceptance
    assert runs[20.0].acceptance_length < runs[0.0].acceptance_length


def test_lossless_draft_counts_kept_tokens_and_earlier_slots():
    # The teacher always emits 9; the student drafts 9 (bias 10) unless penalised (20 per count).
    # Round 1: counts are zero, so slot 1 drafts 9 and slot 2 (9 counted once: 10 - 20) does
    # not: 1 accepted + the teacher's token. Every later round: the two kept 9s are counted, slot
    # 1 drafts another token: the teacher's token only. 12 tokens = 2 + 10 x 1: 11 passes.
    # (Not counting within the block: 5 + 7 x 1, 8 passes; not counting kept tokens: 6 x 2.)
    teacher = biased(make_model("ar", seed=1, lm_head_bias=True), 9, 60.0)
    student = biased(make_model("pflm", seed=2, std=0.3, lm_head_bias=True), 9, 10.0)
    plain = generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=12, seed=0)
    assert plain.steps == 3  # unpenalised, every draft is accepted
    res = generate_lossless(student, teacher, PROMPTS, k=4, max_new_tokens=12, seed=0,
                            frequency_penalty=20.0)
    assert res.tokens == [[9] * 12] * len(PROMPTS)
    assert res.steps == 11 and res.acceptance_length == pytest.approx(12 / 11)


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
    with pytest.raises(DecodeError, match="frequency_penalty must be a finite number >= 0"):
        generate_lossless(student, teacher, PROMPTS, k=2, max_new_tokens=4, frequency_penalty=-1)
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
