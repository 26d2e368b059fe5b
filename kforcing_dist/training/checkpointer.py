"""The Checkpointer: saves one run's training state and resumes it (all ranks call it together).

A save writes the DeepSpeed engine (model + optimizer + LR schedule), the trainer's state (step,
tokens seen, data sampler position, parallel layout), the configs and the run's metadata into a
temporary folder and only then makes it a complete ``checkpoints/step-N`` (see :mod:`.checkpoint`:
marker, keep-last, failure clean-up). A resume loads the newest complete checkpoint that fits this
run (kind, layout, model, metadata), falling back past a damaged one when the config allows.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, Layout, config_to_yaml
from ..fsio import write_json_atomic
from ..parallel.groups import ParallelGroups, any_rank
from . import checkpoint as ckpt

log = logging.getLogger("kforcing_dist")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("deepspeed", "megatron-core"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class Checkpointer:
    """Saves and resumes ``engine`` plus a trainer's state under ``<run_dir>/checkpoints``.

    ``kind`` (teacher, pflm-kN) and ``extra_metadata`` go into each checkpoint's metadata.json and
    must match on resume; ``save_extras(folder)`` writes more files (the tokenizer) into a save.
    """

    def __init__(self, cfg: Config, original_yaml: str, groups: ParallelGroups, layout: Layout, engine,
                 kind: str, precision: str, run_dir: Path, extra_metadata: dict,
                 save_extras: Callable[[Path], None] | None = None):
        self.cfg, self.original_yaml, self.groups, self.engine = cfg, original_yaml, groups, engine
        self.kind, self.precision, self.extra_metadata, self.save_extras = kind, precision, extra_metadata, save_extras
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.layout = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero_stage": cfg.parallel.zero_stage}

    # ------------------------------------------------------------------ save
    def save(self, step: int, tokens_seen: int, sampler_state: dict) -> Path:
        """Save engine + trainer state into ``checkpoints/step-N`` atomically (all ranks call).

        A part that fails on any rank (a full disk) fails the save on every rank: the temporary
        folder is removed and CheckpointError says how much space the save needed.
        """
        rank0 = self.groups.world_rank == 0
        state = {"step": step, "tokens_seen": tokens_seen, "sampler": sampler_state, "layout": self.layout}
        tmp = ckpt.temp_dir_for(self.root, step)
        self._save_part(step, lambda: ckpt.begin_save(self.root, step) if rank0 else None)
        self._save_part(step, lambda: self.engine.save_checkpoint(str(tmp), tag="engine", save_latest=False))
        self._save_part(step, lambda: self._finish_save(tmp, state) if rank0 else None)
        return self.root / ckpt.step_dir_name(step)

    def _save_part(self, step: int, write: Callable[[], object]) -> None:
        """Run one part of a save on this rank, then agree with the other ranks whether every part
        succeeded (the agreement is also the barrier between the parts)."""
        cause = None
        try:
            write()
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
            cause = exc
            # without tracebacks: their frames keep the half-written file open, and its space in
            # use, while the error reports the free space
            link = exc
            while link is not None:
                link.__traceback__, link = None, link.__context__
        if not any_rank(cause is not None, self.groups.device):
            return
        if self.groups.world_rank == 0:
            raise ckpt.failed_save(self.root, step, cause) from cause
        raise ckpt.CheckpointError(
            f"saving checkpoint {ckpt.step_dir_name(step)} failed"
            + (f" on this rank ({type(cause).__name__}: {cause})" if cause else " on another rank")
            + "; rank 0 removed the partial save and reports the space it needs") from cause

    def _finish_save(self, tmp: Path, state: dict) -> None:
        (tmp / "config.yaml").write_text(config_to_yaml(self.cfg))
        (tmp / "original_config.yaml").write_text(self.original_yaml)
        write_json_atomic(tmp / "trainer_state.json", state)
        meta = {"kind": self.kind, "format": "kforcing-dist-train/1", "precision": self.precision,
                "versions": _versions(), "model": dataclasses.asdict(self.cfg.model),
                **self.extra_metadata, **{"layout": self.layout}}
        write_json_atomic(tmp / "metadata.json", meta)
        if self.save_extras is not None:
            self.save_extras(tmp)
        ckpt.finish_save(self.root, state["step"], {"kind": self.kind})
        ckpt.prune(self.root, self.cfg.checkpoint.keep_last)

    # ---------------------------------------------------------------- resume
    def resume(self) -> tuple[Path, dict] | None:
        """Load the newest complete checkpoint into the engine; (its folder, the trainer state saved
        with it: step, tokens_seen, sampler, layout), or None when there is none.

        A checkpoint that cannot be read (a truncated engine file, a garbled JSON file) stops the
        run with CheckpointError naming the file and the previous complete checkpoint; with
        ``checkpoint.resume_fallback`` that one is loaded instead (the damaged one is marked
        DAMAGED). A checkpoint that does not fit this run raises CheckpointError.
        """
        newest_first = [path for _, path in reversed(ckpt.list_complete(self.root))]
        if newest_first and self.cfg.checkpoint.resume == "never":
            raise ckpt.CheckpointError(
                f"{self.run_dir} already holds checkpoint {newest_first[0].name} and checkpoint.resume=never; "
                f"choose another -o/--output-dir or set checkpoint.resume=auto to continue it")
        for i, path in enumerate(newest_first):
            state, damage = self._load(path)
            if not any_rank(damage is not None, self.groups.device):
                return path, state
            damage = damage or "it could not be loaded on another rank"
            previous = newest_first[i + 1] if i + 1 < len(newest_first) else None
            if not self.cfg.checkpoint.resume_fallback or previous is None:
                offer = (f"resume from the previous complete checkpoint {previous.name} with --set "
                         f"checkpoint.resume_fallback=true, or delete {path}" if previous is not None else
                         f"no earlier complete checkpoint exists: restore the file, or delete {path} to start over")
                raise ckpt.CheckpointError(f"checkpoint {path} is damaged: {damage}; {offer}")
            log.warning("checkpoint %s is damaged (%s): resuming from the previous complete one, %s "
                        "(checkpoint.resume_fallback); %s is marked DAMAGED", path, damage, previous.name, path.name)
            if self.groups.world_rank == 0:
                ckpt.mark_damaged(path, damage)
        return None

    def _load(self, path: Path) -> tuple[dict | None, str | None]:
        """(trainer state, None) once ``path`` is loaded into the engine on this rank, or (None, what
        is damaged). A checkpoint that does not fit this run raises CheckpointError."""
        try:
            state = ckpt.read_json(path / "trainer_state.json", ("step", "tokens_seen", "sampler", "layout"))
            meta = ckpt.read_json(path / "metadata.json", ("kind", "model"))
        except ckpt.DamagedFile as exc:
            return None, str(exc)
        self._check_compatible(path, state, meta)
        try:
            load_path, _ = self.engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        except Exception as exc:  # noqa: BLE001 - torch/DeepSpeed raise many types for an unreadable file
            return None, ckpt.describe_engine_damage(path / "engine", exc)
        if load_path is None:
            return None, f"DeepSpeed found no engine state in {path / 'engine'}"
        return state, None

    def _check_compatible(self, path: Path, state: dict, meta: dict) -> None:
        problems = []
        if meta.get("kind") != self.kind:
            problems.append(f"it holds a {meta.get('kind')!r} model, this run trains a {self.kind!r}")
        if state["layout"] != self.layout:
            problems.append(f"its parallel layout {state['layout']} differs from this run's {self.layout}")
        if meta.get("model") != dataclasses.asdict(self.cfg.model):
            diff = {k: (v, getattr(self.cfg.model, k, None)) for k, v in (meta.get("model") or {}).items()
                    if getattr(self.cfg.model, k, None) != v}
            problems.append(f"its model config differs (checkpoint, this run): {diff}")
        for key, value in self.extra_metadata.items():
            if key in meta and meta[key] != value:
                problems.append(f"its {key} is {meta[key]!r}, this run has {value!r}")
        if problems:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: " + "; ".join(problems)
                + ". Use another -o/--output-dir, or start from a matching config.")
