"""Pipeline parallelism (DeepSpeed PipelineModule + megatron-core TP layers) equals one process.

Every run goes through the real trainer (``LMTrainer.train_step``: its micro-batch split, pipeline
step and data-parallel averaging). The AR teacher trains 3 ZeRO-1 steps (2 micro-batches each,
clipping active) at PP=2 and TP=2 x PP=2; losses, gradient norms and parameters are compared with
a plain one-process run built from the same seed. The PP=2 run also saves a checkpoint, resumes
it in a fresh trainer and must continue bit for bit, and its export must equal the reference's.
Distillation stages k=1 (targets from the frozen AR teacher, forward-only on the same stages)
and k=2 (self-forcing double pass, tokens sent back from the last stage to the first) train
the same way through DistillTask, at PP=2 and TP=2 x PP=2, against one process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.distributed.trainer_harness import real_trainer

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 97
OVERRIDES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=32",
             f"model.vocab_size={VOCAB}", "model.activation=swiglu", "model.norm=rmsnorm",
             f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL_BATCH}", "train.max_steps=10",
             "train.warmup_steps=2", "train.lr=1e-2", "train.grad_clip=0.05", "train.weight_decay=0.1",
             "parallel.zero_stage=1"]
# two draws per start: the pipeline builds stage-1 targets from distinct starts too (task._distinct_starts)
DISTILL = ["distill.max_window_slots=8", "distill.noise_draws_per_start=2", "distill.tau_min=0.7",
           "distill.tau_max=1.3", "distill.seed=5"]
# fp32: parallel layouts sum in another order; ~1e-4 is the fp32 noise (engines-on-cpu.md)
PARAM_TOL = 1e-4


def _setup(tp, pp, micro, extra=()):
    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel
    from kforcing_dist.parallel.launch import resolve_launch

    cfg, text = load_config(None, OVERRIDES + list(extra) + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                             f"train.micro_batch_size={micro}"])
    info = resolve_launch()
    device = init_distributed(info, "gloo")
    groups = init_model_parallel(tp, pp, device)
    return cfg, text, derive_layout(cfg, info.world_size), groups


def _teacher_batches():
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def _worker(rank, world, tp, pp, workdir, runs):
    """One launch per layout: every run of ``runs`` (teacher, k1, k2) in the same process group."""
    from kforcing_dist.parallel.groups import shutdown

    cfg, text, layout, groups = _setup(tp, pp, GLOBAL_BATCH // 2 // (world // (tp * pp)), DISTILL)
    assert layout.grad_accum == 2
    out = {}
    if "teacher" in runs:
        out["teacher"] = _teacher_run(cfg, text, layout, groups, workdir)
    for k in (1, 2):
        if f"k{k}" in runs:
            out[f"k{k}"] = _distill_run(cfg, text, layout, groups, k, workdir)
    shutdown()
    return out


def _teacher_run(cfg, text, layout, groups, workdir):
    from kforcing_dist.model.pipeline import build_model, plain_state_dict
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.training.export import export_decoder
    from kforcing_dist.training.task import LMTask

    tp, pp = layout.tp, layout.pp
    padded = pad_vocab_size(VOCAB, 64, tp)
    batches = _teacher_batches()
    run = workdir / "teacher"

    def trainer(seed):
        torch.manual_seed(seed)
        return real_trainer(cfg, text, groups, layout, build_model(cfg.model, padded, groups, pp),
                            LMTask(groups.tp_group), batches.__getitem__, run, padded)

    def step(t):
        loss = t.train_step(t.next_batches())["loss"]
        return loss, float(t.engine.get_global_grad_norm())

    t = trainer(0)
    out = {"initial": {k: v.numpy().copy() for k, v in plain_state_dict(t.engine.module, groups).items()}}
    losses, norms = [], []
    while t.step < STEPS:
        if t.step == STEPS - 1 and pp > 1:
            t.save()
        loss, norm = step(t)
        losses.append(loss)
        norms.append(norm)
    out.update(losses=losses, norms=norms)
    out["params"] = {k: v.numpy().copy() for k, v in plain_state_dict(t.engine.module, groups).items()}
    folder = workdir / f"export-tp{tp}-pp{pp}"
    export_decoder(t.engine.module, groups, folder, kind="ar", model_cfg=cfg.model, padded_vocab_size=padded,
                   zero_stage=1)
    out["export"] = str(folder)
    t.close()
    if pp > 1:
        # the trainer's resume in a fresh trainer (other initial weights): the last step must repeat exactly
        fresh = trainer(99)
        assert fresh.resume() is not None and fresh.step == STEPS - 1
        out["resumed"] = step(fresh)
        out["resumed_params"] = {k: v.numpy().copy() for k, v in plain_state_dict(fresh.engine.module, groups).items()}
        fresh.close()
    return out if groups.world_rank == 0 else None


def _compare(result, ref):
    np.testing.assert_allclose(result["losses"], ref["losses"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(result["norms"], ref["norms"], rtol=1e-4, atol=1e-6)
    assert result["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        np.testing.assert_allclose(result["params"][name], value, rtol=0, atol=PARAM_TOL, err_msg=name)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return run_distributed(_worker, 1, 1, 1, tmp_path_factory.mktemp("ref"), ("teacher", "k1", "k2"))


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pp2")
    return run_distributed(_worker, 2, 1, 2, workdir, ("teacher", "k1", "k2")), workdir


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory):
    return run_distributed(_worker, 4, 2, 2, tmp_path_factory.mktemp("tp2pp2"), ("teacher", "k2"))


def test_reference_is_a_real_check(ref):
    teacher = ref[0]["teacher"]
    assert teacher["losses"][-1] < teacher["losses"][0]
    for run in ("teacher", "k1", "k2"):
        assert min(ref[0][run]["norms"]) > 0.05, run  # clipping at 0.05 is active at every step
    # the k=2 student starts as the k=1 student, whose first pass made slot 1's targets with the
    # same noise: slot 1 is exactly right at the first step (targets made with the right u)
    assert ref[0]["k2"]["records"][0]["acc_slot1"] == 1.0


def test_teacher_pp2_matches_one_process_and_resumes(ref, pp2):
    from safetensors.torch import load_file

    teacher_ref = ref[0]["teacher"]
    results, tmp_path = pp2
    res = results[0]["teacher"]
    # same seed, same full initial weights at PP=2
    for name, value in teacher_ref["initial"].items():
        np.testing.assert_array_equal(res["initial"][name], value, err_msg=name)
    _compare(res, teacher_ref)
    # resumed by a fresh trainer from its step-2 checkpoint: the same last step, exactly
    assert res["resumed"] == (res["losses"][-1], res["norms"][-1])
    for name, value in res["params"].items():
        np.testing.assert_array_equal(res["resumed_params"][name], value, err_msg=name)
    # the checkpoint follows the shared layer-file convention (converter)
    engine_dir = tmp_path / "teacher" / "checkpoints" / f"step-{STEPS - 1:08d}" / "engine"
    names = sorted(p.name for p in engine_dir.glob("layer_*"))
    assert names == [f"layer_{i:02d}-model_00-model_states.pt" for i in range(4)]
    layer1 = torch.load(engine_dir / "layer_01-model_00-model_states.pt", weights_only=True)
    assert "attention.q_proj.weight" in layer1 and "mlp.down_proj.weight" in layer1
    # the export holds the plain model's weights under its names
    ours, ref = load_file(f"{res['export']}/model.safetensors"), load_file(f"{teacher_ref['export']}/model.safetensors")
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=PARAM_TOL)


def test_teacher_tp2_pp2_matches_one_process(ref, tp2_pp2):
    _compare(tp2_pp2[0]["teacher"], ref[0]["teacher"])


# ------------------------------------------------------------------------------ distillation


def _frozen_weights():
    """Full weights of the AR teacher and of a stage-1 student (every process makes the same)."""
    import torch.distributed as dist

    from kforcing_dist.config import load_config
    from kforcing_dist.model.state import full_state_dict
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.model.transformer import TransformerLM

    cfg, _ = load_config(None, OVERRIDES)
    own = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    torch.manual_seed(7)
    teacher = TransformerLM(cfg.model, 128, own)
    with torch.no_grad():
        # sharp, strong attention: targets depend on the context, and the self-forcing second
        # pass on the first pass's tokens (a lost token broadcast changes ~40% of them)
        for layer in teacher.layers:
            layer.attention.q_proj.weight.mul_(8.0)
            layer.attention.k_proj.weight.mul_(8.0)
            layer.attention.v_proj.weight.mul_(10.0)
            layer.attention.out_proj.weight.mul_(10.0)
    torch.manual_seed(8)
    k1 = PFLM(cfg.model, 128, own, max_k=1)
    k1.init_from_teacher(teacher, own)
    return full_state_dict(teacher, own), full_state_dict(k1, own)


def _distill_run(cfg, text, layout, groups, k, workdir):
    from kforcing_dist.distill.task import DistillTask
    from kforcing_dist.model.pipeline import (PipelineForward, build_pipeline_model, load_plain_state_dict,
                                              plain_state_dict)
    from kforcing_dist.model.state import load_full_state_dict
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.training.engine import build_frozen_pipeline_engine

    pp = layout.pp
    teacher_w, k1_w = _frozen_weights()
    student_w = dict(teacher_w)
    student_w.update({n: v for n, v in k1_w.items() if n.startswith("noise_encoder.")})
    if k == 2:
        student_w = k1_w

    def frozen(weights, max_k):
        if pp == 1:
            model = PFLM(cfg.model, 128, groups.tp_group, max_k=max_k) if max_k else \
                TransformerLM(cfg.model, 128, groups.tp_group)
            load_full_state_dict(model, weights, groups.tp_group)
            return model.eval().requires_grad_(False)
        pipe = build_pipeline_model(cfg.model, 128, groups, max_k=max_k)
        load_plain_state_dict(pipe, weights, groups)
        return PipelineForward(build_frozen_pipeline_engine(pipe, layout))

    if k == 1:
        task = DistillTask(1, cfg.distill, groups, ar_teacher=frozen(teacher_w, 0))
    else:
        task = DistillTask(2, cfg.distill, groups, prev_student=frozen(k1_w, 1))
    if pp == 1:
        student = PFLM(cfg.model, 128, groups.tp_group, max_k=k)
        load_full_state_dict(student, student_w, groups.tp_group)
    else:
        student = build_pipeline_model(cfg.model, 128, groups, max_k=k)
        load_plain_state_dict(student, student_w, groups)
    gen = torch.Generator().manual_seed(321)
    batches = [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]
    t = real_trainer(cfg, text, groups, layout, student, task, batches.__getitem__, workdir / f"k{k}", 128)
    losses, norms, records = [], [], []
    while t.step < STEPS:
        # the step's loss and metrics, averaged over micro-batches and data-parallel ranks (a pipeline's
        # metrics exist on its last stage; the other stages have the loss alone)
        metrics = t.train_step(t.next_batches())
        losses.append(metrics["loss"])
        norms.append(float(t.engine.get_global_grad_norm()))
        records.append(metrics)
    params = {k_: v.numpy().copy() for k_, v in plain_state_dict(t.engine.module, groups).items()}
    t.close()
    last_stage = groups.pp_rank == groups.pp_size - 1
    if groups.world_rank == 0 or (last_stage and groups.tp_rank == 0 and groups.dp_rank == 0):
        return {"losses": losses, "norms": norms, "params": params, "records": records if last_stage else None}
    return None


def _compare_distill(results, ref, run):
    _compare(results[0][run], ref[0][run])
    logged = next(r[run] for r in results if r[run] is not None and r[run]["records"] is not None)["records"]
    for got, want in zip(logged, ref[0][run]["records"]):  # per-slot accuracy etc. on the last stage
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.parametrize("run", ["k1", "k2"])
def test_distill_pp2_matches_one_process(ref, pp2, run):
    _compare_distill(pp2[0], ref, run)


def test_distill_k2_tp2_pp2_matches_one_process(ref, tp2_pp2):
    _compare_distill(tp2_pp2, ref, "k2")
