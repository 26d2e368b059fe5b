"""The frequency penalty's resolution (number, {k: value} map, None -> the authors' values) and
the per-slot block rule against a one-sequence, one-slot-at-a-time loop."""

from __future__ import annotations

import pytest
import torch

from kforcing_dist.decode import DecodeError
from kforcing_dist.decode.penalty import (AUTHORS_DEFAULT, AUTHORS_PER_K, block_argmax,
                                          penalty_for_k, penalty_for_mode)


def test_penalty_for_k_resolves_numbers_maps_and_the_authors_values():
    assert [penalty_for_k(None, k) for k in (1, 2, 3, 4, 8)] == \
        [AUTHORS_DEFAULT, AUTHORS_PER_K[2], AUTHORS_PER_K[3], AUTHORS_PER_K[4], AUTHORS_DEFAULT]
    assert AUTHORS_PER_K == {2: 0.3, 3: 0.5, 4: 0.5} and AUTHORS_DEFAULT == 0.5
    assert penalty_for_k(0, 4) == 0.0 and penalty_for_k(1.5, 2) == 1.5
    setting = {2: 0.1, "4": 0.2, "k8": 0.4}
    assert [penalty_for_k(setting, k) for k in (2, 4, 8)] == [0.1, 0.2, 0.4]
    assert penalty_for_k(setting, 3) == AUTHORS_PER_K[3]  # a k the map leaves out
    for bad in (-1, float("nan"), float("inf"), "0.3", True, {2: -0.5}):
        with pytest.raises(DecodeError, match="must be a finite number >= 0"):
            penalty_for_k(bad, 2)


def test_penalty_for_mode_leaves_the_ar_teacher_alone_unless_given_a_number():
    assert penalty_for_mode(None, "ar", 1) == 0.0
    assert penalty_for_mode({1: 0.7, 2: 0.3}, "ar", 1) == 0.0
    assert penalty_for_mode(0.7, "ar", 1) == 0.7
    assert penalty_for_mode({2: 0.2}, "pflm", 2) == 0.2
    assert penalty_for_mode(None, "lossless", 2) == AUTHORS_PER_K[2]


def test_block_argmax_counts_each_slot_before_the_next():
    gen = torch.Generator().manual_seed(0)
    b, m, V, penalty = 5, 4, 7, 0.8
    logits = torch.randn(b, m, V, generator=gen)
    logits[:, :, 3] += 2.0  # token 3 would win most slots; repeats are penalised
    counts = torch.randint(0, 3, (b, V), generator=gen).float()
    want_counts = counts.clone()
    want = []
    for row in range(b):  # the rule, one sequence and one slot at a time
        tokens = []
        for j in range(m):
            t = int((logits[row, j] - penalty * want_counts[row]).argmax())
            tokens.append(t)
            want_counts[row, t] += 1
        want.append(tokens)
    got = block_argmax(logits, counts, penalty)
    assert got.tolist() == want and torch.equal(counts, want_counts)
    assert got.tolist() != logits.argmax(-1).tolist()  # the penalty changed some slot
    # no penalty: plain argmax, counts untouched
    before = counts.clone()
    assert torch.equal(block_argmax(logits, counts, 0.0), logits.argmax(-1))
    assert torch.equal(counts, before)
