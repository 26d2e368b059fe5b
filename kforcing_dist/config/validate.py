"""Cross-field validation, run before any process group exists.

:func:`validate` returns every problem (empty list when the config is sound);
:func:`check` raises them all at once as a :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .loader import ConfigError
from .schema import HIGHER_STAGE_TARGETS, Config

DATA_EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes derived from the config and the world size."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int


def derive_layout(cfg: Config, world_size: int) -> Layout:
    """Sizes implied by a *valid* config (call :func:`check` first)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world_size // (tp * pp)
    micro = cfg.train.micro_batch_size
    global_batch = cfg.train.global_batch_size or micro * dp
    return Layout(world_size, tp, pp, dp, micro, global_batch // (micro * dp), global_batch)


def _parallel_problems(cfg: Config, world_size: int) -> list[str]:
    p, m, out = cfg.parallel, cfg.model, []
    if p.tp < 1 or p.pp < 1:
        out.append(f"parallel.tp={p.tp}, parallel.pp={p.pp}: both must be >= 1")
        return out
    if world_size % (p.tp * p.pp) != 0:
        out.append(
            f"parallel: tp x pp x dp must equal the world size {world_size}, but tp={p.tp} x pp={p.pp} "
            f"= {p.tp * p.pp} does not divide it; launch a multiple of {p.tp * p.pp} processes or change tp/pp")
    if m.num_heads % p.tp != 0:
        out.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}")
    kv = m.num_kv_heads or m.num_heads
    if kv % p.tp != 0:
        out.append(f"model.num_kv_heads={kv} is not divisible by parallel.tp={p.tp}")
    if m.ffn_hidden_size % p.tp != 0:
        out.append(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp != 0:
        out.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if p.zero_stage in (2, 3) and p.pp > 1:
        out.append(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed refuses ZeRO-2/3 "
                   f"with pipeline parallelism; use zero_stage 0 or 1, or pp 1")
    if p.pp > 1 and p.zero_stage == 0 and cfg.train.grad_clip > 0:
        # DeepSpeed's ZeRO-0 pipeline path counts the grad norm on the first stage only
        out.append(f"parallel.zero_stage=0 with parallel.pp={p.pp} and train.grad_clip={cfg.train.grad_clip}: "
                   f"DeepSpeed clips with a wrong gradient norm in this combination; use zero_stage 1 "
                   f"(or train.grad_clip 0)")
    if p.pp > 1 and m.tie_embeddings:
        out.append(f"model.tie_embeddings with parallel.pp={p.pp}: the embedding and the head live on different "
                   f"pipeline stages; set model.tie_embeddings: false or parallel.pp: 1")
    if p.pp > 1 and cfg.distill.noise_inversion_weight > 0:
        out.append(f"distill.noise_inversion_weight={cfg.distill.noise_inversion_weight} with parallel.pp={p.pp}: "
                   f"the noise-inversion loss is not available with pipeline parallelism yet; "
                   f"set it to 0 or use parallel.pp: 1")
    return out


def _model_problems(cfg: Config) -> list[str]:
    m, out = cfg.model, []
    for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len", "make_vocab_size_divisible_by"):
        if getattr(m, name) < 1:
            out.append(f"model.{name}={getattr(m, name)} must be >= 1")
    if m.num_heads >= 1 and m.hidden_size % m.num_heads != 0:
        out.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    elif m.num_heads >= 1 and m.position == "rope" and (m.hidden_size // m.num_heads) % 2:
        out.append(f"model: head dim {m.hidden_size // m.num_heads} must be even for rotary positions")
    kv = m.num_kv_heads or m.num_heads
    if kv < 1 or (m.num_heads >= 1 and m.num_heads % kv != 0):
        out.append(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.vocab_size < 0 or m.vocab_size == 1:
        out.append(f"model.vocab_size={m.vocab_size}: use 0 (take it from the tokenizer) or a size >= 2")
    if m.ffn_hidden_size < 0:
        out.append(f"model.ffn_hidden_size={m.ffn_hidden_size} must be >= 0")
    if m.tie_embeddings and m.lm_head_bias:
        out.append("model.lm_head_bias needs an untied head: set model.tie_embeddings: false or lm_head_bias: false")
    if m.rope_base <= 0 or m.norm_eps <= 0 or m.init_std <= 0:
        out.append("model.rope_base, model.norm_eps and model.init_std must be > 0")
    return out


def _train_problems(cfg: Config, world_size: int) -> list[str]:
    t, out = cfg.train, []
    if t.seq_len < 2 or t.seq_len > cfg.model.max_seq_len:
        out.append(f"train.seq_len={t.seq_len} must be between 2 and model.max_seq_len={cfg.model.max_seq_len}")
    if t.micro_batch_size < 1:
        out.append(f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    p = cfg.parallel
    if t.precision == "bf16" and p.zero_stage == 0:
        out.append("train.precision=bf16 needs parallel.zero_stage >= 1: DeepSpeed keeps fp32 master weights "
                   "and fp32 gradient accumulation for bf16 only in its ZeRO optimizers (at one data-parallel "
                   "rank ZeRO-1 partitions nothing); set parallel.zero_stage=1, or train.precision=auto/fp32")
    if t.micro_batch_size >= 1 and p.tp >= 1 and p.pp >= 1 and world_size % (p.tp * p.pp) == 0:
        dp = world_size // (p.tp * p.pp)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size < 0 or (t.global_batch_size and t.global_batch_size % per_step):
            out.append(
                f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
                f"micro_batch_size x dp = {t.micro_batch_size} x {dp} = {per_step} (or 0 for exactly that)")
    if t.max_steps < 1:
        out.append(f"train.max_steps={t.max_steps} must be >= 1")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        out.append(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    if t.warmup_steps < 0:
        out.append(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if t.grad_clip < 0 or t.weight_decay < 0:
        out.append("train.grad_clip and train.weight_decay must be >= 0")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        out.append(f"train.beta1={t.beta1}, train.beta2={t.beta2} must lie in [0, 1)")
    if t.eval_interval < 0 or t.eval_batches < 1 or t.log_interval < 1:
        out.append("train.eval_interval must be >= 0, train.eval_batches and train.log_interval >= 1")
    if t.time_budget_minutes < 0:
        out.append("train.time_budget_minutes must be >= 0")
    c = cfg.checkpoint
    if c.save_interval < 1 or c.keep_last < 1:
        out.append(f"checkpoint.save_interval={c.save_interval} and checkpoint.keep_last={c.keep_last} must be >= 1")
    return out


def data_value_problems(d) -> list[str]:
    """The rules on ``data``'s numbers (a DataConfig): the one source of truth, which prepare_data applies too."""
    out = []
    if not 0 < d.valid_fraction < 0.5:
        out.append(f"data.valid_fraction={d.valid_fraction} must lie in (0, 0.5); use e.g. 0.01")
    if d.shard_tokens < 1024:
        out.append(f"data.shard_tokens={d.shard_tokens} must be >= 1024; use e.g. 4000000")
    if d.num_workers < 1:
        out.append(f"data.num_workers={d.num_workers} must be >= 1 (1 tokenises in this process); use e.g. 2")
    if d.max_documents < 0 or d.builtin_min_bytes < 0:
        out.append(f"data.max_documents={d.max_documents} and data.builtin_min_bytes={d.builtin_min_bytes} "
                   f"must be >= 0 (max_documents 0 reads every document)")
    return out


def _data_problems(cfg: Config, check_files: bool) -> list[str]:
    d, tok, out = cfg.data, cfg.tokenizer, []
    if d.source == "files":
        if not d.paths:
            out.append("data.source=files needs data.paths (a list of .txt/.jsonl/.parquet files)")
        for p in d.paths:
            if not p.endswith(DATA_EXTENSIONS):
                out.append(f"data.paths: {p} has an unsupported extension; use one of {', '.join(DATA_EXTENSIONS)}")
            elif check_files and not Path(p).is_file():
                out.append(f"data.paths: {p} does not exist")
    if d.source == "hf" and not (d.hf_name or d.hf_path):
        out.append("data.source=hf needs data.hf_name (e.g. lm1b or openwebtext) or data.hf_path (a folder "
                   "written by datasets' save_to_disk)")
    if d.source == "hf" and d.hf_name and d.hf_path:
        out.append("data.hf_name and data.hf_path are both set; set only one (hf_path: a save_to_disk folder)")
    if d.source == "hf" and d.hf_path and check_files and not Path(d.hf_path).expanduser().is_dir():
        out.append(f"data.hf_path: {d.hf_path} is not a folder (give a folder written by datasets' save_to_disk)")
    out += data_value_problems(d)
    if tok.path and check_files and not Path(tok.path).exists():
        out.append(f"tokenizer.path: {tok.path} does not exist (give a SentencePiece .model file or a "
                   f"local Hugging Face tokenizer folder, or leave it empty to train one)")
    if tok.kind == "hf" and not tok.path:
        out.append("tokenizer.kind=hf needs tokenizer.path (a local folder with tokenizer.json)")
    if not tok.path and tok.vocab_size < 64:
        out.append(f"tokenizer.vocab_size={tok.vocab_size} must be >= 64")
    return out


def _distill_problems(cfg: Config, check_files: bool) -> list[str]:
    d, out = cfg.distill, []
    st = d.stages
    if not st or st[0] != 1 or any(b != 2 * a for a, b in zip(st, st[1:])):
        out.append(f"distill.stages={st}: must start at 1 and double each stage, e.g. [1, 2, 4] or [1, 2, 4, 8]")
    if not 0 < d.tau_min <= d.tau_max:
        out.append(f"distill.tau_min={d.tau_min}, distill.tau_max={d.tau_max}: need 0 < tau_min <= tau_max")
    if not 0 <= d.teacher_min_p < 1:
        out.append(f"distill.teacher_min_p={d.teacher_min_p}: need 0 <= teacher_min_p < 1 (0: the exact "
                   f"teacher; 0.05-0.1 is typical min-p sampling)")
    if d.teacher_min_p > 0 and d.noise_inversion_weight > 0:
        out.append(f"distill.noise_inversion_weight={d.noise_inversion_weight} with distill.teacher_min_p="
                   f"{d.teacher_min_p}: a data token in the cut tail has no u that the truncated teacher maps "
                   f"to it; set one of them to 0")
    if d.stage_steps and (len(d.stage_steps) != len(st) or min(d.stage_steps) < 1):
        out.append(f"distill.stage_steps={d.stage_steps} must give one positive step count per stage "
                   f"of distill.stages={st}, or be empty")
    if d.max_window_slots < 0 or d.window_slots_per_token < 0 or d.noise_inversion_weight < 0 \
            or d.noise_encoder_lr_scale <= 0:
        out.append("distill.max_window_slots, distill.window_slots_per_token and distill.noise_inversion_weight "
                   "must be >= 0, distill.noise_encoder_lr_scale > 0")
    if d.noise_draws_per_start < 1:
        out.append(f"distill.noise_draws_per_start={d.noise_draws_per_start} must be >= 1 (1: one window per "
                   f"drawn start)")
    if d.noise_features == "rising" and d.noise_max_freq < 1:
        out.append(f"distill.noise_max_freq={d.noise_max_freq} must be >= 1 (the lowest frequency of rising "
                   f"noise features)")
    if d.init_from_student and check_files and not (Path(d.init_from_student) / "config.json").is_file():
        out.append(f"distill.init_from_student: {d.init_from_student} is not a decoder folder (no config.json); "
                   f"give a PFLM export or a folder written by `kforcing-dist convert from-kforcing`")
    if d.max_steps < 1 or d.lr <= 0 or not 0 <= d.min_lr <= d.lr or d.warmup_steps < 0:
        out.append(f"distill: need max_steps >= 1, lr > 0, 0 <= min_lr <= lr, warmup_steps >= 0 "
                   f"(got {d.max_steps}, {d.lr}, {d.min_lr}, {d.warmup_steps})")
    if d.micro_batch_size < 0 or d.seq_len < 0 or d.eval_interval < 0:
        out.append("distill.micro_batch_size, distill.seq_len and distill.eval_interval must be >= 0")
    if d.partition_frozen and cfg.parallel.pp > 1:
        out.append("distill.partition_frozen (ZeRO-3 frozen models) needs parallel.pp = 1: with a pipeline "
                   "the frozen models are already split by stage; set distill.partition_frozen=false")
    if not d.context_gradients and cfg.parallel.pp > 1:
        out.append("distill.context_gradients=false needs parallel.pp = 1 (a pipeline stage runs the context and "
                   "window rows as one sequence); set distill.context_gradients=true")
    if d.higher_stage_targets not in HIGHER_STAGE_TARGETS:
        out.append(f"distill.higher_stage_targets={d.higher_stage_targets!r}: use one of "
                   f"{', '.join(HIGHER_STAGE_TARGETS)}")
    if d.higher_stage_targets == "teacher_chain" and cfg.parallel.pp > 1 and max(st or [1]) > 1:
        out.append(f"distill.higher_stage_targets=teacher_chain with parallel.pp={cfg.parallel.pp}: the pipelined "
                   f"AR teacher runs only plain causal passes, not the chain's windows; use self_forcing "
                   f"or parallel.pp: 1")
    seq = d.seq_len or cfg.train.seq_len
    if cfg.model.position == "learned" and seq + max(st or [1]) > cfg.model.max_seq_len:
        # slot i of the last window sits at position seq_len - 1 + i: a learned table must hold it
        out.append(f"distill: context {seq} + k {max(st or [1])} exceeds model.max_seq_len={cfg.model.max_seq_len} "
                   f"(learned positions); lower distill.seq_len")
    dec, ev = cfg.decode, cfg.eval
    if dec.k < 1 or dec.tau <= 0 or dec.max_new_tokens < 1 or dec.batch_size < 1:
        out.append("decode: need k >= 1, tau > 0, max_new_tokens >= 1, batch_size >= 1")
    if not 0 <= dec.min_p < 1:
        out.append(f"decode.min_p={dec.min_p}: need 0 <= min_p < 1 (0: no truncation)")
    out += _penalty_problems(dec.frequency_penalty)
    if min(ev.num_contexts, ev.context_len, ev.num_samples, ev.prompt_len, ev.speed_new_tokens,
           ev.speed_context, ev.speed_repeats) < 1 or not ev.speed_batches or min(ev.speed_batches) < 1:
        out.append("eval: every count and length must be >= 1 and speed_batches non-empty")
    if ev.sample_len < 0 or ev.frontier_samples < 0:
        out.append("eval.sample_len and eval.frontier_samples must be >= 0 (0: full length / all samples)")
    if ev.prompt_len + max(ev.sample_len, 1) > cfg.model.max_seq_len:
        out.append(f"eval: prompt_len {ev.prompt_len} + sample_len {ev.sample_len} exceeds model.max_seq_len="
                   f"{cfg.model.max_seq_len}; lower them (sample_len 0 fills up to max_seq_len)")
    if any(t <= 0 for t in ev.frontier_taus):
        out.append(f"eval.frontier_taus must all be > 0, got {ev.frontier_taus}")
    return out


def _penalty_problems(setting) -> list[str]:
    """decode.frequency_penalty: None, a number or a {k: penalty} map, penalties finite >= 0."""
    fix = ("give a finite number >= 0 (every k), a map {k: penalty} with k >= 1 and penalties "
           ">= 0 (e.g. {2: 0.3, 4: 0.5}), or null for the authors' values")
    if setting is None:
        return []
    if not isinstance(setting, dict):
        if math.isfinite(setting) and setting >= 0:
            return []
        return [f"decode.frequency_penalty={setting!r}: {fix}"]
    bad = {k: v for k, v in setting.items() if k < 1 or not math.isfinite(v) or v < 0}
    return [f"decode.frequency_penalty: bad entries {bad!r}; {fix}"] if bad else []


def validate(cfg: Config, world_size: int = 1, check_files: bool = True) -> list[str]:
    """Every problem of ``cfg`` for a job of ``world_size`` processes."""
    return (_parallel_problems(cfg, world_size) + _model_problems(cfg)
            + _train_problems(cfg, world_size) + _data_problems(cfg, check_files) + _distill_problems(cfg, check_files))


def check(cfg: Config, world_size: int = 1, check_files: bool = True, source: str = "config") -> None:
    problems = validate(cfg, world_size, check_files)
    if problems:
        raise ConfigError(problems, source)
