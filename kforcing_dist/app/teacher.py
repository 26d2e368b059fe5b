"""The ``prepare-data`` and ``train-teacher`` commands (and the pieces ``pipeline`` reuses)."""

from __future__ import annotations

import json
import logging
from pathlib import Path


from ..config import Config, check, derive_layout, shards_dir_of
from ..data import DataError
from ..stage import TEACHER, Stage
from .paths import RUN_FOLDER, output_folder
from .runtime import (crash_hook_from_env, distributed, finished_result, install_stop_signals, own_run_folder,
                      setup_logging, validated_launch)

log = logging.getLogger("kforcing_dist")


def writable_shards_dir(cfg: Config) -> Path:
    """The shards folder, after checking that its parent (which also receives the corpus and
    tokenizer cache and the half-written shards) can be written."""
    shards = shards_dir_of(cfg)
    output_folder(shards.parent, "the folder of data.shards_dir" if cfg.data.shards_dir else RUN_FOLDER)
    return shards


def run_prepare_data(cfg: Config, source: str) -> dict:
    from ..data.prepare import prepare_data

    setup_logging(0)
    check(cfg, world_size=cfg.parallel.tp * cfg.parallel.pp, source=source)
    out = writable_shards_dir(cfg)
    meta = prepare_data(cfg, out, progress=True)
    log.info("token shards in %s: %s train / %s valid tokens, vocab %s", out,
             f"{meta['tokens']['train']:,}", f"{meta['tokens']['valid']:,}", meta["vocab_size"])
    return meta


def ensure_shards(cfg: Config, world_size: int, source: str):
    """Token shards and the model's tokenizer, checked to match (prepared here on one process)."""
    from ..data.prepare import prepare_data
    from ..data.shards import check_tokenizer_matches
    from ..data.tokenizer import load_tokenizer

    shards = shards_dir_of(cfg)
    if not (shards / "metadata.json").exists():
        if world_size > 1:
            raise DataError(f"no token shards in {shards}; run `kforcing-dist prepare-data -c {source}` "
                            f"(one process) before a multi-process job")
        log.info("no token shards in %s yet: preparing them first", shards)
        prepare_data(cfg, writable_shards_dir(cfg), progress=True)
    # The model's tokenizer is the configured one when given, else the one the shards were made with.
    tokenizer = load_tokenizer(cfg.tokenizer.path or shards / "tokenizer")
    check_tokenizer_matches(shards, tokenizer)
    return shards, tokenizer


def resolve_vocab(cfg: Config, tokenizer) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise DataError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} tokens; set model.vocab_size: 0 to take the tokenizer's size")


def write_summary(path: Path, result, info, layout, extra: dict | None = None) -> dict:
    val = result.val or {}
    summary = {"step": result.step, "stopped_early": result.stopped_early, "train_loss": result.last_loss,
               **val, "tokens_per_s": result.tokens_per_s, "checkpoint": str(result.checkpoint),
               "world_size": info.world_size, "layout": vars(layout), **(extra or {})}
    path.write_text(json.dumps(summary, indent=2))
    return summary


def train_then_export(trainer, export):
    """Resume, train, and ``export(result)`` unless stopped early; the trainer is closed either way."""
    try:
        trainer.resume()
        result = trainer.train(after_step=crash_hook_from_env())
        if not result.stopped_early:
            export(result)
    finally:
        trainer.close()
    return result


def train_teacher(cfg: Config, original_yaml: str, info, groups, shards: Path, tokenizer, stop):
    """Train (or resume) the AR teacher in ``cfg.output_dir`` and export it; inside a distributed context."""
    from ..stage_trainer import build_stage_trainer

    out = Path(cfg.output_dir)
    with own_run_folder(out, "train-teacher", groups):
        done = finished_result(out, cfg.train.max_steps, "teacher_summary.json")
        if done is not None:
            return done
        layout = derive_layout(cfg, info.world_size)
        # cfg is the teacher run's own (output_dir: the teacher's folder)
        built = build_stage_trainer(Stage(cfg, TEACHER), cfg, original_yaml, groups, layout, shards, tokenizer,
                                    stop_flag=stop)
        result = train_then_export(built.trainer, built.export)
        if groups.is_logging_rank:
            s = write_summary(out / "teacher_summary.json", result, info, layout)
            log.info("teacher: step %d, val loss %s, val ppl %s, %.0f tokens/s, checkpoint %s", result.step,
                     s.get("val_loss"), s.get("val_ppl"), result.tokens_per_s, result.checkpoint)
        return result


def teacher_setup(cfg: Config, world_size: int, source: str):
    """Before any process group: shards and tokenizer, vocab size, run folder, stop signals."""
    from ..training.trainer import StopFlag

    shards, tokenizer = ensure_shards(cfg, world_size, source)
    resolve_vocab(cfg, tokenizer)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    stop = StopFlag()
    install_stop_signals(stop)
    return shards, tokenizer, stop


def run_train_teacher(cfg: Config, original_yaml: str, source: str):
    info = validated_launch(cfg, source)
    shards, tokenizer, stop = teacher_setup(cfg, info.world_size, source)
    with distributed(info, cfg) as groups:
        return train_teacher(cfg, original_yaml, info, groups, shards, tokenizer, stop)
