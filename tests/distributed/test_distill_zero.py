"""A distillation stage (k=2, self-forcing) under ZeRO-1, 2 and 3 at DP=2, and at TP=2, matches one process.

Every run goes through the real trainer (``LMTrainer.train_step``). The one-process reference runs
the same global batches as 4 accumulated micro-batches (DP=2: 2 each); the noise of each
micro-batch is keyed by its global index, so both layouts draw identical noise.
Losses, the clipped gradient norm and the final student parameters are compared; one case also
partitions the frozen teacher and previous student with ZeRO-3 (``distill.partition_frozen``).
"""

import numpy as np
import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.distributed.trainer_harness import real_trainer

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 12
VOCAB = 97
OVERRIDES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=64",
             f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL_BATCH}",
             "train.max_steps=10", "train.warmup_steps=2", "train.lr=1e-2", "train.grad_clip=0.5",
             "train.weight_decay=0.1", "distill.max_window_slots=8", "distill.tau_min=0.7",
             "distill.noise_inversion_weight=0.5", "distill.noise_encoder_lr_scale=3"]


def _train(rank, world, out, zero, partition_frozen=False, tp=1, context_gradients=True, overrides=()):
    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.distill.frozen import freeze
    from kforcing_dist.distill.task import DistillTask
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch
    from kforcing_dist.training.export import full_weights

    dp = world // tp
    cfg, text = load_config(None, OVERRIDES + [f"parallel.zero_stage={zero}", f"parallel.tp={tp}",
                                               "train.micro_batch_size=1",
                                               f"distill.context_gradients={context_gradients}",
                                               *overrides])
    device = init_distributed(resolve_launch(), "gloo")
    groups = init_model_parallel(tp, 1, device)
    layout = derive_layout(cfg, world)
    assert layout.grad_accum == GLOBAL_BATCH // dp
    padded = pad_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, tp)
    torch.manual_seed(0)
    teacher = TransformerLM(cfg.model, padded, groups.tp_group)
    torch.manual_seed(1)
    prev = PFLM(cfg.model, padded, groups.tp_group, max_k=1, noise_init_std=0.3)
    prev.init_from_teacher(teacher, groups.tp_group)
    student = PFLM.from_student(prev, max_k=2)
    teacher = freeze(teacher, groups, "fp32", partition_frozen)
    prev = freeze(prev, groups, "fp32", partition_frozen)
    if partition_frozen:  # each rank holds half of the frozen weights at rest
        held = sum(p.ds_tensor.numel() for p in teacher.parameters())
        assert 0 < held <= sum(p.ds_numel for p in teacher.parameters()) // 2 + 64
    task = DistillTask(2, cfg.distill, groups, ar_teacher=teacher, prev_student=prev)
    gen = torch.Generator().manual_seed(123)
    batches = [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 2), generator=gen) for _ in range(STEPS)]
    trainer = real_trainer(cfg, text, groups, layout, student, task, batches.__getitem__, out, padded)
    losses, norms = [], []
    while trainer.step < STEPS:
        losses.append(trainer.train_step(trainer.next_batches())["loss"])  # averaged over the DP ranks
        norms.append(float(trainer.engine.get_global_grad_norm()))
    engine = trainer.engine
    params = {k: v.numpy().copy() for k, v in full_weights(engine.module, groups, zero).items()}
    trainer.close()
    shutdown()
    return {"losses": losses, "norms": norms, "params": params if rank == 0 else None}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_distributed(_train, 1, tmp_path_factory.mktemp("ref"), 0)[0]


def test_reference_actually_trains(reference):
    # meaningful only if the student moves and clipping (0.5) is active
    assert np.isfinite(reference["losses"]).all()
    assert max(reference["norms"]) > 0.5
    assert any(np.abs(v).max() > 0 for k, v in reference["params"].items() if "noise_encoder" in k)


@pytest.mark.parametrize("zero,partition_frozen,tp", [(1, False, 1), (2, False, 1), (3, False, 1), (3, True, 1),
                                                      (1, False, 2)])
def test_distill_stage_zero_dp2_matches_one_process(reference, zero, partition_frozen, tp, tmp_path):
    """DP=2 under each ZeRO stage, and TP=2 (vocab-parallel targets, losses and metrics)."""
    result = run_distributed(_train, 2, tmp_path, zero, partition_frozen, tp)[0]
    tol = 2e-5
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=0, atol=tol)
    np.testing.assert_allclose(result["norms"], reference["norms"], rtol=1e-4, atol=tol)
    assert result["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        np.testing.assert_allclose(result["params"][name], value, rtol=0, atol=tol, err_msg=name)


def test_training_without_context_gradients_under_zero3_and_tp2_matches_one_process(tmp_path):
    """``distill.context_gradients=false`` calls every layer twice per forward (the context pass
    without autograd, then the windows): ZeRO-3 gathers the partitioned weights for both, and TP=2
    reduces the window rows' gradients as one process computes them. Without the noise-inversion
    loss (so the distillation loss's own forward is the only one) the option changes training:
    other weights than the default's."""
    no_inversion = ["distill.noise_inversion_weight=0"]
    plain = [run_distributed(_train, 1, tmp_path / f"plain{flag}", 0, False, 1, flag, no_inversion)[0]
             for flag in (True, False)]
    assert max(np.abs(v - plain[0]["params"][k]).max() for k, v in plain[1]["params"].items()) > 1e-3
    detached = run_distributed(_train, 1, tmp_path / "ref", 0, False, 1, False)[0]
    for zero, tp in ((3, 1), (1, 2)):
        result = run_distributed(_train, 2, tmp_path / f"z{zero}tp{tp}", zero, False, tp, False)[0]
        np.testing.assert_allclose(result["losses"], detached["losses"], rtol=0, atol=2e-5)
        for name, value in detached["params"].items():
            np.testing.assert_allclose(result["params"][name], value, rtol=0, atol=2e-5, err_msg=name)
