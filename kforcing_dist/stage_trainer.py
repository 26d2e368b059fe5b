"""Everything one stage trains with, built in one place: the model (initialised), the frozen
models, the task, the data, the trainer and the export.

The commands (``app/teacher.py``, ``app/distill.py``) only launch, own the run folder and print;
benchmarks and tests build the same trainer here, so they time and check the real step. A
:class:`~kforcing_dist.stage.Stage` says *what* a stage reads and writes; this module turns that
into live objects inside a process group (it needs the engines and the converters, so it sits
above ``training/``, ``distill/`` and ``convert/``, beside ``stage.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch

from .config import Config, Layout
from .stage import TEACHER, Stage, StageInputs
from .training.trainer import LMTrainer, StopFlag, TrainResult

log = logging.getLogger("kforcing_dist")


def samplers(cfg: Config, shards: Path, layout: Layout, groups):
    """The training sampler and the validation-batch factory of this rank."""
    from .data.sampler import TokenSampler, valid_batches
    from .data.shards import TokenDataset

    train_ds, valid_ds = TokenDataset(shards, "train"), TokenDataset(shards, "valid")
    sampler = TokenSampler(train_ds, cfg.train.seq_len, layout.micro_batch_size, groups.dp_rank, groups.dp_size,
                           seed=cfg.data.seed)

    def valid():
        return valid_batches(valid_ds, cfg.train.seq_len, layout.micro_batch_size, cfg.train.eval_batches,
                             groups.dp_rank, groups.dp_size)

    return sampler, valid


@dataclasses.dataclass
class StageTrainer:
    """A stage's trainer and how to export its result."""

    trainer: LMTrainer
    export: Callable[[TrainResult], None]  # writes the stage's decoder folder from the trained engine


def teacher_masked_token_ids(cfg: Config) -> list[int]:
    """Tokens the teacher never emits: those of the newest complete checkpoint whose metadata.json
    reads (a resume keeps its own; a damaged one is left for the checkpointer to name, or to skip
    with checkpoint.resume_fallback), else those of the ``train.init_from`` folder (e.g. an
    imported released model's mask token, which must stay masked in the fine-tuned teacher and its
    export), else none."""
    from .decode.errors import DecodeError
    from .decode.format import read_decoder_config
    from .training.checkpoint import CheckpointError, DamagedFile, list_complete, read_json

    for _, folder in reversed(list_complete(Path(cfg.output_dir) / "checkpoints")):
        try:
            return list(read_json(folder / "metadata.json").get("masked_token_ids", []))
        except DamagedFile:
            continue
    if not cfg.train.init_from:
        return []
    try:
        return list(read_decoder_config(Path(cfg.train.init_from))["masked_token_ids"])
    except DecodeError as e:
        raise CheckpointError(f"train.init_from: {e}") from None


def teacher_model(stage: Stage, cfg: Config, groups, layout: Layout, padded: int, tokenizer,
                  masked_token_ids=()):
    """The AR teacher's model at the layout: seeded, or initialised from ``train.init_from`` when
    the run has no complete checkpoint yet (a resume keeps its own weights)."""
    from .training.checkpoint import list_complete

    torch.manual_seed(cfg.train.seed)
    model = stage.build_model(cfg.model, padded, groups, layout.pp, masked_token_ids=masked_token_ids)
    if cfg.train.init_from and not list_complete(Path(cfg.output_dir) / "checkpoints"):
        from .convert.init import init_from_decoder

        init_from_decoder(model, cfg.train.init_from, cfg.model, groups.tp_group, tokenizer)
        log.info("teacher initialised from %s", cfg.train.init_from)
    return model


def distill_models(stage: Stage, scfg: Config, src: StageInputs, groups, layout: Layout, padded: int):
    """Stage k's frozen models (the AR teacher and/or the stage-k/2 student, as the stage needs
    them) and its student, initialised from every teacher weight (stage 1: the noise encoder
    stays freshly seeded) or from the whole previous student (stage 2k)."""
    from .distill.frozen import export_weights, load_frozen
    from .model.pipeline import load_plain_state_dict

    k = stage.k
    noise, masked = src.noise, src.masked_token_ids
    teacher_stage, prev_stage = Stage(stage.cfg, TEACHER), Stage(stage.cfg, k // 2)

    def student(of: Stage):
        return of.build_model(scfg.model, padded, groups, layout.pp, noise=noise, masked_token_ids=masked)

    def ar_model():
        return teacher_stage.build_model(scfg.model, padded, groups, layout.pp,
                                         masked_token_ids=src.teacher_conf["masked_token_ids"])

    ar = load_frozen(src.teacher, ar_model, groups, scfg, layout) if stage.needs_ar_teacher else None
    prev = load_frozen(src.previous, lambda: student(prev_stage), groups, scfg, layout) \
        if stage.needs_previous_student else None
    torch.manual_seed(scfg.distill.seed)
    model = student(stage)
    init_weights = export_weights(src.init_from, padded)
    if k == 1:  # the fresh noise encoder (on the first pipeline stage only, with pp > 1)
        to_plain = getattr(model, "plain_name", lambda n: n)
        init_weights.update({to_plain(n): p.detach().cpu() for n, p in model.named_parameters()
                             if to_plain(n).startswith("noise_encoder.")})
    load_plain_state_dict(model, init_weights, groups)
    return model, ar, prev


def build_stage_trainer(stage: Stage, cfg: Config, original_yaml: str, groups, layout: Layout, shards: Path,
                        tokenizer, *, inputs: StageInputs | None = None,
                        stop_flag: StopFlag | None = None) -> StageTrainer:
    """The trainer of ``stage`` inside a process group. ``cfg`` is the stage's own config
    (:meth:`Stage.config`, vocab size resolved); ``inputs`` the resolved :meth:`Stage.inputs` of
    a distillation stage (None for the teacher)."""
    from .distill.task import DistillTask
    from .nn.sizes import pad_vocab_size
    from .training.export import export_decoder
    from .training.task import LMTask

    padded = pad_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp)
    metadata = {"tokenizer_fingerprint": tokenizer.fingerprint, "padded_vocab_size": padded}
    source: dict = {}
    if stage.is_teacher:
        masked = teacher_masked_token_ids(cfg)
        model = teacher_model(stage, cfg, groups, layout, padded, tokenizer, masked)
        sampler, valid = samplers(cfg, shards, layout, groups)
        metadata["masked_token_ids"] = masked
        task, export_dir = LMTask(groups.tp_group), Path(cfg.output_dir) / "export"
        fields = stage.export_fields(masked_token_ids=masked)
    else:
        if inputs is None:
            raise ValueError("a distillation stage's trainer needs its resolved Stage.inputs()")
        model, ar, prev = distill_models(stage, cfg, inputs, groups, layout, padded)
        sampler, valid = samplers(cfg, shards, layout, groups)
        task = DistillTask(stage.k, cfg.distill, groups, ar_teacher=ar, prev_student=prev)
        fields, export_dir = stage.export_fields(inputs.noise, inputs.masked_token_ids), stage.export_dir
        source = {"teacher": str(inputs.targets_from)}
        metadata.update(k=stage.k, cdf_order=cfg.distill.cdf_order, teacher=str(inputs.targets_from),
                        noise=inputs.noise, masked_token_ids=list(inputs.masked_token_ids))
    trainer = LMTrainer(cfg, original_yaml, groups, layout, model, task, sampler, valid, Path(cfg.output_dir),
                        extra_metadata=metadata, save_extras=lambda folder: tokenizer.save(folder / "tokenizer"),
                        stop_flag=stop_flag)

    def export(result: TrainResult) -> None:
        export_decoder(trainer.engine.module, groups, export_dir, model_cfg=cfg.model, padded_vocab_size=padded,
                       zero_stage=cfg.parallel.zero_stage, tokenizer=tokenizer, **fields,
                       source={"checkpoint": str(result.checkpoint), "step": result.step, **source})

    return StageTrainer(trainer, export)
