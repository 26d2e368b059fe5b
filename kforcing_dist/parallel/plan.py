"""Size a job before queueing it: per-rank memory and per-step communication from the config alone.

Pure arithmetic (no process group, no GPU, no weights): :func:`make_plan` lists the parameters
every pipeline stage and tensor-parallel rank owns (the same shapes ``TransformerLM`` / ``PFLM``
allocate), applies DeepSpeed's ZeRO partitioning rules (flat groups padded to ``2 x dp`` for
ZeRO-1/2, each parameter padded to ``dp`` for ZeRO-3; fp32 master weights and two fp32 Adam
moments), adds the frozen teacher, the activations of the N(1+k) staircase sequence and the
engine buffers, and compares the total with the GPU memory. Weights and optimizer states follow
the engines exactly (a test checks them against real DeepSpeed engines); gradients, buffers and
activations are estimates whose formulas are spelled out in :data:`ASSUMPTIONS`.
"""

from __future__ import annotations

import dataclasses

from ..config.loader import ConfigError
from ..config.schema import Config, ModelConfig
from ..config.validate import Layout, derive_layout, validate
from ..nn.sizes import ffn_hidden_size, pad_vocab_size
from ..stage import Stage, parse_stage

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}

# DeepSpeed 0.19 defaults this project's engine config does not override.
ZERO12_ALIGNMENT = 2                 # stage_1_and_2: nccl_start_alignment_factor (elements), times dp
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
ZERO_REDUCE_BUCKET = 500_000_000     # zero_optimization.reduce_bucket_size (elements)
ZERO3_PREFETCH_BUCKET = 50_000_000   # stage3_prefetch_bucket_size (elements)
# CUDA context, NCCL communicators and allocator fragmentation: a fixed reserve per GPU.
RUNTIME_RESERVE_BYTES = 3 * GIB

ASSUMPTIONS = (
    "Per rank = per (pipeline stage, TP rank): TP ranks of a stage hold equal shards (the vocabulary "
    "is padded to a multiple of make_vocab_size_divisible_by x tp) and DP ranks equal ZeRO partitions.",
    "Pipeline split (DeepSpeed PipelineModule, uniform over blocks): stage 0 holds the embeddings and the "
    "noise encoder, every stage num_layers/pp blocks, the last stage the final norm and the LM head "
    "(with tied embeddings the last stage holds its own copy of the embedding, as Megatron does).",
    "Weights: model dtype (bf16 under train.precision auto on GPU). ZeRO-0/1/2 keep them whole, in one flat "
    "buffer per optimizer group padded to a multiple of 2 x dp elements; ZeRO-3 keeps ceil(n/dp) of each "
    "parameter plus whole copies of parameters under 1e5 elements (persistent), and gathers the "
    "current and the prefetched block while computing (counted under buffers).",
    "Optimizer (AdamW): an fp32 master copy and two fp32 moments of this rank's partition (ZeRO-0: all "
    "parameters, and no master copy in fp32). ZeRO-1/2/3 clone the master partition even in fp32.",
    "Gradients (estimate): ZeRO-0 whole in fp32; ZeRO-1 whole in the model dtype plus the fp32 partition "
    "the optimizer steps on; ZeRO-2/3 only the partition (model dtype) plus its fp32 copy; ZeRO-2/3 add "
    "a reduce bucket of min(5e8, n) elements (buffers).",
    "Frozen teacher (stage k1: the AR teacher; stage 2k: the stage-k student, or the AR teacher with "
    "distill.higher_stage_targets=teacher_chain): same stage/TP split, "
    "weights only, in float32 with distill.frozen_precision fp32 or parallel.pp > 1 (the frozen pipeline "
    "engine is float32), else in the training precision; a bf16 frozen model keeps its final norm and LM "
    "head (with tied embeddings: a copy of the embedding) in float32 on every rank (frozen_fp32_head), "
    "never partitioned; with distill.partition_frozen (ZeRO-3, no optimizer) a rank holds 1/dp of the "
    "rest at rest.",
    "Activations (estimate, bytes, NO activation checkpointing, no sequence parallelism; e = bytes of the "
    "model dtype, t = tp, F = MLP width, b = micro-batch, L = N + W*k packed length, S = W*k slots): per "
    "block b*L*(2e*H [q/k/v input] + 2e*H [MLP input] + 16*H [two norms computed in fp32] + 5e*H/t "
    "[q, GQA-expanded k and v, attention output and its reshaped copy] + c*e*F/t [c = 4 swiglu, 2 gelu] "
    "+ e*L [students: the staircase mask as the additive bias the masked SDPA kernels keep]) + b*L*L "
    "[students: the boolean mask, once], except that a one-stage student's last block runs on its S "
    "window rows only: b*S*(the per-block figure) + b*L*(8*H + e*H + 2e*H/t) [every row's normed input "
    "and keys/values]; within 5% of the bytes autograd saves on CPU (a test checks); "
    "the last stage adds the head on the S slots (the teacher: S = N) b*S*(e*H + (e+16)*V/t) "
    "[model-dtype logits, fp32 copies for the padding mask and the cross-entropy]; stage 0 adds the noise encoder "
    "b*S*(16*H [fp64 features] + 12*e*H). 1F1B keeps min(pp - stage, grad_accum) micro-batches in flight. "
    "With distill.context_gradients=false the context rows keep only their key/value inputs, so the "
    "figure is an upper bound.",
    "Teacher pass (forward-only, transient, counted on top): stage k1 fp32 logits b*N*V/t*4 plus the "
    "gathered full-vocabulary rows at the W window starts in fp32 and the float64 CDF (b*W*V*20); stage 2k "
    "the second self-forcing pass (L2 = N + 2*W*k) one block's working set, its mask and b*W*k*V/t*4 logits; "
    "teacher_chain: the context pass's block working set, every layer's kept input over N + W*(k-1) tokens "
    "(b*(N + W*(k-1))*H*e per block) and the k1 logits and CDF terms for the W window rows.",
    "Communication (bytes each rank sends per optimizer step, ring algorithms): DP all-reduce "
    "2(d-1)/d*n*e, reduce-scatter and all-gather (d-1)/d*n*e each; ZeRO-0/1 reduce once per step, ZeRO-2 "
    "reduce-scatters every micro-batch, ZeRO-3 also all-gathers the weights twice per micro-batch; TP: "
    "4 all-reduces of b*L*H*e per block per micro-batch for the student (2 forward, 2 backward) and 2 per "
    "block for the teacher's forward passes; PP: one activation (forward) and one gradient (backward) of "
    "b*L*H*e per micro-batch across each stage boundary, plus the teacher's forward activations.",
    f"Runtime reserve: {RUNTIME_RESERVE_BYTES // GIB} GiB per GPU for the CUDA context, NCCL and allocator "
    "fragmentation. GPU memory is given in GiB (--gpu-memory-gb 80 = 80 x 2^30 bytes).",
)


# --------------------------------------------------------------------------------------------
# Parameter inventory


@dataclasses.dataclass(frozen=True)
class ParamTensor:
    """One parameter as a TP rank holds it: name (as ``named_parameters``), local numel, where it lives."""

    name: str
    numel: int
    ndim: int
    part: str  # "embed", "noise", "layer", "head"
    layer: int = -1


def _ffn_hidden_size(cfg: ModelConfig) -> int:
    return ffn_hidden_size(cfg.hidden_size, cfg.activation, cfg.ffn_hidden_size)


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    return pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)


def parameter_inventory(cfg: ModelConfig, tp: int, noise_encoder: bool) -> list[ParamTensor]:
    """Every parameter one TP rank of ``TransformerLM`` (``PFLM`` with ``noise_encoder``) allocates,
    in ``named_parameters`` order, with its local element count."""
    H, L = cfg.hidden_size, cfg.num_layers
    V = padded_vocab(cfg, tp)
    heads, kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
    d = H // heads
    F = _ffn_hidden_size(cfg)
    out = [ParamTensor("embed_tokens.weight", V // tp * H, 2, "embed")]
    if cfg.position == "learned":
        out.append(ParamTensor("embed_positions.weight", cfg.max_seq_len * H, 2, "embed"))

    def norm(prefix, part, layer=-1):
        items = [ParamTensor(f"{prefix}.weight", H, 1, part, layer)]
        if cfg.norm == "layernorm" and cfg.norm_bias:
            items.append(ParamTensor(f"{prefix}.bias", H, 1, part, layer))
        return items

    def linear(prefix, rows, cols, bias, bias_numel, layer):
        items = [ParamTensor(f"{prefix}.weight", rows * cols, 2, "layer", layer)]
        if bias:
            items.append(ParamTensor(f"{prefix}.bias", bias_numel, 1, "layer", layer))
        return items

    for i in range(L):
        p = f"layers.{i}"
        out += norm(f"{p}.input_norm", "layer", i)
        out += linear(f"{p}.attention.q_proj", heads * d // tp, H, cfg.qkv_bias, heads * d // tp, i)
        out += linear(f"{p}.attention.k_proj", kv * d // tp, H, cfg.qkv_bias, kv * d // tp, i)
        out += linear(f"{p}.attention.v_proj", kv * d // tp, H, cfg.qkv_bias, kv * d // tp, i)
        # row-parallel: the weight is split, the bias is whole on every rank
        out += linear(f"{p}.attention.out_proj", H, heads * d // tp, cfg.attn_out_bias, H, i)
        out += norm(f"{p}.mlp_norm", "layer", i)
        if cfg.activation == "swiglu":
            out += linear(f"{p}.mlp.gate_proj", F // tp, H, cfg.mlp_bias, F // tp, i)
            out += linear(f"{p}.mlp.up_proj", F // tp, H, cfg.mlp_bias, F // tp, i)
            out += linear(f"{p}.mlp.down_proj", H, F // tp, cfg.mlp_bias, H, i)
        else:
            out += linear(f"{p}.mlp.fc1", F // tp, H, cfg.mlp_bias, F // tp, i)
            out += linear(f"{p}.mlp.fc2", H, F // tp, cfg.mlp_bias, H, i)
    out += norm("final_norm", "head")
    if not cfg.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", V // tp * H, 2, "head"))
        if cfg.lm_head_bias:
            out.append(ParamTensor("lm_head.bias", V // tp, 1, "head"))
    if noise_encoder:
        # NoiseEncoder: combined_proj 2H->H, LayerNorm(H) with bias, mlp H->4H->H (plain torch, whole)
        for name, numel, ndim in (("combined_proj.weight", 2 * H * H, 2), ("combined_proj.bias", H, 1),
                                  ("norm.weight", H, 1), ("norm.bias", H, 1),
                                  ("mlp.0.weight", 4 * H * H, 2), ("mlp.0.bias", 4 * H, 1),
                                  ("mlp.2.weight", 4 * H * H, 2), ("mlp.2.bias", H, 1)):
            out.append(ParamTensor(f"noise_encoder.{name}", numel, ndim, "noise"))
    return out


def stage_parameters(params: list[ParamTensor], cfg: ModelConfig, pp: int, stage: int) -> list[ParamTensor]:
    """The parameters pipeline stage ``stage`` of ``pp`` holds (see ASSUMPTIONS for the split)."""
    per = cfg.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    out = []
    for p in params:
        if p.part in ("embed", "noise") and first:
            out.append(p)
        elif p.part == "layer" and stage * per <= p.layer < (stage + 1) * per:
            out.append(p)
        elif p.part == "head" and last:
            out.append(p)
    if last and not first and cfg.tie_embeddings:
        out += [p for p in params if p.name == "embed_tokens.weight"]
    return out


def optimizer_groups(params: list[ParamTensor], weight_decay_noise_scale: float) -> list[list[ParamTensor]]:
    """The AdamW groups ``training.engine.param_groups`` makes: keyed by (lr scale, decay or not)."""
    buckets: dict[tuple[float, bool], list[ParamTensor]] = {}
    for p in params:
        scale = weight_decay_noise_scale if p.part == "noise" else 1.0
        buckets.setdefault((scale, p.ndim >= 2), []).append(p)
    return list(buckets.values())


# --------------------------------------------------------------------------------------------
# ZeRO arithmetic


@dataclasses.dataclass(frozen=True)
class ZeroElements:
    """Element counts one DP rank holds for one model's trainable parameters."""

    params: int           # parameters of the model on this rank (before ZeRO)
    weight_elems: int     # model-dtype weight elements allocated (flat buffers incl. padding)
    partition: int        # elements this rank's optimizer owns (master / moments / fp32 grads)
    persistent: int       # ZeRO-3: whole small parameters kept gathered


def zero_elements(groups: list[list[ParamTensor]], zero_stage: int, dp: int) -> ZeroElements:
    """DeepSpeed's partition sizes: ZeRO-1/2 pad each group's flat buffer to a multiple of 2*dp
    elements and give each rank 1/dp of it; ZeRO-3 gives each rank ceil(n/dp) of each parameter."""
    n = sum(p.numel for g in groups for p in g)
    if zero_stage == 0:
        return ZeroElements(n, n, n, 0)
    if zero_stage in (1, 2):
        align = ZERO12_ALIGNMENT * dp
        padded = [-(-sum(p.numel for p in g) // align) * align for g in groups]
        return ZeroElements(n, sum(padded), sum(x // dp for x in padded), 0)
    parts = sum(-(-p.numel // dp) for g in groups for p in g)
    persistent = sum(p.numel for g in groups for p in g if p.numel <= ZERO3_PERSISTENCE_THRESHOLD)
    return ZeroElements(n, parts + persistent, parts, persistent)


# --------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class StagePlan:
    """What one rank of a pipeline stage holds (every TP and DP rank of the stage alike)."""

    stage: int
    layers: tuple[int, int]      # [first, last) block indices
    params: int                  # trainable parameters on this rank
    frozen_params: int           # frozen teacher parameters on this rank
    memory: dict[str, int]       # bytes by item, plus "total"
    comm: dict[str, int]         # bytes sent per optimizer step by item, plus "total"
    micro_batches_in_flight: int


@dataclasses.dataclass
class Plan:
    config_source: str
    nodes: int
    gpus_per_node: int
    layout: Layout
    zero_stage: int
    precision: str
    frozen_dtype: str
    stage_name: str
    k: int
    frozen_model: str
    micro_batch_size: int
    context_len: int
    windows: int
    packed_len: int
    vocab_size: int
    padded_vocab_size: int
    total_params: int
    gpu_memory_bytes: int
    stages: list[StagePlan]
    warnings: list[str]
    assumptions: tuple[str, ...] = ASSUMPTIONS

    @property
    def peak_bytes(self) -> int:
        return max(s.memory["total"] for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layout"] = dataclasses.asdict(self.layout)
        out["assumptions"] = list(self.assumptions)
        out["peak_bytes"] = self.peak_bytes
        out["fits"] = self.fits
        return out


def resolve_vocab_size(cfg: Config) -> int:
    """model.vocab_size, else the size of the SentencePiece model prepare-data would train."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if not cfg.tokenizer.path:
        return cfg.tokenizer.vocab_size
    raise ConfigError(["model.vocab_size is 0 and tokenizer.path names an existing tokenizer whose size the "
                       "plan cannot know without loading it: set model.vocab_size to the tokenizer's size"],
                      "plan")


def activation_bytes(cfg: ModelConfig, tp: int, e: int, b: int, L: int, S: int, V_local: int,
                     blocks: int, first: bool, last: bool, noise: bool, read_rows: int = 0) -> int:
    """Bytes autograd keeps for one micro-batch on one stage (the formula in ASSUMPTIONS).

    ``noise``: a student (staircase mask, noise encoder on stage 0); the teacher is plain causal
    and needs no mask tensor. ``read_rows`` R > 0: the stage's last block runs on R rows only
    (the single-stage student's window rows), every row giving it just keys and values.
    """
    H, F = cfg.hidden_size, _ffn_hidden_size(cfg)
    c = 4 if cfg.activation == "swiglu" else 2
    mask_bias = e * L if noise else 0
    per_token = 2 * e * H + 2 * e * H + 16 * H + 5 * e * H // tp + c * e * F // tp + mask_bias
    if read_rows:
        # the last block: all of it on the read rows, plus every row's normed input (fp32 norm
        # and its output) and keys and values
        total = (blocks - 1) * b * L * per_token + b * read_rows * per_token \
            + b * L * (8 * H + e * H + 2 * e * H // tp)
    else:
        total = blocks * b * L * per_token
    total += b * L * L if noise else 0
    if last:
        total += b * S * (e * H + (e + 16) * V_local)
    if first and noise:
        total += b * S * (16 * H + 12 * e * H)
    return total


def _block_working_bytes(cfg: ModelConfig, tp: int, e: int, b: int, L: int) -> int:
    """One block's live tensors in a forward-only pass (q/k/v, attention, MLP)."""
    H, F = cfg.hidden_size, _ffn_hidden_size(cfg)
    return b * L * (6 * e * H + 5 * e * H // tp + 3 * e * F // tp + e * L)


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, stage: str = "k1",
              gpu_memory_gb: float = 80.0, frozen_dtype: str = "auto", source: str = "config") -> Plan:
    """Validate ``cfg`` for ``nodes x gpus_per_node`` ranks and size one stage's job per rank.

    ``stage``: teacher (pretraining, no frozen model) or k1/k2/... (a distillation stage, with
    the distill.* batch and sequence settings). ``frozen_dtype``: auto (as ``distill.frozen.load_frozen``
    holds the frozen models: distill.frozen_precision, float32 with a pipeline), or fp32 / bf16 to size
    another choice of the frozen body (a bf16 one with its float32 head). Raises ConfigError naming every problem.
    """
    problems = []
    if nodes < 1 or gpus_per_node < 1:
        problems.append(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must both be >= 1")
    if gpu_memory_gb <= 0:
        problems.append(f"--gpu-memory-gb {gpu_memory_gb} must be > 0")
    if frozen_dtype not in ("auto", "fp32", "bf16"):
        problems.append(f"frozen dtype {frozen_dtype!r}: use auto, fp32 or bf16")
    if problems:
        raise ConfigError(problems, "command line")
    world = nodes * gpus_per_node
    k = parse_stage(stage, cfg.distill.stages, teacher=True)
    job = Stage(cfg, k)
    scfg = job.config()
    problems = validate(scfg, world, check_files=False)
    if problems:
        raise ConfigError(problems, f"{source} (world size {world} = {nodes} nodes x {gpus_per_node} GPUs)")
    vocab = resolve_vocab_size(scfg)
    scfg.model.vocab_size = vocab
    layout = derive_layout(scfg, world)
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, scfg.parallel.zero_stage
    # plan is for GPU jobs: auto means bf16 there with ZeRO >= 1 (training.engine.resolve_precision)
    precision = scfg.train.precision
    if precision == "auto":
        precision = "bf16" if scfg.parallel.zero_stage >= 1 else "fp32"
    if frozen_dtype != "auto":
        frozen = frozen_dtype
    elif scfg.distill.frozen_precision == "fp32" or scfg.parallel.pp > 1:
        frozen = "fp32"
    else:
        frozen = precision
    e, ef = DTYPE_BYTES[precision], DTYPE_BYTES[frozen]
    warnings = []
    if scfg.train.precision == "auto" and zero == 0:
        warnings.append("train.precision auto with parallel.zero_stage 0 trains in fp32 (DeepSpeed's bf16 "
                        "path needs ZeRO >= 1); set zero_stage 1 for bf16 (same memory at dp=1)")
    if pp > 1 and zero == 0 and scfg.train.grad_clip > 0:
        warnings.append("pipeline parallelism with ZeRO-0 and gradient clipping: DeepSpeed counts the grad norm "
                        "on the first stage only; use zero_stage 1")

    V_pad = padded_vocab(scfg.model, tp)
    student = parameter_inventory(scfg.model, tp, noise_encoder=k > 0)
    frozen_inv = []
    frozen_name = "none"
    chain = job.teacher_chain
    if job.needs_ar_teacher:
        frozen_inv += parameter_inventory(scfg.model, tp, noise_encoder=False)
        frozen_name = "AR teacher"
    if job.needs_previous_student:
        frozen_inv += parameter_inventory(scfg.model, tp, noise_encoder=True)
        frozen_name = f"stage-k{k // 2} student" + (" + AR teacher" if frozen_name != "none" else "")

    b = layout.micro_batch_size
    N = scfg.train.seq_len
    if k:
        W = scfg.distill.slot_windows(k, N)
        S = W * k
    else:
        W, S = 0, N  # the teacher's loss covers every position
    L = N + (W * k if k else 0)
    accum = layout.grad_accum
    # tokens the frozen model's forward passes carry per micro-batch: k1 one pass over the context,
    # 2k two self-forcing passes over the staircase (k noise slots, then k real + k noise), or the
    # teacher chain's context pass and k-1 passes of W window tokens
    teacher_tokens = {0: 0, 1: N}.get(k, N + W * (k - 1) if chain else (N + W * k) + (N + 2 * W * k))
    total_params = sum(p.numel for p in parameter_inventory(scfg.model, 1, noise_encoder=k > 0))

    stages = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        blocks = scfg.model.num_layers // pp
        mine = stage_parameters(student, scfg.model, pp, s)
        groups = optimizer_groups(mine, scfg.distill.noise_encoder_lr_scale if k else 1.0)
        z = zero_elements(groups, zero, dp)
        frozen_mine = stage_parameters(frozen_inv, scfg.model, pp, s)
        fp32_copy = precision != "fp32"
        mem = {"weights": z.weight_elems * e}
        if zero == 0:
            mem["master_weights"] = z.params * 4 if fp32_copy else 0
            mem["optimizer_moments"] = 2 * z.params * 4
            mem["gradients"] = z.params * 4
        else:
            # DeepSpeed clones the partition even in fp32 (ZeRO-3's in-place branch compares a
            # torch.device with a str, which never matches)
            mem["master_weights"] = z.partition * 4
            mem["optimizer_moments"] = 2 * z.partition * 4
            grad_whole = z.params * e if zero == 1 else z.partition * e
            mem["gradients"] = grad_whole + (z.partition * 4 if (fp32_copy or zero == 1) else 0)
        buffers = 0
        if zero in (2, 3):
            buffers += min(ZERO_REDUCE_BUCKET, z.params) * e
        if zero == 3:
            block_params = sum(p.numel for p in mine if p.part == "layer" and p.layer == s * blocks)
            buffers += (block_params + min(ZERO3_PREFETCH_BUCKET, block_params)) * e
        mem["engine_buffers"] = buffers
        # a bf16 frozen model holds its final norm and head (tied: an embedding copy) in float32
        fp32_head = [p for p in frozen_mine if p.part == "head"
                     or (scfg.model.tie_embeddings and p.name == "embed_tokens.weight")] if frozen == "bf16" else []
        frozen_elems = sum(p.numel for p in frozen_mine if p.part != "head" or frozen != "bf16")
        if scfg.distill.partition_frozen and k:
            frozen_elems = -(-frozen_elems // dp)
        mem["frozen_model"] = frozen_elems * ef
        mem["frozen_fp32_head"] = sum(p.numel for p in fp32_head) * 4
        in_flight = min(pp - s, accum)
        mem["activations"] = in_flight * activation_bytes(
            scfg.model, tp, e, b, L, S, V_pad // tp, blocks, first, last, noise=k > 0,
            read_rows=S if k and pp == 1 else 0)
        teacher_pass = 0
        if k == 1:
            teacher_pass = _block_working_bytes(scfg.model, tp, ef, b, N)
            if last:
                teacher_pass += b * N * V_pad // tp * 4 + b * W * V_pad * 20
        elif chain:
            teacher_pass = _block_working_bytes(scfg.model, tp, ef, b, N) \
                + b * (N + W * (k - 1)) * scfg.model.hidden_size * ef * blocks
            if last:
                teacher_pass += b * W * V_pad // tp * 4 + b * W * V_pad * 20
        elif k > 1:
            L2 = N + 2 * W * k
            teacher_pass = _block_working_bytes(scfg.model, tp, ef, b, L2) + b * L2 * L2
            if last:
                teacher_pass += b * W * k * V_pad // tp * 4
        mem["teacher_pass"] = teacher_pass
        mem["runtime_reserve"] = RUNTIME_RESERVE_BYTES
        mem["total"] = sum(mem.values())

        comm = _step_comm(z.params, dp, tp, zero, accum, blocks, first, last,
                          student_row=b * L * scfg.model.hidden_size * e,
                          teacher_row=b * teacher_tokens * scfg.model.hidden_size * ef, e=e)
        stages.append(StagePlan(s, (s * blocks, (s + 1) * blocks), z.params,
                                sum(p.numel for p in frozen_mine), mem, comm, in_flight))

    return Plan(source, nodes, gpus_per_node, layout, zero, precision, frozen,
                job.name, k, frozen_name, b, N, W, L, vocab, V_pad, total_params,
                int(gpu_memory_gb * GIB), stages, warnings)


def _step_comm(n: int, dp: int, tp: int, zero: int, accum: int, blocks: int, first: bool, last: bool,
               student_row: int, teacher_row: int, e: int) -> dict[str, int]:
    """Bytes this rank sends per optimizer step (ring collectives; the formulas in ASSUMPTIONS).

    n: this rank's parameters; student_row / teacher_row: bytes of one micro-batch's hidden states
    [b, L, H] of the student's pass and of all the frozen model's passes."""
    ring = (dp - 1) / dp
    comm = {}
    if zero in (0, 1):
        comm["dp_grad_allreduce"] = int(2 * ring * n * e)
    else:
        comm["dp_grad_reduce_scatter"] = int(ring * n * e * accum)
    if zero in (1, 2):
        comm["dp_param_allgather"] = int(ring * n * e)
    elif zero == 3:
        comm["dp_param_allgather"] = int(2 * ring * n * e * accum)
    tp_ring = 2 * (tp - 1) / tp
    comm["tp_allreduce"] = int(tp_ring * blocks * accum * 4 * student_row)
    comm["tp_allreduce_teacher"] = int(tp_ring * blocks * accum * 2 * teacher_row)
    boundaries = int(not first) + int(not last)
    comm["pp_p2p"] = boundaries * accum * student_row
    comm["pp_p2p_teacher"] = int(not last) * accum * teacher_row  # forward only: sent downstream
    comm["total"] = sum(comm.values())
    return comm


# --------------------------------------------------------------------------------------------
# Text output


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    lay = plan.layout
    lines = [
        f"plan for {plan.config_source}: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = world {lay.world_size}"
        f" -> tp {lay.tp} x pp {lay.pp} x dp {lay.dp}, ZeRO-{plan.zero_stage}, {plan.precision}"
        f" (frozen model {plan.frozen_dtype})",
        f"job: {plan.stage_name}; {plan.total_params / 1e9:.3f}B trainable parameters; frozen: {plan.frozen_model};"
        f" vocab {plan.vocab_size} (padded {plan.padded_vocab_size})",
        f"batch: micro {lay.micro_batch_size} x grad_accum {lay.grad_accum} x dp {lay.dp} = global "
        f"{lay.global_batch_size}; context N={plan.context_len}"
        + (f", W={plan.windows} windows x k={plan.k} slots -> packed length N+W*k={plan.packed_len}"
           if plan.k else ""),
        "",
        "memory per rank, GiB (one column per pipeline stage; its TP and DP ranks hold the same):",
    ]
    width = 14
    header = f"{'':<24}" + "".join(f"{f'stage {s.stage}':>{width}}" for s in plan.stages)
    blocks = f"{'blocks':<24}" + "".join(f"{f'{s.layers[0]}-{s.layers[1] - 1}':>{width}}" for s in plan.stages)
    lines += [header, blocks]
    for key in plan.stages[0].memory:
        lines.append(f"{key:<24}" + "".join(f"{_gib(s.memory[key]):>{width}}" for s in plan.stages))
    lines += ["", "communication per optimizer step, GiB each rank sends:", header]
    for key in plan.stages[0].comm:
        lines.append(f"{key:<24}" + "".join(f"{_gib(s.comm[key]):>{width}}" for s in plan.stages))
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines += ["", f"verdict: {verdict}: peak {_gib(plan.peak_bytes)} GiB of {_gib(plan.gpu_memory_bytes)} GiB "
                  f"per GPU (activations without activation checkpointing)"]
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    lines += ["", "assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)

