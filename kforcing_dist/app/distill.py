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

import logging
from pathlib import Path

import torch

from ..config import Config, check, derive_layout
from ..stage import TEACHER, Stage, parse_stage
from .runtime import distributed, finished_result, install_stop_signals, own_run_folder, validated_launch
from .teacher import ensure_shards, resolve_vocab, teacher_setup, train_teacher, train_then_export, write_summary

log = logging.getLogger("kforcing_dist")


def distill_stage(cfg: Config, original_yaml: str, k: int, info, groups, stop):
    """Train (or resume) stage k inside a distributed context and export it."""
    from ..stage_trainer import build_stage_trainer

    stage = Stage(cfg, k)
    src = stage.inputs()
    # the stage's config (saved in its checkpoints) records the convention it really trains with
    scfg = stage.config(src.arch, src.noise)
    check(scfg, info.world_size, source=f"stage k{k}")
    shards, tokenizer = ensure_shards(scfg, info.world_size, "the config")
    resolve_vocab(scfg, tokenizer)
    out = stage.run_dir
    out.mkdir(parents=True, exist_ok=True)

    with own_run_folder(out, f"distill --stage k{k}", groups):
        done = finished_result(out, scfg.train.max_steps, "stage_summary.json")
        if done is not None:
            return done
        layout = derive_layout(scfg, info.world_size)
        built = build_stage_trainer(stage, scfg, original_yaml, groups, layout, shards, tokenizer, inputs=src,
                                    stop_flag=stop)
        result = train_then_export(built.trainer, built.export)
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
    root = Path(cfg.output_dir)
    tcfg = Stage(cfg, TEACHER).config()
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
