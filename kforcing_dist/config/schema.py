"""The configuration schema: one dataclass per section, each field with a one-line doc.

The docs (``doc=``) are the single source of the config reference, docs/config.md
(``python -m kforcing_dist.config.reference``). Defaults describe the small demo teacher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union


def doc_field(default: Any, doc: str, choices: tuple | None = None):
    """A dataclass field carrying its one-line doc and, optionally, its allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def field_choices(section: type, name: str) -> tuple:
    """The allowed values the schema declares for field ``name`` of the dataclass ``section``.

    Validators read them here, so adding a choice is one edit to its ``doc_field``.
    """
    for f in dataclasses.fields(section):
        if f.name == name and f.metadata.get("choices"):
            return tuple(f.metadata["choices"])
    raise KeyError(f"{section.__name__}.{name} declares no choices")


@dataclass
class ModelConfig:
    vocab_size: int = doc_field(0, "Vocabulary size before padding; 0 takes it from the tokenizer.")
    make_vocab_size_divisible_by: int = doc_field(
        64, "Pad the vocabulary to a multiple of this times parallel.tp (padded logits are masked).")
    hidden_size: int = doc_field(256, "Width of the residual stream (H).")
    num_layers: int = doc_field(4, "Number of Transformer blocks.")
    num_heads: int = doc_field(4, "Attention heads; must divide hidden_size and be divisible by parallel.tp.")
    num_kv_heads: int = doc_field(0, "Key/value heads (grouped-query attention); 0 means num_heads.")
    ffn_hidden_size: int = doc_field(
        0, "MLP inner width; 0 means 4*H for gelu_tanh and 8H/3 rounded up to 64 for swiglu.")
    max_seq_len: int = doc_field(256, "Longest sequence (positions) the model supports.")
    norm: str = doc_field("layernorm", "Normalisation layer.", ("layernorm", "rmsnorm"))
    norm_bias: bool = doc_field(False, "Give LayerNorm a bias (ignored for rmsnorm).")
    norm_eps: float = doc_field(1e-5, "Epsilon of every norm.")
    activation: str = doc_field("gelu_tanh", "MLP type: GELU (tanh approx.) or SwiGLU.", ("gelu_tanh", "swiglu"))
    mlp_bias: bool = doc_field(True, "Biases in the MLP linears.")
    qkv_bias: bool = doc_field(False, "Bias in the fused q/k/v projection.")
    attn_out_bias: bool = doc_field(False, "Bias in the attention output projection.")
    position: str = doc_field("rope", "Position encoding: rotary (rotate-half layout) or learned absolute.",
                              ("rope", "learned"))
    rope_base: float = doc_field(10000.0, "Rotary base (theta).")
    tie_embeddings: bool = doc_field(False, "Share the input embedding with the LM head.")
    lm_head_bias: bool = doc_field(False, "Bias on the LM head (untied heads only).")
    init_std: float = doc_field(0.02, "Std of the normal weight initialisation.")
    attention_backend: str = doc_field(
        "auto", "auto: fused SDPA kernels on GPU, torch SDPA on CPU; math: the plain reference path.",
        ("auto", "sdpa", "math"))


# the ModelConfig fields whose values the schema restricts (validators loop over them)
MODEL_CHOICE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("choices"))


@dataclass
class TokenizerConfig:
    kind: str = doc_field("sentencepiece", "Tokenizer family.", ("sentencepiece", "hf"))
    path: str = doc_field(
        "", "Existing tokenizer: a SentencePiece .model file or a local Hugging Face tokenizer "
            "folder; empty trains a SentencePiece model on the corpus.")
    vocab_size: int = doc_field(4096, "Vocabulary size when training a SentencePiece model.")
    model_type: str = doc_field("unigram", "SentencePiece algorithm when training.", ("unigram", "bpe"))
    train_max_bytes: int = doc_field(20_000_000, "At most this much corpus text is used to train SentencePiece.")


@dataclass
class DataConfig:
    source: str = doc_field(
        "builtin", "builtin: docstring corpus built on this machine; files: data.paths; hf: data.hf_name or "
                   "data.hf_path.",
        ("builtin", "files", "hf"))
    paths: list[str] = doc_field([], "Local .txt / .jsonl / .parquet files (source: files).")
    text_field: str = doc_field("text", "Field holding the text in .jsonl / .parquet / hf records.")
    txt_documents: str = doc_field(
        "blank_line", "How a .txt file splits into documents: blank_line: paragraphs separated by blank lines "
                      "(a file without one is one document); line: one document per line (the datasets "
                      "text convention).", ("blank_line", "line"))
    hf_name: str = doc_field("", "Hugging Face datasets name, e.g. lm1b or openwebtext (source: hf; read from "
                                 "the hub, or from the local datasets cache with hf_streaming: false).")
    hf_config: str = doc_field("", "Optional Hugging Face dataset configuration name.")
    hf_split: str = doc_field("train", "Split of the Hugging Face dataset to read (of a DatasetDict for hf_path).")
    hf_streaming: bool = doc_field(
        True, "source: hf with hf_name: true streams from the hub while reading; false loads the dataset "
              "through the local datasets cache (downloaded once; works offline with HF_DATASETS_OFFLINE=1 "
              "once cached).")
    hf_path: str = doc_field("", "source: hf from a local folder written by datasets' save_to_disk (read with "
                                 "load_from_disk, no network), instead of hf_name.")
    max_documents: int = doc_field(0, "Read at most this many documents (0: all).")
    builtin_min_bytes: int = doc_field(6_000_000, "The built-in corpus gathers at least this much text.")
    shards_dir: str = doc_field("", "Where prepare-data writes token shards and training reads them; "
                                    "empty: <output_dir>/data.")
    valid_fraction: float = doc_field(0.01, "Fraction of documents held out for validation.")
    shard_tokens: int = doc_field(4_000_000, "Tokens per shard file.")
    num_workers: int = doc_field(2, "Tokeniser processes in prepare-data.")
    seed: int = doc_field(1234, "Seed of the train/valid split and of the sampler.")


@dataclass
class ParallelConfig:
    tp: int = doc_field(1, "Tensor-parallel size (megatron-core layers).")
    pp: int = doc_field(1, "Pipeline-parallel size.")
    zero_stage: int = doc_field(0, "DeepSpeed ZeRO stage (0-3); 2 and 3 need pp = 1.", (0, 1, 2, 3))
    backend: str = doc_field("auto", "Collective backend: auto picks nccl with CUDA, gloo without.",
                             ("auto", "nccl", "gloo"))
    timeout_minutes: int = doc_field(30, "Collective timeout.")


@dataclass
class TrainConfig:
    seq_len: int = doc_field(256, "Tokens per training sequence (<= model.max_seq_len).")
    micro_batch_size: int = doc_field(8, "Sequences per data-parallel rank per forward pass.")
    global_batch_size: int = doc_field(
        0, "Sequences per optimizer step over all ranks; 0 means micro_batch_size * dp "
           "(= micro * grad_accum * dp).")
    max_steps: int = doc_field(1000, "Optimizer steps to train.")
    lr: float = doc_field(1e-3, "Peak learning rate.")
    min_lr: float = doc_field(1e-4, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = doc_field(100, "Linear warmup steps.")
    weight_decay: float = doc_field(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: float = doc_field(0.9, "AdamW beta1.")
    beta2: float = doc_field(0.95, "AdamW beta2.")
    adam_eps: float = doc_field(1e-8, "AdamW epsilon.")
    grad_clip: float = doc_field(1.0, "Clip the global gradient norm to this (0: off).")
    precision: str = doc_field("auto", "auto: bf16 on a GPU that supports it when parallel.zero_stage >= 1, "
                                       "else fp32; bf16 needs ZeRO >= 1.",
                               ("auto", "fp32", "bf16"))
    seed: int = doc_field(42, "Seed of the weight initialisation.")
    eval_interval: int = doc_field(200, "Run validation every this many steps (0: only at the end).")
    eval_batches: int = doc_field(20, "Micro-batches per validation.")
    log_interval: int = doc_field(10, "Log scalars every this many steps.")
    time_budget_minutes: float = doc_field(0.0, "Save and stop cleanly after this much wall time (0: no limit).")
    init_from: str = doc_field(
        "", "A new teacher run starts from these weights: an 'ar' decoder folder (convert from-hf / "
            "from-kforcing / consolidate) whose architecture equals model.*; ignored once the run has a checkpoint.")


@dataclass
class CheckpointConfig:
    save_interval: int = doc_field(500, "Save every this many steps (and always at the end).")
    keep_last: int = doc_field(2, "Keep the newest this many complete checkpoints.")
    resume: str = doc_field("auto", "auto: resume from the newest complete checkpoint in output_dir; "
                                    "never: refuse to start when one exists.", ("auto", "never"))
    resume_fallback: bool = doc_field(
        False, "When the newest complete checkpoint cannot be read (a damaged file), resume from the previous "
               "complete one with a warning and mark the damaged one DAMAGED; false: stop with an error naming "
               "the damaged file.")


@dataclass
class LoggingConfig:
    tensorboard: bool = doc_field(True, "Write TensorBoard event files to <output_dir>/tensorboard.")
    progress_bar: bool = doc_field(True, "Show a progress bar with tokens/s and ETA on rank 0.")


# distill.higher_stage_targets: where the targets of stages k >= 2 come from
HIGHER_STAGE_TARGETS = ("self_forcing", "teacher_chain")


@dataclass
class DistillConfig:
    stages: list[int] = doc_field([1, 2, 4], "Progressive stages (k per stage): 1 from the AR teacher, each next "
                                        "doubling k, initialised from the previous stage.")
    cdf_order: str = doc_field("vocab", "Vocabulary order of the inverse-CDF map G(x, u).", ("vocab", "sorted"))
    higher_stage_targets: str = doc_field(
        "self_forcing", "Targets of stages k >= 2: the frozen previous student run twice, or the AR teacher "
                        "chained k times with the same noise (its exact joint sample).", HIGHER_STAGE_TARGETS)
    teacher_min_p: float = doc_field(
        0.0, "Distil the teacher's min-p truncated distribution: tokens below this fraction of the most likely "
             "token's probability (at the sequence's tau) get probability 0, so G(x, u) never emits the tail. "
             "Recorded in the student's export; evaluate, lossless decoding and the teacher's samples use the "
             "same truncation. 0: the exact teacher.")
    tau_min: float = doc_field(1.0, "Lowest temperature sampled per training sequence.")
    tau_max: float = doc_field(1.0, "Highest temperature sampled per training sequence.")
    max_window_slots: int = doc_field(
        0, "At most this many noise slots per sequence (W windows x k slots, W = min(N, this // k) random "
           "window starts): bounds the N(1+k) length; 0: all N windows.")
    window_slots_per_token: float = doc_field(
        0.0, "When > 0, the slot budget is this many noise slots per context token (round(this x N), in place "
             "of distill.max_window_slots), so one value keeps the targets per context token at every context "
             "length; W = min(N, budget // k). Opt-in: more slots per step cost longer sequences.")
    noise_draws_per_start: int = doc_field(
        1, "Windows per drawn window start, each with its own noise u: the stage trains on R x W windows of k "
           "slots (W from the slot budget above) over one context pass and one target distribution per start. "
           "Above 1 a step supervises R times the slots for a longer sequence (N + R W k positions), which "
           "is how stage k1 can pass one target per context token. Opt-in: more targets per second, but on "
           "the demo no better students at equal wall time (docs/recipe.md).")
    context_gradients: bool = doc_field(
        True, "Backpropagate the slots' loss through the context's hidden states. false: the context runs "
              "without autograd and only the window rows (and the key/value projections of the context rows) "
              "carry gradients: the same forward for a cheaper backward (a demo step 0.84-0.91x at N = 256), but much "
              "worse students on the demo even at equal wall time (docs/recipe.md). Needs parallel.pp: 1.")
    noise_inversion_weight: float = doc_field(
        0.0, "Weight of the noise-inversion loss on real data (u drawn inside the teacher's CDF interval of "
             "the data token); 0 turns it off.")
    noise_features: str = doc_field(
        "rising", "Noise-feature convention of the student's noise encoder. released: the paper's code (frequencies "
                  "10000^(-j/(H/2)) falling from 1 to ~1e-4, cos then sin, exact GELU in the noise MLP); rising: "
                  "frequencies rising from 1 to distill.noise_max_freq, tanh GELU. A stage k > 1 takes the "
                  "convention of the student it starts from (set this only to assert it).", ("rising", "released"))
    noise_max_freq: float = doc_field(256.0, "Highest frequency of rising noise features (lowest is 1); unused by "
                                             "released features.")
    noise_encoder_lr_scale: float = doc_field(
        1.0, "Learning-rate multiplier of the noise encoder (new weights) relative to the copied backbone.")
    max_steps: int = doc_field(300, "Optimizer steps per stage (unless distill.stage_steps says otherwise).")
    stage_steps: list[int] = doc_field([], "Optimizer steps of each stage, in distill.stages order; "
                                           "empty: distill.max_steps for every stage.")
    lr: float = doc_field(5e-4, "Peak learning rate of a stage.")
    min_lr: float = doc_field(5e-5, "Final learning rate of a stage.")
    warmup_steps: int = doc_field(30, "Warmup steps of a stage.")
    micro_batch_size: int = doc_field(0, "Sequences per rank per pass in a stage; 0: train.micro_batch_size.")
    seq_len: int = doc_field(0, "Context tokens per distillation sequence; 0: train.seq_len.")
    eval_interval: int = doc_field(0, "Validate every this many steps (0: only at the end).")
    teacher: str = doc_field("", "The AR teacher the stages distil and the report measures against: its run "
                                 "folder (its export/ is read) or a decoder folder; empty: <output_dir>/teacher/export "
                                 "(the pipeline's layout).")
    init_from_student: str = doc_field(
        "", "A PFLM decoder folder (e.g. from convert from-kforcing) that stage k = 2 x its max_k starts from, "
            "as the frozen previous student and the initial weights, instead of <output_dir>/k{k/2}/export; "
            "empty: the previous stage's export.")
    seed: int = doc_field(7, "Seed of the noise u and tau drawn during distillation.")
    partition_frozen: bool = doc_field(
        False, "Partition the frozen teacher / previous student over data-parallel ranks with ZeRO-3 "
               "(no optimizer state), for teachers too big to replicate; needs parallel.pp = 1.")
    frozen_precision: str = doc_field(
        "fp32", "Frozen models' precision: fp32 = all float32 (always so with parallel.pp > 1); auto = the training "
                "precision but a float32 final norm + LM head (float32 logits of a bf16 body).", ("auto", "fp32"))

    def windows_per_sequence(self, k: int, context_len: int, available: int | None = None) -> int:
        """Windows drawn per sequence of ``context_len`` tokens at stage ``k`` (0: every start): the
        slot budget (``window_slots_per_token`` x the context when set, else ``max_window_slots``)
        over k, at least 1 and at most the ``available`` starts (default: the context length). One
        rule for the task that draws them and the memory plan that counts them."""
        slots = round(self.window_slots_per_token * context_len) if self.window_slots_per_token > 0 \
            else self.max_window_slots
        if not slots:
            return 0
        return max(1, min(context_len if available is None else available, slots // k))

    def slot_windows(self, k: int, context_len: int) -> int:
        """Windows a stage-``k`` sequence of ``context_len`` tokens carries: the distinct starts of
        :meth:`windows_per_sequence` (0 = every start) times ``noise_draws_per_start``."""
        return (self.windows_per_sequence(k, context_len) or context_len) * self.noise_draws_per_start


@dataclass
class DecodeConfig:
    k: int = doc_field(4, "Tokens per PFLM step (<= the trained k).")
    tau: float = doc_field(1.0, "Sampling temperature.")
    max_new_tokens: int = doc_field(64, "Tokens to generate per prompt.")
    frequency_penalty: Optional[Union[float, dict[int, float]]] = doc_field(
        None, "PFLM repetition penalty, the authors' rule: slot j of a block takes argmax(logits - "
              "penalty x counts), counts = this sequence's tokens so far (prompt excluded) including "
              "slots 1..j-1 of the same block. null: the authors' values, 0.3 / 0.5 / 0.5 for "
              "k = 2 / 3 / 4 and 0.5 for other k; a map {k: penalty}, e.g. {2: 0.3, 4: 0.5} (a k it "
              "leaves out takes the authors' value); a number: every k, and AR sampling too (AR is "
              "unpenalised otherwise); 0 turns it off.")
    min_p: float = doc_field(
        0.0, "AR sampling only: min-p truncation (tokens below this fraction of the most likely token's "
             "probability are never sampled), e.g. the distill.teacher_min_p a student was distilled with; "
             "0: the exact distribution.")
    batch_size: int = doc_field(8, "Prompts decoded together.")
    seed: int = doc_field(0, "Seed of the noise.")


@dataclass
class EvalConfig:
    num_contexts: int = doc_field(128, "Held-out contexts for the agreement measurement.")
    context_len: int = doc_field(64, "Tokens of each held-out context of the agreement measurement.")
    num_samples: int = doc_field(32, "Samples per model for NLL, entropy and distinct-n.")
    prompt_len: int = doc_field(6, "Tokens of each sample's held-out prompt (the authors use 6).")
    sample_len: int = doc_field(0, "New tokens per sample; 0: up to the models' max_seq_len - "
                                   "prompt_len (full length, where repetition drift shows).")
    speed_batches: list[int] = doc_field([1, 8, 32], "Batch sizes of the decode speed measurement ([] skips it).")
    speed_new_tokens: int = doc_field(64, "New tokens per sequence in a speed run.")
    speed_context: int = doc_field(32, "Prompt length of a speed run.")
    speed_repeats: int = doc_field(3, "Timed repeats per speed cell (median reported).")
    frontier_taus: list[float] = doc_field(
        [0.7, 1.0, 1.3], "Temperatures of the quality frontier: teacher NLL vs unigram entropy of "
        "samples of the AR teacher and every stage from the same prompts (frontier.png); empty: off.")
    frontier_samples: int = doc_field(8, "Samples per model and tau in the quality frontier (the first "
                                         "of the sample prompts; full length); 0: all num_samples.")
    lossless: bool = doc_field(True, "Measure lossless mode (the largest stage drafts, the teacher "
                               "verifies): exactness, acceptance length, tokens/s vs AR and PFLM.")
    judge_model: str = doc_field("", "An AR decoder folder (e.g. a larger model's export/) that also "
                                 "scores every sample (judge NLL); empty: no judge.")


@dataclass
class Config:
    output_dir: str = doc_field("runs/demo", "Run folder: checkpoints, data, logs (the -o flag sets it).")
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def is_section(f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config"))
