"""The trainer: one DeepSpeed engine, one data sampler and a task; steps, validation, the loop.

:class:`LMTrainer` trains a model under a DeepSpeed engine driven by a :class:`~.task.Task` (the
teacher's :class:`~.task.LMTask` or a distillation stage's). Its state (engine = model + optimizer +
LR schedule; sampler position; step counters) is saved and restored by a
:class:`~.checkpointer.Checkpointer`, so a resumed run continues exactly where the interrupted one
stopped. Stop requests (signals, a wall-clock budget) are agreed across ranks at a step boundary,
then every rank saves and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..config import Config, Layout
from ..parallel.groups import ParallelGroups, any_rank
from . import checkpoint as ckpt
from .checkpointer import Checkpointer
from .engine import build_engine, resolve_precision
from .metrics import MetricsWriter, read_log
from .task import Task

log = logging.getLogger("kforcing_dist")


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


class LMTrainer:
    """Trains a model on a token sampler under a DeepSpeed engine, driven by a task.

    ``task`` computes each micro-batch's loss and metrics. ``valid_batches`` is a callable returning
    a fresh iterator of the fixed validation micro-batches for this rank. ``extra_metadata`` and
    ``save_extras``: see :class:`~.checkpointer.Checkpointer`.
    """

    def __init__(self, cfg: Config, original_yaml: str, groups: ParallelGroups, layout: Layout,
                 model: torch.nn.Module, task: Task, sampler, valid_batches: Callable,
                 output_dir: Path, extra_metadata: dict, save_extras: Callable[[Path], None] | None = None,
                 stop_flag: StopFlag | None = None):
        self.cfg, self.groups, self.layout = cfg, groups, layout
        self.task, self.sampler, self.valid_batches = task, sampler, valid_batches
        self.kind = task.kind
        self.output_dir = Path(output_dir)
        self.stop_flag = stop_flag or StopFlag()
        precision = resolve_precision(cfg.train.precision, groups.device, cfg.parallel.zero_stage)
        self.pipelined = layout.pp > 1
        if self.pipelined:
            # a DeepSpeed pipeline computes the loss on its last stage with the module's loss_fn
            model.loss_fn = task.pipe_loss
        self.engine = build_engine(model.to(groups.device), cfg, layout, groups, precision, task.lr_scales)
        self.checkpointer = Checkpointer(cfg, original_yaml, groups, layout, self.engine, self.kind, precision,
                                         self.output_dir, extra_metadata, save_extras)
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = layout.global_batch_size * cfg.train.seq_len
        self.is_logger = groups.is_logging_rank
        self.metrics = MetricsWriter(self.output_dir, self.is_logger, cfg.logging.tensorboard)
        self._start_time = time.time()

    # ----------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Save the engine and this trainer's state as ``checkpoints/step-N`` (all ranks call)."""
        return self.checkpointer.save(self.step, self.tokens_seen, self.sampler.state_dict())

    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint under the run folder, if any (see
        :meth:`Checkpointer.resume`). The metrics log is cut back to the resumed step, so replayed
        steps appear once."""
        resumed = self.checkpointer.resume()
        if resumed is None:
            self.metrics.truncate_after(0)  # no checkpoint: this run starts at step 0
            return None
        path, state = resumed
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.sampler.load_state_dict(state["sampler"])
        self.metrics.truncate_after(self.step)
        if self.is_logger:
            log.info("resumed from %s (step %d)", path, self.step)
        return path

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

    def _pipe_train_records(self, batches: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        """One optimizer step of a pipeline engine: all micro-batches through ``train_batch``.

        Per-micro-batch metrics exist on the last stage; other stages record the mean loss
        (DeepSpeed broadcasts it), which is all they log or check.
        """
        batches = [b.to(self.groups.device) for b in batches]
        self.task.records = []
        micro = self.task.pipe_micro_batches(batches, self.step)
        self.engine.reset_activation_shape()
        loss = self.engine.train_batch(iter(micro))
        return self.task.records if self.engine.is_last_stage() else [{"loss": float(loss)}]

    def next_batches(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next optimizer step, from the sampler."""
        return [self.sampler.next_batch() for _ in range(self.layout.grad_accum)]

    def train_step(self, batches: Sequence[torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's ``layout.grad_accum`` micro-batches; advances the step
        and tokens-seen counters and returns the loss and the task's metrics, averaged over the
        data-parallel ranks (every rank gets the same numbers)."""
        if len(batches) != self.layout.grad_accum:
            raise ValueError(f"an optimizer step takes {self.layout.grad_accum} micro-batches, got {len(batches)}")
        if self.pipelined:
            records = self._pipe_train_records(batches)
        else:
            records = [self._micro_step(batch, m) for m, batch in enumerate(batches)]
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return self._dp_mean(self._mean(records))

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

    def train(self, after_step: Callable[[int], None] | None = None) -> TrainResult:
        """Train to ``train.max_steps`` (or a stop request), logging, validating and saving on the
        way. ``after_step(step)`` runs once each step is done and any checkpoint of it saved (the
        app's test-only crash injection)."""
        t = self.cfg.train
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
            scalars = self.train_step(self.next_batches())
            window_tokens += self.tokens_per_step
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
            if after_step is not None:
                after_step(self.step)
            if stop:
                stopped = True
                if self.is_logger:
                    log.warning("stopping at step %d (%s); checkpoint saved, rerun the same command to resume",
                                self.step, self.stop_flag.reason or "signal")
                break
        if bar is not None:
            bar.close()
        if last_ckpt is None:  # resumed at max_steps: nothing to do, point at the last checkpoint
            last_ckpt = ckpt.latest_complete(self.checkpointer.root)
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
