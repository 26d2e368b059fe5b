"""`convert reshard` across a data-parallel change under ZeRO carries the optimizer (DeepSpeed universal
checkpoint): the first steps resumed at the new DP size equal the uninterrupted run's.

A run trains at its DP size, saving after step 2, and goes on to step 4 (the uninterrupted reference).
Another job, at the other DP size, reshards the step-2 checkpoint, resumes from it through the real
trainer and takes steps 3 and 4 on the same global batches (every layout reads the same sequences in
the same global order). Loss, clipped gradient norm and all parameters after each step must agree to
float32 reduction-order noise; with the Adam moments reset instead, step 3's parameters are off by
~1e-2 (lr 1e-2).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.ckpt_factory import BASE, SEQ, VOCAB
from tests.distributed.launcher import run_distributed
from tests.distributed.trainer_harness import real_trainer

GLOBAL_BATCH, MICRO = 4, 2  # DP=2: one micro-batch per rank per step; DP=1: two accumulated
SAVE_AT, LAST = 2, 4
TOL = 1e-6


def _global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))


def _run(rank, world, zero, out, source=None, tp=1, precision="fp32"):
    """Train to step LAST (saving at SAVE_AT); with ``source``: reshard it into ``out`` first, resume there."""
    import resource
    import time

    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.convert.reshard import reshard
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch
    from kforcing_dist.training.export import full_weights
    from kforcing_dist.training.task import LMTask

    cfg, text = load_config(None, BASE + [f"parallel.zero_stage={zero}", f"train.micro_batch_size={MICRO}",
                                          f"train.global_batch_size={GLOBAL_BATCH}", f"train.precision={precision}",
                                          f"parallel.tp={tp}",
                                          f"output_dir={out}"])
    groups = init_model_parallel(tp, 1, init_distributed(resolve_launch(), "gloo"))
    layout = derive_layout(cfg, world)
    padded = pad_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, tp)
    info = {}
    if source is not None:
        t0 = time.perf_counter()
        _, how, reason = reshard(source, cfg, text, groups, layout)
        info = {"how": how, "reason": reason, "seconds": time.perf_counter() - t0,
                "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch.manual_seed(0)
    trainer = real_trainer(cfg, text, groups, layout, TransformerLM(cfg.model, padded, groups.tp_group),
                           LMTask(groups.tp_group), _global_batch, out, padded)
    if source is not None:
        assert trainer.resume() is not None and trainer.step == SAVE_AT
    steps = {}
    while trainer.step < LAST:
        loss = trainer.train_step(trainer.next_batches())["loss"]
        steps[trainer.step] = {"loss": loss,
                               "grad_norm": float(trainer.engine.get_global_grad_norm()),
                               "lr": trainer.engine.get_lr()[0],
                               "params": {k: v.numpy().copy() for k, v in
                                          full_weights(trainer.engine.module, groups, zero).items()}}
        if trainer.step == SAVE_AT:
            trainer.save()
    trainer.close()
    shutdown()
    return {"steps": steps, **info} if rank == 0 else None


def _checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step-{SAVE_AT:08d}"


def _compare(resumed: dict, reference: dict) -> float:
    """Largest parameter difference over the resumed steps; asserts loss, grad norm, LR and parameters."""
    worst = 0.0
    assert sorted(resumed["steps"]) == [SAVE_AT + 1, LAST]
    for step, got in resumed["steps"].items():
        want = reference["steps"][step]
        assert abs(got["loss"] - want["loss"]) < TOL, (step, got["loss"], want["loss"])
        assert abs(got["grad_norm"] - want["grad_norm"]) < TOL * max(1.0, want["grad_norm"]), step
        assert got["lr"] == want["lr"], step
        assert got["params"].keys() == want["params"].keys()
        for name, value in want["params"].items():
            diff = float(np.abs(got["params"][name] - value).max())
            assert diff < TOL, (step, name, diff)
            worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """ZeRO-2 uninterrupted runs at DP=2 and DP=1 (each also the other's resharding source)."""
    root = tmp_path_factory.mktemp("zero2")
    return {dp: (root / f"dp{dp}", run_distributed(_run, dp, 2, str(root / f"dp{dp}"))[0]) for dp in (2, 1)}


@pytest.mark.parametrize("src_dp,dst_dp", [(2, 1), (1, 2)])
def test_zero2_reshard_to_another_dp_resumes_exactly(sources, tmp_path, src_dp, dst_dp):
    src_dir, reference = sources[src_dp]
    out = tmp_path / f"dp{dst_dp}"
    resumed = run_distributed(_run, dst_dp, 2, str(out), str(_checkpoint(src_dir)))[0]
    assert resumed["how"] == "universal" and resumed["reason"] is None
    worst = _compare(resumed, reference)
    meta = json.loads((_checkpoint(out) / "metadata.json").read_text())
    assert meta["layout"]["dp"] == dst_dp and meta["optimizer_carried"] == "universal"
    assert "optimizer_reset" not in meta and not (out / ".reshard-universal").exists()
    print(f"ZeRO-2 DP {src_dp}->{dst_dp}: reshard {resumed['seconds']:.2f} s, peak {resumed['maxrss_mib']:.0f} MiB, "
          f"largest parameter difference {worst:.2e}")


# ZeRO-1 runs DeepSpeed's ZeRO-2 code (stage_1_and_2.py) and passed the same way; ZeRO-3 has its own
# universal loader, with the two slips reshard repairs (group hyperparameters, a shared Adam step)
@pytest.mark.parametrize("zero", [3])
def test_zero3_reshard_dp2_to_dp1_resumes_exactly(tmp_path, zero):
    src = tmp_path / "dp2"
    reference = run_distributed(_run, 2, zero, str(src))[0]
    resumed = run_distributed(_run, 1, zero, str(tmp_path / "dp1"), str(_checkpoint(src)))[0]
    assert resumed["how"] == "universal"
    worst = _compare(resumed, reference)
    print(f"ZeRO-{zero} DP 2->1: reshard {resumed['seconds']:.2f} s, peak {resumed['maxrss_mib']:.0f} MiB, "
          f"largest parameter difference {worst:.2e}")
