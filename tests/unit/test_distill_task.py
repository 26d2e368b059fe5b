"""The distillation stage task: targets per stage, the noise-inversion mix, resumable noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kforcing_dist.config.schema import DistillConfig
from kforcing_dist.distill.task import DistillTask
from tests.unit.test_distill_core import VOCAB, build_student, build_teacher, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, b=2, n=12):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(groups):
    cfg = small_cfg()
    teacher = build_teacher(groups, cfg)
    k1 = build_student(groups, cfg, 1, teacher=teacher)
    k2 = build_student(groups, cfg, 2, seed=1, teacher=teacher)
    return teacher, k1, k2


def test_same_step_same_noise_other_step_other_noise(groups, models):
    teacher, k1, _ = models
    task = DistillTask(1, DistillConfig(max_window_slots=4), groups, ar_teacher=teacher)
    x = batch()
    a, ma = task.train_loss(k1, x, step=3, micro=0)
    b, mb = task.train_loss(k1, x, step=3, micro=0)
    c, _ = task.train_loss(k1, x, step=4, micro=0)
    assert a.item() == b.item() and ma == mb  # a resumed run redraws exactly this noise
    assert a.item() != c.item()
    assert set(ma) >= {"acc", "block_match", "acc_slot1", "loss_slot1"} and "loss" not in ma


def test_stage2_uses_the_previous_student_and_reports_every_slot(groups, models):
    teacher, k1, k2 = models
    task = DistillTask(2, DistillConfig(), groups, prev_student=k1)
    loss, metrics = task.train_loss(k2, batch(), step=0, micro=0)
    assert torch.isfinite(loss) and {"acc_slot1", "acc_slot2", "loss_slot2"} <= set(metrics)
    with pytest.raises(ValueError, match="stage-1 student"):
        DistillTask(2, DistillConfig(), groups, prev_student=k2)
    with pytest.raises(ValueError, match="AR teacher"):
        DistillTask(1, DistillConfig(), groups)


def test_noise_inversion_mix_adds_weighted_loss(groups, models):
    teacher, k1, _ = models
    base = DistillConfig(max_window_slots=4)
    plain = DistillTask(1, base, groups, ar_teacher=teacher)
    mixed = DistillTask(1, dataclasses.replace(base, noise_inversion_weight=0.5), groups, ar_teacher=teacher)
    x = batch(n=14)
    l0, _ = plain.train_loss(k1, x, step=0, micro=0)
    l1, m1 = mixed.train_loss(k1, x, step=0, micro=0)
    # same noise for the distillation part, plus half the inversion loss on top
    assert m1["distill_loss"] == pytest.approx(l0.item(), rel=1e-6)
    assert l1.item() == pytest.approx(l0.item() + 0.5 * m1["inv_loss"], rel=1e-6)
    assert {"inv_acc_slot1", "inv_block_match"} <= set(m1)


@pytest.mark.parametrize("k", [2, 4])
def test_teacher_chain_stage_trains_on_the_teachers_chain(groups, models, k):
    from kforcing_dist.distill.losses import slot_metrics
    from kforcing_dist.distill.targets import teacher_chain_targets
    from kforcing_dist.model.student import PFLM

    teacher, k1, k2 = models
    student = k2 if k == 2 else PFLM.from_student(k2).eval()
    chain = DistillConfig(max_window_slots=4 * k, higher_stage_targets="teacher_chain")
    with pytest.raises(ValueError, match="AR teacher"):
        DistillTask(k, chain, groups, prev_student=k1)
    task = DistillTask(k, chain, groups, ar_teacher=teacher)  # no previous student needed
    x = batch(n=10)
    starts, u, tau = task._draw_slots(x, task._generator(2, 0))
    targets = teacher_chain_targets(teacher, x, starts, u, tau, chain.cdf_order, groups)
    with torch.no_grad():
        want, _ = slot_metrics(student(x, starts, u, tau), targets, groups)
    loss, metrics = task.train_loss(student, x, step=2, micro=0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and f"acc_slot{k}" in metrics
    loss.backward()  # gradients reach the student through the chain's targets
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    student.zero_grad()
    if k == 2:  # the default, self-forcing from the stage-1 student, trains on other targets
        forced = DistillTask(2, DistillConfig(max_window_slots=8), groups, prev_student=k1)
        assert forced.train_loss(student, x, step=2, micro=0)[0].item() != pytest.approx(want.item(), rel=1e-6)


def test_window_slots_per_token_scales_the_slot_budget_with_the_context(groups, models):
    """distill.window_slots_per_token: round(ratio x N) slots, W = min(N, slots // k) windows, in
    place of distill.max_window_slots; the task draws that many windows."""

    rel = DistillConfig(max_window_slots=4, window_slots_per_token=0.5)
    assert [rel.windows_per_sequence(k, 16) for k in (1, 2, 4)] == [8, 4, 2]
    assert [rel.windows_per_sequence(k, 64) for k in (1, 2, 4)] == [32, 16, 8]
    assert dataclasses.replace(rel, window_slots_per_token=2.0).windows_per_sequence(1, 16) == 16  # <= N
    assert dataclasses.replace(rel, window_slots_per_token=0.0).windows_per_sequence(2, 64) == 2  # absolute
    assert DistillConfig().windows_per_sequence(2, 64) == 0  # every start
    teacher, k1, _ = models
    task = DistillTask(1, rel, groups, ar_teacher=teacher)
    x = batch()
    starts, u, _ = task._draw_slots(x, task._generator(0, 0))
    assert starts.shape == (x.shape[0], rel.windows_per_sequence(1, x.shape[1])) and u.shape[2] == 1


@pytest.mark.parametrize("k", [1, 2])
def test_noise_draws_per_start_gives_each_start_several_independent_windows(groups, models, k):
    """distill.noise_draws_per_start = R: every drawn start appears R times in a row, each copy a
    window with its own u, and each window trains exactly as it would alone (windows sharing a
    start do not see each other; its target is G at that start under its own u)."""
    from kforcing_dist.distill.losses import slot_metrics
    from kforcing_dist.distill.targets import self_forcing_targets, stage1_targets

    teacher, k1, k2 = models
    student = k1 if k == 1 else k2
    dcfg = DistillConfig(max_window_slots=3 * k, noise_draws_per_start=2)
    assert dcfg.slot_windows(k, 12) == 6 and DistillConfig(noise_draws_per_start=3).slot_windows(k, 12) == 36
    task = DistillTask(k, dcfg, groups, **({"ar_teacher": teacher} if k == 1 else {"prev_student": k1}))
    x = batch()
    starts, u, tau = task._draw_slots(x, task._generator(1, 0))
    assert starts.shape == (2, 6) and u.shape == (2, 6, k)
    assert torch.equal(starts[:, 0::2], starts[:, 1::2]) and (starts[:, 2::2] > starts[:, 0:-2:2]).all()
    assert not torch.equal(u[:, 0::2], u[:, 1::2])  # the copies draw their own noise

    def targets_of(s, uu):
        if k == 1:
            return stage1_targets(teacher, x, s, uu, tau, "vocab", groups)
        return self_forcing_targets(k1, x, s, uu, tau, groups)

    targets = targets_of(starts, u)
    with torch.no_grad():
        logits = student(x, starts, u, tau)
        for w in range(6):  # each window alone: the same targets and the same student logits
            one = starts[:, w:w + 1], u[:, w:w + 1]
            assert torch.equal(targets[:, w:w + 1], targets_of(*one))
            torch.testing.assert_close(logits[:, w:w + 1], student(x, *one, tau), rtol=1e-5, atol=1e-5)
        want, _ = slot_metrics(logits, targets, groups)
    loss, _ = task.train_loss(student, x, step=1, micro=0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
