"""The teacher trainer: step, validate, save, resume, close.

A class that owns one DeepSpeed engine and one data sampler and saves/restores all of its
state (engine = model + optimizer + LR schedule; sampler position; step counters), so a
resumed run continues exactly where the interrupted one stopped. Stop requests (signals, a
wall-clock budget) are agreed across ranks at a step boundary, then every rank saves and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import Config, Layout, config_to_yaml
from ..fsio import write_json_atomic
from ..parallel.groups import ParallelGroups, any_rank
from . import checkpoint as ckpt
from .engine import build_engine, resolve_precision
from .metrics import MetricsWriter, read_log

log = logging.getLogger("kforcing_dist")

# Test-only fault injection: exit abruptly (no save, no clean-up) right after this step, to
# prove that a crashed run resumes exactly. Never set in normal use.
CRASH_ENV = "KFORCING_DIST_CRASH_AFTER_STEP"


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped_early: bool
    last_loss: float
    val: dict[str, float] | None  # validation scalars at the last evaluation (val_loss, val_ppl, ...)
    tokens_per_s: float
    checkpoint: Path | None


class StopFlag:
    """Set by a signal handler (app side); read by the trainer at step boundaries."""

    def __init__(self):
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, reason


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("deepspeed", "megatron-core"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class LMTask:
    """Next-token prediction: the AR teacher's objective.

    A task turns one micro-batch of tokens into (loss, metrics); the trainer is the same for
    the teacher and every distillation stage. ``step``/``micro`` let a task derive its noise
    from the position in training (so a resumed run draws exactly the same noise).
    """

    kind = "teacher"

    def __init__(self, tp_group):
        self.tp_group = tp_group
        self.records: list[dict[str, float]] = []  # pipeline: per-micro-batch scalars (last stage)

    def train_loss(self, engine, batch: torch.Tensor, step: int, micro: int):
        from ..model.loss import lm_loss

        return lm_loss(engine(batch[:, :-1]), batch[:, 1:], self.tp_group), {}

    def eval_loss(self, engine, batch: torch.Tensor, index: int):
        return self.train_loss(engine, batch, -1, index)

    # pipeline parallelism: the engine pulls (inputs, labels) per micro-batch; the loss runs on
    # the last stage and appends each micro-batch's scalars to ``records``
    def pipe_micro_batches(self, batches: list[torch.Tensor], step: int | None) -> list[tuple]:
        return [(b[:, :-1], b[:, 1:]) for b in batches]

    def pipe_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from ..model.loss import lm_loss

        loss = lm_loss(logits, labels, self.tp_group)
        self.records.append({"loss": loss.item()})
        return loss


class LMTrainer:
    """Trains a model on a token sampler under a DeepSpeed engine, driven by a task.

    ``task`` (e.g. :class:`LMTask`) computes each micro-batch's loss and metrics.
    ``valid_batches`` is a callable returning a fresh iterator of the fixed validation
    micro-batches for this rank. ``load_universal``: the engine loads DeepSpeed universal checkpoints
    (only ``convert reshard`` sets it, to carry the optimizer across a data-parallel change).
    """

    def __init__(self, cfg: Config, original_yaml: str, groups: ParallelGroups, layout: Layout,
                 model: torch.nn.Module, task, sampler, valid_batches: Callable,
                 output_dir: Path, extra_metadata: dict, save_extras: Callable[[Path], None] | None = None,
                 stop_flag: StopFlag | None = None, load_universal: bool = False):
        self.cfg, self.original_yaml, self.groups, self.layout = cfg, original_yaml, groups, layout
        self.task, self.sampler, self.valid_batches = task, sampler, valid_batches
        kind = task.kind
        self.output_dir = Path(output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.extra_metadata, self.save_extras, self.kind = extra_metadata, save_extras, kind
        self.stop_flag = stop_flag or StopFlag()
        self.precision = resolve_precision(cfg.train.precision, groups.device, cfg.parallel.zero_stage)
        self.pipelined = layout.pp > 1
        if self.pipelined:
            # a DeepSpeed pipeline computes the loss on its last stage with the module's loss_fn
            model.loss_fn = task.pipe_loss
        self.engine = build_engine(model.to(groups.device), cfg, layout, groups, self.precision,
                                   getattr(task, "lr_scales", None), load_universal)
        self.step = 0
        self.tokens_seen = 0
        self.is_logger = groups.is_logging_rank
        self.metrics = MetricsWriter(self.output_dir, self.is_logger, cfg.logging.tensorboard)
        self._start_time = time.time()

    # ----------------------------------------------------------------- state
    def _state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                           "zero_stage": self.cfg.parallel.zero_stage}}

    def save(self) -> Path:
        """Save engine + trainer state into ``checkpoints/step-N`` atomically (all ranks call).

        A part that fails on any rank (a full disk) fails the save on every rank: the temporary
        folder is removed and CheckpointError says how much space the save needed.
        """
        rank0 = self.groups.world_rank == 0
        tmp = ckpt.temp_dir_for(self.ckpt_root, self.step)
        self._save_part(lambda: ckpt.begin_save(self.ckpt_root, self.step) if rank0 else None)
        self._save_part(lambda: self.engine.save_checkpoint(str(tmp), tag="engine", save_latest=False))
        self._save_part(lambda: self._finish_save(tmp) if rank0 else None)
        return self.ckpt_root / ckpt.step_dir_name(self.step)

    def _save_part(self, write: Callable[[], object]) -> None:
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
            raise ckpt.failed_save(self.ckpt_root, self.step, cause) from cause
        raise ckpt.CheckpointError(
            f"saving checkpoint {ckpt.step_dir_name(self.step)} failed"
            + (f" on this rank ({type(cause).__name__}: {cause})" if cause else " on another rank")
            + "; rank 0 removed the partial save and reports the space it needs") from cause

    def _finish_save(self, tmp: Path) -> None:
        (tmp / "config.yaml").write_text(config_to_yaml(self.cfg))
        (tmp / "original_config.yaml").write_text(self.original_yaml)
        write_json_atomic(tmp / "trainer_state.json", self._state())
        meta = {"kind": self.kind, "format": "kforcing-dist-train/1", "precision": self.precision,
                "versions": _versions(), "model": dataclasses.asdict(self.cfg.model),
                **self.extra_metadata, **{"layout": self._state()["layout"]}}
        write_json_atomic(tmp / "metadata.json", meta)
        if self.save_extras is not None:
            self.save_extras(tmp)
        ckpt.finish_save(self.ckpt_root, self.step, {"kind": self.kind})
        ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last)

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint under the run folder, if any.

        A checkpoint that cannot be read (a truncated engine file, a garbled JSON file) stops the
        run with CheckpointError naming the file and the previous complete checkpoint; with
        ``checkpoint.resume_fallback`` that one is loaded instead (the damaged one is marked
        DAMAGED). The metrics log is cut back to the resumed step, so replayed steps appear once.
        """
        newest_first = [path for _, path in reversed(ckpt.list_complete(self.ckpt_root))]
        if newest_first and self.cfg.checkpoint.resume == "never":
            raise ckpt.CheckpointError(
                f"{self.output_dir} already holds checkpoint {newest_first[0].name} and checkpoint.resume=never; "
                f"choose another -o/--output-dir or set checkpoint.resume=auto to continue it")
        for i, path in enumerate(newest_first):
            state, damage = self._load(path)
            if not any_rank(damage is not None, self.groups.device):
                self.step, self.tokens_seen = state["step"], state["tokens_seen"]
                self.sampler.load_state_dict(state["sampler"])
                self.metrics.truncate_after(self.step)
                if self.is_logger:
                    log.info("resumed from %s (step %d)", path, self.step)
                return path
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
        self.metrics.truncate_after(0)  # no checkpoint: this run starts at step 0
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
        mine = self._state()["layout"]
        if state["layout"] != mine:
            problems.append(f"its parallel layout {state['layout']} differs from this run's {mine}")
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

    # ------------------------------------------------------------- training
    def _agree_stop(self) -> bool:
        """All ranks agree (MAX) whether to stop: a signal on any rank, or the wall-clock budget."""
        budget = self.cfg.train.time_budget_minutes
        over_budget = budget > 0 and (time.time() - self._start_time) > budget * 60
        if over_budget and not self.stop_flag.requested:
            self.stop_flag.request("time budget")
        return any_rank(self.stop_flag.requested, self.groups.device)

    def _dp_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over the data-parallel ranks (every rank gets the same numbers)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        if self.groups.dp_size > 1:
            dist.all_reduce(t, group=self.groups.dp_group)
            t /= self.groups.dp_size
        return dict(zip(keys, t.tolist()))

    @staticmethod
    def _mean(records: list[dict[str, float]]) -> dict[str, float]:
        return {k: sum(r[k] for r in records) / len(records) for k in records[0]}

    def _micro_step(self, batch: torch.Tensor, micro: int) -> dict[str, float]:
        loss, metrics = self.task.train_loss(self.engine, batch.to(self.groups.device), self.step, micro)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}

    def _pipe_train_step(self) -> list[dict[str, float]]:
        """One optimizer step of a pipeline engine: all micro-batches through ``train_batch``.

        Per-micro-batch metrics exist on the last stage; other stages record the mean loss
        (DeepSpeed broadcasts it), which is all they log or check.
        """
        batches = [self.sampler.next_batch().to(self.groups.device) for _ in range(self.layout.grad_accum)]
        self.task.records = []
        micro = self.task.pipe_micro_batches(batches, self.step)
        self.engine.reset_activation_shape()
        loss = self.engine.train_batch(iter(micro))
        return self.task.records if self.engine.is_last_stage() else [{"loss": float(loss)}]

    def _pipe_validate(self) -> list[dict[str, float]]:
        batches = [b.to(self.groups.device) for b in self.valid_batches()]
        self.task.records = []
        micro = self.task.pipe_micro_batches(batches, None)
        self.engine.reset_activation_shape()
        self.engine.total_loss = None  # DeepSpeed never resets it in eval_batch
        loss = self.engine.eval_batch(iter(micro), num_micro_batches=len(micro))
        self.engine.reset_activation_shape()
        return self.task.records if self.engine.is_last_stage() else [{"loss": float(loss)}]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss and task metrics over the fixed validation batches (``val_`` prefixed)."""
        self.engine.eval()
        if self.pipelined:
            records = self._pipe_validate()
        else:
            records = []
            for i, batch in enumerate(self.valid_batches()):
                loss, metrics = self.task.eval_loss(self.engine, batch.to(self.groups.device), i)
                records.append({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}})
        self.engine.train()
        out = self._dp_mean(self._mean(records))
        out = {f"val_{k}": v for k, v in out.items()}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        return out

    def train(self) -> TrainResult:
        t = self.cfg.train
        tokens_per_step = self.layout.global_batch_size * t.seq_len
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        bar = None
        if self.is_logger and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=f"train {self.kind}", unit="step",
                       dynamic_ncols=True)
        last_loss, val, tok_s, stopped = float("nan"), None, 0.0, False
        last_ckpt = None
        window_t, window_tokens = time.time(), 0
        self.engine.train()
        while self.step < t.max_steps:
            if self.pipelined:
                records = self._pipe_train_step()
            else:
                records = [self._micro_step(self.sampler.next_batch(), m) for m in range(self.layout.grad_accum)]
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            scalars = self._dp_mean(self._mean(records))
            last_loss = scalars["loss"]
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {self.step}; lower train.lr or check data")
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                now = time.time()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                gn = self.engine.get_global_grad_norm()
                self.metrics.write(self.step, {
                    **scalars, "lr": self.engine.get_lr()[0],
                    "grad_norm": float(gn) if gn is not None else float("nan"),
                    "tokens_per_s": tok_s, "tokens_seen": self.tokens_seen})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}")
            if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.max_steps:
                val = self.validate()
                self.metrics.write(self.step, val, tag="valid")
                if self.is_logger:
                    log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
            stop = self._agree_stop()
            if self.step % self.cfg.checkpoint.save_interval == 0 or self.step == t.max_steps or stop:
                last_ckpt = self.save()
            if crash_after and self.step == crash_after:
                os._exit(17)
            if stop:
                stopped = True
                if self.is_logger:
                    log.warning("stopping at step %d (%s); checkpoint saved, rerun the same command to resume",
                                self.step, self.stop_flag.reason or "signal")
                break
        if bar is not None:
            bar.close()
        if last_ckpt is None:  # resumed at max_steps: nothing to do, point at the last checkpoint
            last_ckpt = ckpt.latest_complete(self.ckpt_root)
            last_loss, val, tok_s = self._logged_figures(last_loss, val, tok_s)
        return TrainResult(self.step, stopped, last_loss, val, tok_s, last_ckpt)

    def _logged_figures(self, last_loss: float, val: dict | None, tok_s: float):
        """The training loss, validation figures and tokens/s logged at the current step by the
        run that got there (a run resumed at max_steps trains nothing, but its summary keeps them)."""
        train = [r for r in read_log(self.output_dir, "train") if r["step"] == self.step]
        valid = [r for r in read_log(self.output_dir, "valid") if r["step"] == self.step]
        if train:
            last_loss, tok_s = train[-1]["loss"], train[-1].get("tokens_per_s", tok_s)
        if valid:
            val = {k: v for k, v in valid[-1].items() if k.startswith("val_")}
        return last_loss, val, tok_s

    def close(self) -> None:
        self.metrics.close()
