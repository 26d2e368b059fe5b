"""The ``distill`` (one stage) and ``pipeline`` (teacher -> k1 -> k2 -> k4 -> report) commands.

Run layout under ``output_dir``: ``data/`` (shards), ``teacher/``, ``k1/``, ``k2/``, ... (each a
training run folder with ``checkpoints/`` and, once finished, ``export/`` in the decoder
format), ``report.json`` and ``report.md``. Stages hand over through the exported folders, so
each stage can run as its own (Slurm) job, at any parallel layout, and resumes on its own.
Stage 2k starts from ``<run>/k{k}/export`` or from ``distill.init_from_student`` (any PFLM decoder
folder with max_k = k, e.g. a released model imported with ``convert from-kforcing``), and keeps
that student's noise-feature convention and masked tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from ..config import Config, ConfigError, check, derive_layout, shards_dir_of
from ..config.schema import ModelConfig
from ..training.checkpoint import CheckpointError
from .runtime import distributed, finished_result, install_stop_signals, own_run_folder, validated_launch
from .teacher import (ensure_shards, resolve_vocab, samplers, teacher_setup, train_teacher, train_then_export,
                      write_summary)

log = logging.getLogger("kforcing_dist")


def stage_name(k: int) -> str:
    return f"k{k}"


def parse_stage(text: str) -> int:
    t = text.lower().lstrip("k")
    if not t.isdigit() or int(t) < 1:
        raise ConfigError([f"--stage {text!r}: expected k1, k2, k4 or k8"], "command line")
    return int(t)


def run_root(cfg: Config) -> Path:
    return Path(cfg.output_dir)


def teacher_export(cfg: Config) -> Path:
    """The AR teacher's decoder folder: distill.teacher (a run folder or export) or <run>/teacher/export."""
    if cfg.distill.teacher:
        p = Path(cfg.distill.teacher)
        return p / "export" if (p / "export" / "config.json").exists() else p
    return run_root(cfg) / "teacher" / "export"


def _require_export(path: Path, what: str, fix: str, kind: str) -> dict:
    from ..decode.format import read_decoder_config

    if not (path / "config.json").exists():
        raise CheckpointError(f"{what} not found at {path} (no config.json); {fix}")
    conf = read_decoder_config(path)
    if conf.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {conf.get('kind')!r} model but {what} must be {kind!r}; {fix}")
    return conf


def previous_student(cfg: Config, k: int) -> tuple[Path, dict]:
    """The stage-k/2 student that stage k (> 1) starts from and its decoder config:
    distill.init_from_student when set, else <run>/k{k/2}/export."""
    d = cfg.distill
    if d.init_from_student:
        path = Path(d.init_from_student)
        conf = _require_export(path, "distill.init_from_student", "give a PFLM decoder folder (a stage's export/ "
                               "or one written by `kforcing-dist convert from-kforcing`)", "pflm")
        what, fix = "distill.init_from_student", f"run the stage it continues: --stage k{2 * conf['max_k']}"
    else:
        path = run_root(cfg) / stage_name(k // 2) / "export"
        conf = _require_export(path, f"the stage-k{k // 2} export", f"run `kforcing-dist distill --stage k{k // 2}` "
                               f"first, or set distill.init_from_student to a PFLM decoder folder", "pflm")
        what, fix = f"the stage-k{k // 2} export", f"re-run stage k{k // 2} or set distill.init_from_student"
    if conf["max_k"] != k // 2:
        raise CheckpointError(f"{what} {path} holds a k={conf['max_k']} student (max_k {conf['max_k']}), but stage "
                              f"k{k} starts from a k={k // 2} one; {fix}")
    return path, conf


def stage_noise(cfg: Config, prev_conf: dict | None) -> dict:
    """The noise-feature convention of a stage's student ({"features", "max_freq"}): the config's for
    stage 1, the previous student's for a later stage (ConfigError when the config explicitly asks
    for another: the weights were trained under that one)."""
    from ..config.loader import is_given
    from ..nn.noise import noise_section

    d = cfg.distill
    if prev_conf is None:
        return noise_section(d.noise_features, d.noise_max_freq)
    prev = prev_conf["noise"]
    clash = []
    if is_given(cfg, "distill.noise_features") and d.noise_features != prev["features"]:
        clash.append(f"distill.noise_features={d.noise_features!r} but the student it starts from uses "
                     f"{prev['features']!r}")
    if prev["features"] == "rising" and is_given(cfg, "distill.noise_max_freq") \
            and float(d.noise_max_freq) != prev["max_freq"]:
        clash.append(f"distill.noise_max_freq={d.noise_max_freq} but the student it starts from uses "
                     f"{prev['max_freq']}")
    if clash:
        raise ConfigError([f"{c}: a later stage keeps its previous student's noise features; remove the key "
                           f"(or set it to the student's value)" for c in clash], "the config")
    return dict(prev)


def stage_config(cfg: Config, k: int, model_cfg: dict) -> Config:
    """The config a stage trains with: the teacher's architecture and the distill.* schedule."""
    d = cfg.distill
    out = copy.deepcopy(cfg)
    out.output_dir = str(run_root(cfg) / stage_name(k))
    out.model = ModelConfig(**model_cfg)
    out.train = dataclasses.replace(
        cfg.train, max_steps=d.stage_steps[d.stages.index(k)] if d.stage_steps else d.max_steps,
        lr=d.lr, min_lr=d.min_lr, warmup_steps=d.warmup_steps,
        micro_batch_size=d.micro_batch_size or cfg.train.micro_batch_size,
        seq_len=d.seq_len or cfg.train.seq_len, eval_interval=d.eval_interval,
        global_batch_size=0 if d.micro_batch_size else cfg.train.global_batch_size)
    if not out.data.shards_dir:
        out.data.shards_dir = str(shards_dir_of(cfg))
    return out


def _export_weights(folder: Path, padded_vocab_size: int) -> dict:
    """The full weights of a decoder folder, checked like ``generate`` checks them (size recorded in
    config.json, readable safetensors, names and shapes: a DecodeError naming the fix), with the
    vocabulary rows fitted to this run's padding."""
    from ..decode.format import load_decoder_weights
    from ..training.export import fit_vocab_rows

    return fit_vocab_rows(load_decoder_weights(folder), padded_vocab_size)


def _load_frozen(folder: Path, builder, groups, cfg: Config, layout):
    """Build a model with ``builder()``, load the full weights exported in ``folder``, freeze it.

    A pipeline model comes back as a forward-only :class:`PipelineForward` on its own
    optimizer-free engine (fp32); a plain one is held as ``distill.partition_frozen`` and
    ``distill.frozen_precision`` say (:func:`~kforcing_dist.distill.frozen.freeze`).
    """
    from ..distill.frozen import freeze
    from ..model.pipeline import PipelineForward, is_pipeline, load_plain_state_dict
    from ..training.engine import build_frozen_pipeline_engine, resolve_precision

    model = builder()
    weights = _export_weights(folder, model.padded_vocab_size)
    load_plain_state_dict(model, weights, groups)
    if is_pipeline(model):
        return PipelineForward(build_frozen_pipeline_engine(model, layout))
    return freeze(model, groups, resolve_precision(cfg.train.precision, groups.device, cfg.parallel.zero_stage),
                  cfg.distill.partition_frozen, cfg.distill.frozen_precision)


def distill_stage(cfg: Config, original_yaml: str, k: int, info, groups, stop):
    """Train (or resume) stage k inside a distributed context and export it."""
    from ..distill.task import DistillTask
    from ..model.pipeline import build_model, load_plain_state_dict
    from ..nn.sizes import pad_vocab_size
    from ..training.export import export_decoder
    from ..training.trainer import LMTrainer

    d = cfg.distill
    if k not in d.stages:
        raise ConfigError([f"stage k{k} is not in distill.stages={d.stages}"], "command line")
    ar_path = teacher_export(cfg)
    # teacher_chain: stage 2k's targets come from the AR teacher, the frozen stage k is not needed
    chain = k > 1 and d.higher_stage_targets == "teacher_chain"
    need_ar = k == 1 or chain or d.noise_inversion_weight > 0
    ar_conf = _require_export(ar_path, "the AR teacher export", "train it first (`kforcing-dist train-teacher "
                              f"-o {run_root(cfg) / 'teacher'}`) or set distill.teacher", "ar") if need_ar else None
    if k == 1 and d.init_from_student:
        raise ConfigError([f"distill.init_from_student={d.init_from_student}: stage k1 starts from the AR teacher; "
                           f"the folder starts the stage k = 2 x its max_k (run that --stage)"], "the config")
    prev_path, prev_conf = previous_student(cfg, k) if k > 1 else (None, None)
    targets_from = ar_path if k == 1 or chain else prev_path
    arch = (ar_conf or prev_conf)["model"]
    noise = stage_noise(cfg, prev_conf)
    # a released model's mask token stays masked in every model of the stage (and in its export)
    masked = (prev_conf or ar_conf)["masked_token_ids"]
    scfg = stage_config(cfg, k, arch)
    # the stage's config (saved in its checkpoints) records the convention it really trains with
    scfg.distill.noise_features = noise["features"]
    if noise["max_freq"] is not None:
        scfg.distill.noise_max_freq = noise["max_freq"]
    check(scfg, info.world_size, source=f"stage k{k}")
    shards, tokenizer = ensure_shards(scfg, info.world_size, "the config")
    resolve_vocab(scfg, tokenizer)
    out = Path(scfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    with own_run_folder(out, f"distill --stage k{k}", groups):
        done = finished_result(out, scfg.train.max_steps, "stage_summary.json")
        if done is not None:
            return done
        layout = derive_layout(scfg, info.world_size)
        padded = pad_vocab_size(scfg.model.vocab_size, scfg.model.make_vocab_size_divisible_by, layout.tp)

        def student(max_k):
            return build_model(scfg.model, padded, groups, layout.pp, max_k=max_k, noise=noise, masked_token_ids=masked)

        def ar_model():
            return build_model(scfg.model, padded, groups, layout.pp, masked_token_ids=ar_conf["masked_token_ids"])

        ar = _load_frozen(ar_path, ar_model, groups, scfg, layout) if need_ar else None
        prev = _load_frozen(prev_path, lambda: student(k // 2), groups, scfg, layout) if k > 1 and not chain else None
        torch.manual_seed(d.seed)
        model = student(k)
        # initialisation: every teacher weight (stage 1) or the whole previous student (stage 2k)
        init_from = ar_path if k == 1 else prev_path
        init_weights = _export_weights(init_from, padded)
        if k == 1:  # the fresh noise encoder (on the first pipeline stage only, with pp > 1)
            to_plain = getattr(model, "plain_name", lambda n: n)
            init_weights.update({to_plain(n): p.detach().cpu() for n, p in model.named_parameters()
                                 if to_plain(n).startswith("noise_encoder.")})
        load_plain_state_dict(model, init_weights, groups)

        sampler, valid = samplers(scfg, shards, layout, groups)
        task = DistillTask(k, d, groups, ar_teacher=ar, prev_student=prev)
        trainer = LMTrainer(
            scfg, original_yaml, groups, layout, model, task, sampler, valid, out,
            extra_metadata={"tokenizer_fingerprint": tokenizer.fingerprint, "padded_vocab_size": padded, "k": k,
                            "cdf_order": d.cdf_order, "teacher": str(targets_from),
                            "noise": noise, "masked_token_ids": list(masked)},
            save_extras=lambda folder: tokenizer.save(folder / "tokenizer"), stop_flag=stop)
        result = train_then_export(trainer, lambda res: export_decoder(
            trainer.engine.module, groups, out / "export", kind="pflm", model_cfg=scfg.model, padded_vocab_size=padded,
            zero_stage=scfg.parallel.zero_stage, tokenizer=tokenizer, max_k=k, noise=noise,
            masked_token_ids=masked, tau_range=(d.tau_min, d.tau_max),
            cdf_order=d.cdf_order, source={"checkpoint": str(res.checkpoint), "step": res.step,
                                           "teacher": str(targets_from)}))
        if groups.is_logging_rank:
            write_summary(out / "stage_summary.json", result, info, layout, {"k": k})
            log.info("stage k%d: step %d, %s", k, result.step,
                     ", ".join(f"{n} {v:.4g}" for n, v in (result.val or {}).items()))
        return result


def run_distill(cfg: Config, original_yaml: str, source: str, stage: str):
    from ..training.trainer import StopFlag

    k = parse_stage(stage)
    info = validated_launch(cfg, source)
    stop = StopFlag()
    install_stop_signals(stop)
    with distributed(info, cfg) as groups:
        return distill_stage(cfg, original_yaml, k, info, groups, stop)


def run_pipeline(cfg: Config, original_yaml: str, source: str) -> int:
    """Teacher -> every distill stage -> report, in one process group; returns an exit code."""
    info = validated_launch(cfg, source)
    root = run_root(cfg)
    tcfg = copy.deepcopy(cfg)
    tcfg.output_dir = str(root / "teacher")
    tcfg.data.shards_dir = str(shards_dir_of(cfg))
    shards, tokenizer, stop = teacher_setup(tcfg, info.world_size, source)
    with distributed(info, cfg) as groups:
        if train_teacher(tcfg, original_yaml, info, groups, shards, tokenizer, stop).stopped_early:
            return 3
        for k in cfg.distill.stages:
            if distill_stage(cfg, original_yaml, k, info, groups, stop).stopped_early:
                return 3
        if groups.world_rank == 0:
            from ..eval.report import evaluate_run

            evaluate_run(cfg, root)
        torch.distributed.barrier()
    return 0
