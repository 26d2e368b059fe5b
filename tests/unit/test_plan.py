"""`kforcing-dist plan`: the parameter inventory against real models, the shipped large configs,
the layout checks and the verdict, and the CLI (text, JSON, exit codes)."""

import json
from pathlib import Path

import pytest

from kforcing_dist.cli import main
from kforcing_dist.config import ConfigError, load_config
from kforcing_dist.config.schema import ModelConfig
from kforcing_dist.parallel.plan import DTYPE_BYTES, GIB, make_plan, parameter_inventory, stage_parameters

ROOT = Path(__file__).resolve().parents[2]
LLAMA_1B = ROOT / "configs" / "llama-1b.yaml"
LLAMA_7B = ROOT / "configs" / "llama-7b.yaml"
STAGES = ("teacher", "k1", "k2", "k4")

VARIANTS = {
    "llama": dict(norm="rmsnorm", activation="swiglu", mlp_bias=False, num_kv_heads=2),
    "gpt": dict(norm="layernorm", norm_bias=True, activation="gelu_tanh", qkv_bias=True,
                attn_out_bias=True, position="learned", lm_head_bias=True),
    "tied": dict(tie_embeddings=True, ffn_hidden_size=96),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("student", [False, True])
def test_inventory_matches_the_real_model(groups, one_thread, name, student):
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size

    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32,
                      **VARIANTS[name])
    padded = pad_vocab_size(97, cfg.make_vocab_size_divisible_by, 1)
    model = PFLM(cfg, padded, groups.tp_group, max_k=2) if student else \
        TransformerLM(cfg, padded, groups.tp_group)
    real = [(n, p.numel(), p.ndim) for n, p in model.named_parameters()]
    planned = [(p.name, p.numel, p.ndim) for p in parameter_inventory(cfg, 1, noise_encoder=student)]
    assert planned == real


def test_pipeline_split_covers_every_parameter_once():
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=6, num_heads=4)
    params = parameter_inventory(cfg, 2, noise_encoder=True)
    split = [stage_parameters(params, cfg, 3, s) for s in range(3)]
    assert sorted(p.name for s in split for p in s) == sorted(p.name for p in params)
    assert [p.name for p in split[0] if p.part == "layer"][0].startswith("layers.0.")
    assert {p.layer for p in split[2] if p.part == "layer"} == {4, 5}
    assert any(p.name == "lm_head.weight" for p in split[2])
    assert all(p.part != "noise" for s in split[1:] for p in s)


@pytest.mark.parametrize("path,nodes", [(LLAMA_1B, 1), (LLAMA_7B, 1), (LLAMA_7B, 2)])
def test_shipped_large_configs_fit_80gb_gpus(path, nodes):
    cfg, _ = load_config(str(path))
    for stage in STAGES:
        plan = make_plan(cfg, nodes, 8, stage, gpu_memory_gb=80, source=str(path))
        assert plan.fits, (stage, plan.peak_bytes / GIB)
        assert not plan.warnings
        s0 = plan.stages[0].memory
        # ZeRO-1 over dp ranks: the fp32 master and the moments shrink with dp, the weights do not
        assert s0["optimizer_moments"] == pytest.approx(2 * s0["master_weights"], rel=1e-6)
        assert s0["weights"] > 0 and s0["activations"] > 0
        if stage != "teacher":
            assert s0["frozen_model"] > 0 and plan.packed_len == 2048


def test_7b_sizes_are_plausible_and_pipeline_stages_differ():
    cfg, _ = load_config(str(LLAMA_7B))
    plan = make_plan(cfg, 2, 8, "teacher")
    assert 6.5e9 < plan.total_params < 7e9
    first, last = plan.stages
    # the ranks' shares add up to the model, plus the norms every TP rank keeps whole
    tp, m = plan.layout.tp, cfg.model
    shares = sum(s.params for s in plan.stages) * tp
    assert shares == plan.total_params + (tp - 1) * (2 * m.num_layers + 1) * m.hidden_size
    assert first.memory["weights"] == pytest.approx(2 * first.params, abs=2 * 4 * plan.layout.dp)  # bf16
    # 1F1B: the first stage holds pp micro-batches of activations, the last one
    assert (first.micro_batches_in_flight, last.micro_batches_in_flight) == (2, 1)
    assert first.comm["pp_p2p"] > 0 and first.comm["tp_allreduce"] > 0 and first.comm["dp_grad_allreduce"] > 0


def test_7b_on_one_gpu_does_not_fit_and_zero3_shards_weights():
    cfg, _ = load_config(str(LLAMA_7B), ["parallel.tp=1", "parallel.pp=1"])
    assert not make_plan(cfg, 1, 1, "k1").fits
    cfg3, _ = load_config(str(LLAMA_7B), ["parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=3"])
    one, eight = make_plan(cfg3, 1, 1, "teacher"), make_plan(cfg3, 1, 8, "teacher")
    assert eight.stages[0].memory["weights"] < one.stages[0].memory["weights"] / 7
    assert eight.stages[0].memory["optimizer_moments"] < one.stages[0].memory["optimizer_moments"] / 7


def test_layout_problems_are_reported_together():
    cfg, _ = load_config(str(LLAMA_7B), ["parallel.zero_stage=2"])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, 1, 6, "k1")
    text = str(err.value)
    assert "does not divide it" in text and "zero_stage=2 with parallel.pp=2" in text
    with pytest.raises(ConfigError, match="--stage 'k3'"):
        make_plan(cfg, 1, 8, "k3")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        make_plan(load_config(str(LLAMA_1B), ["tokenizer.path=/nonexistent/tok"])[0], 1, 8, "k1")


def test_bf16_without_zero_is_refused_and_auto_falls_back_to_fp32():
    cfg, _ = load_config(str(LLAMA_1B), ["parallel.zero_stage=0", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="parallel.zero_stage >= 1"):
        make_plan(cfg, 1, 8, "k1")
    cfg, _ = load_config(str(LLAMA_1B), ["parallel.zero_stage=0", "train.precision=auto"])
    plan = make_plan(cfg, 1, 8, "k1")
    assert any("zero_stage 0 trains in fp32" in w for w in plan.warnings)
    assert plan.precision == "fp32"


def test_partitioned_frozen_teacher_is_divided_over_dp():
    cfg, _ = load_config(str(LLAMA_1B), [])
    whole = make_plan(cfg, 1, 8, "k1").stages[0].memory["frozen_model"]
    cfg, _ = load_config(str(LLAMA_1B), ["distill.partition_frozen=true"])
    part = make_plan(cfg, 1, 8, "k1").stages[0].memory["frozen_model"]
    assert part == pytest.approx(whole / 8, rel=1e-3)


def test_teacher_chain_stage_holds_the_ar_teacher_and_its_kept_inputs():
    cfg, _ = load_config(str(LLAMA_1B), [])
    forced = make_plan(cfg, 1, 8, "k4")
    cfg, _ = load_config(str(LLAMA_1B), ["distill.higher_stage_targets=teacher_chain"])
    chain = make_plan(cfg, 1, 8, "k4")
    assert forced.frozen_model == "stage-k2 student" and chain.frozen_model == "AR teacher"
    assert chain.stages[0].memory["frozen_model"] < forced.stages[0].memory["frozen_model"]  # no noise encoder
    # every layer keeps its input over the context and the W tokens of 3 chained passes
    layers = cfg.model.num_layers
    cfg.model.num_layers = 2 * layers
    deeper = make_plan(cfg, 1, 8, "k4")
    kept = chain.micro_batch_size * (chain.context_len + 3 * chain.windows) * cfg.model.hidden_size \
        * DTYPE_BYTES[chain.frozen_dtype]
    extra = deeper.stages[0].memory["teacher_pass"] - chain.stages[0].memory["teacher_pass"]
    assert extra == layers * kept


def test_noise_draws_per_start_lengthens_the_planned_sequence():
    cfg, _ = load_config(str(LLAMA_1B), [])
    one = make_plan(cfg, 1, 8, "k2")
    cfg, _ = load_config(str(LLAMA_1B), ["distill.noise_draws_per_start=3"])
    three = make_plan(cfg, 1, 8, "k2")
    assert three.windows == 3 * one.windows and three.packed_len == three.context_len + 3 * one.windows * 2
    assert three.stages[0].memory["activations"] > one.stages[0].memory["activations"]


def test_cli_text_json_and_exit_codes(capsys):
    assert main(["plan", "-c", str(LLAMA_7B), "--nodes", "2", "--gpus-per-node", "8", "--stage", "k4"]) == 0
    text = capsys.readouterr().out
    assert "verdict: FITS" in text and "optimizer_moments" in text and "tp_allreduce" in text
    assert main(["plan", "-c", str(LLAMA_7B), "--nodes", "2", "--gpus-per-node", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["layout"]["dp"] == 2 and len(data["stages"]) == 2
    assert data["stages"][0]["memory"]["total"] == data["peak_bytes"]
    assert main(["plan", "-c", str(LLAMA_7B), "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-memory-gb", "16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "-c", str(LLAMA_7B), "--nodes", "1", "--gpus-per-node", "3"]) == 2
    assert "tp x pp x dp must equal the world size 3" in capsys.readouterr().err


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    import torch

    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_activation_estimate_matches_saved_tensors(groups, one_thread, activation):
    import torch

    from kforcing_dist.distill.losses import slot_metrics
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.model.transformer import lm_loss
    from kforcing_dist.parallel.plan import activation_bytes

    cfg = ModelConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, max_seq_len=512,
                      norm="rmsnorm", activation=activation, mlp_bias=False)
    torch.manual_seed(0)
    model = PFLM(cfg, 1024, groups.tp_group, max_k=2, params_dtype=torch.bfloat16)
    b, N, W, k = 2, 128, 64, 2
    ids = torch.randint(0, 1000, (b, N + 1))
    starts = torch.arange(0, N, N // W).expand(b, W)
    u = torch.rand(b, W, k, dtype=torch.float64)
    targets = torch.randint(0, 1000, (b, W, k))

    student = _saved_bytes(lambda: slot_metrics(model(ids[:, :N], starts, u, 1.0), targets, groups.tp_group))
    planned = activation_bytes(cfg, 1, 2, b, N + W * k, W * k, 1024, 2, True, True, noise=True, read_rows=W * k)
    assert planned == pytest.approx(student, rel=0.05)

    teacher = _saved_bytes(lambda: lm_loss(model(ids[:, :N]), ids[:, 1:], groups.tp_group))
    planned = activation_bytes(cfg, 1, 2, b, N, N, 1024, 2, True, True, noise=False)
    assert planned == pytest.approx(teacher, rel=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_precision_costs(tied):
    """fp32 (the default): every frozen weight at 4 bytes; auto under bf16: 2 bytes, plus the final
    norm and head (tied: a copy of the embedding) in float32 on every rank, never partitioned."""
    extra = ["model.tie_embeddings=true"] if tied else []
    V, H = 32000, 2048  # llama-1b: its vocabulary (a multiple of 64 already) and hidden size
    head_elems = V * H + H  # the head (or the embedding copy) and the final norm's weight
    cfg, _ = load_config(str(LLAMA_1B), extra)
    fp32 = make_plan(cfg, 1, 8, "k1")
    assert fp32.frozen_dtype == "fp32" and fp32.stages[0].memory["frozen_fp32_head"] == 0
    cfg, _ = load_config(str(LLAMA_1B), extra + ["distill.frozen_precision=auto"])
    auto = make_plan(cfg, 1, 8, "k1")
    assert auto.frozen_dtype == "bf16"
    assert auto.padded_vocab_size == V and auto.stages[0].frozen_params == fp32.stages[0].frozen_params
    n = auto.stages[0].frozen_params
    assert auto.stages[0].memory["frozen_fp32_head"] == head_elems * 4
    assert fp32.stages[0].memory["frozen_model"] == n * 4
    body = n - (H if tied else head_elems)  # tied: the embedding stays in the bf16 body, the norm moves
    assert auto.stages[0].memory["frozen_model"] == body * 2
    cfg, _ = load_config(str(LLAMA_1B), extra + ["distill.frozen_precision=auto", "distill.partition_frozen=true"])
    part = make_plan(cfg, 1, 8, "k1").stages[0].memory
    assert part["frozen_fp32_head"] == head_elems * 4
    assert part["frozen_model"] == pytest.approx(body * 2 / 8, rel=1e-3)


def test_pipeline_frozen_model_is_float32():
    """The frozen pipeline engine runs in float32 whatever distill.frozen_precision says."""
    cfg, _ = load_config(str(LLAMA_7B), ["distill.frozen_precision=auto"])
    plan = make_plan(cfg, 1, 8, "k1")
    assert plan.layout.pp > 1 and plan.precision == "bf16" and plan.frozen_dtype == "fp32"
    for stage in plan.stages:
        assert stage.memory["frozen_model"] == stage.frozen_params * 4
        assert stage.memory["frozen_fp32_head"] == 0
