"""Pipeline parallelism (DeepSpeed PipelineModule + megatron-core TP layers) equals one process.

The AR teacher trains 3 ZeRO-1 steps (2 micro-batches each, clipping active) at PP=2 and
TP=2 x PP=2; losses, gradient norms and parameters are compared with a plain one-process
engine built from the same seed. The PP=2 run also saves a checkpoint, resumes it in a fresh
engine and must continue bit for bit, and its export must equal the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed.launcher import run_distributed

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 97
OVERRIDES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=32",
             f"model.vocab_size={VOCAB}", "model.activation=swiglu", "model.norm=rmsnorm",
             f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL_BATCH}", "train.max_steps=10",
             "train.warmup_steps=2", "train.lr=1e-2", "train.grad_clip=0.05", "train.weight_decay=0.1",
             "parallel.zero_stage=1"]
# fp32: parallel layouts sum in another order; ~1e-4 is the fp32 noise (engines-on-cpu.md)
PARAM_TOL = 1e-4


def _setup(tp, pp, micro):
    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel
    from kforcing_dist.parallel.launch import resolve_launch

    cfg, _ = load_config(None, OVERRIDES + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                            f"train.micro_batch_size={micro}"])
    info = resolve_launch()
    device = init_distributed(info, "gloo")
    groups = init_model_parallel(tp, pp, device)
    return cfg, derive_layout(cfg, info.world_size), groups


def _teacher_batches():
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def _micro_parts(batch, layout, groups):
    micro, dp = layout.micro_batch_size, layout.dp
    return [batch[(m * dp + groups.dp_rank) * micro:][:micro] for m in range(layout.grad_accum)]


def _teacher_worker(rank, world, tp, pp, workdir):
    import torch.distributed as dist

    from kforcing_dist.model.loss import lm_loss
    from kforcing_dist.model.pipeline import build_pipeline_model, plain_state_dict
    from kforcing_dist.model.transformer import TransformerLM, pad_vocab_size
    from kforcing_dist.parallel.groups import shutdown
    from kforcing_dist.training.engine import build_engine
    from kforcing_dist.training.export import export_decoder

    cfg, layout, groups = _setup(tp, pp, GLOBAL_BATCH // 2 // (world // (tp * pp)))
    assert layout.grad_accum == 2
    padded = pad_vocab_size(VOCAB, 64, tp)

    def loss_fn(logits, labels):
        return lm_loss(logits, labels, groups.tp_group)

    def build(seed):
        torch.manual_seed(seed)
        if pp == 1:
            return TransformerLM(cfg.model, padded, groups.tp_group)
        return build_pipeline_model(cfg.model, padded, groups, loss_fn=loss_fn)

    def step(engine, batch):
        parts = _micro_parts(batch, layout, groups)
        if pp > 1:
            loss = float(engine.train_batch(iter([(p[:, :-1], p[:, 1:]) for p in parts])))
        else:
            loss = 0.0
            for p in parts:
                out = lm_loss(engine(p[:, :-1]), p[:, 1:], groups.tp_group)
                engine.backward(out)
                engine.step()
                loss += out.item() / layout.grad_accum
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t, group=groups.dp_group)
        return t.item() / layout.dp, float(engine.get_global_grad_norm())

    engine = build_engine(build(0), cfg, layout, groups, "fp32")
    out = {"initial": {k: v.numpy().copy() for k, v in plain_state_dict(engine.module, groups).items()}}
    batches = _teacher_batches()
    losses, norms = [], []
    for i, batch in enumerate(batches):
        if i == STEPS - 1 and pp > 1:
            engine.save_checkpoint(str(workdir / "ckpt"), tag="engine", save_latest=False)
        loss, norm = step(engine, batch)
        losses.append(loss)
        norms.append(norm)
    out.update(losses=losses, norms=norms)
    out["params"] = {k: v.numpy().copy() for k, v in plain_state_dict(engine.module, groups).items()}
    folder = workdir / f"export-tp{tp}-pp{pp}"
    export_decoder(engine.module, groups, folder, kind="ar", model_cfg=cfg.model, padded_vocab_size=padded,
                   zero_stage=1)
    out["export"] = str(folder)
    if pp > 1:
        # resume in a fresh engine (other initial weights): the last step must repeat exactly
        fresh = build_engine(build(99), cfg, layout, groups, "fp32")
        path, _ = fresh.load_checkpoint(str(workdir / "ckpt"), tag="engine")
        assert path is not None
        out["resumed"] = step(fresh, batches[-1])
        out["resumed_params"] = {k: v.numpy().copy() for k, v in plain_state_dict(fresh.module, groups).items()}
    shutdown()
    return out if rank == 0 else None


def _compare(result, ref):
    np.testing.assert_allclose(result["losses"], ref["losses"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(result["norms"], ref["norms"], rtol=1e-4, atol=1e-6)
    assert result["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        np.testing.assert_allclose(result["params"][name], value, rtol=0, atol=PARAM_TOL, err_msg=name)


@pytest.fixture(scope="module")
def teacher_ref(tmp_path_factory):
    return run_distributed(_teacher_worker, 1, 1, 1, tmp_path_factory.mktemp("ref"))[0]


def test_teacher_reference_trains_with_clipping(teacher_ref):
    assert teacher_ref["losses"][-1] < teacher_ref["losses"][0]
    assert min(teacher_ref["norms"]) > 0.05  # clipping at 0.05 is active at every step


def test_teacher_pp2_matches_one_process_and_resumes(teacher_ref, tmp_path):
    from safetensors.torch import load_file

    res = run_distributed(_teacher_worker, 2, 1, 2, tmp_path)[0]
    # same seed, same full initial weights at PP=2
    for name, value in teacher_ref["initial"].items():
        np.testing.assert_array_equal(res["initial"][name], value, err_msg=name)
    _compare(res, teacher_ref)
    # resumed in a fresh engine from the step-2 checkpoint: the same last step, exactly
    assert res["resumed"] == (res["losses"][-1], res["norms"][-1])
    for name, value in res["params"].items():
        np.testing.assert_array_equal(res["resumed_params"][name], value, err_msg=name)
    # the checkpoint follows the shared layer-file convention (converter)
    names = sorted(p.name for p in (tmp_path / "ckpt" / "engine").glob("layer_*"))
    assert names == [f"layer_{i:02d}-model_00-model_states.pt" for i in range(4)]
    layer1 = torch.load(tmp_path / "ckpt" / "engine" / "layer_01-model_00-model_states.pt", weights_only=True)
    assert "attention.q_proj.weight" in layer1 and "mlp.down_proj.weight" in layer1
    # the export holds the plain model's weights under its names
    ours, ref = load_file(f"{res['export']}/model.safetensors"), load_file(f"{teacher_ref['export']}/model.safetensors")
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=PARAM_TOL)


def test_teacher_tp2_pp2_matches_one_process(teacher_ref, tmp_path):
    _compare(run_distributed(_teacher_worker, 4, 2, 2, tmp_path)[0], teacher_ref)
