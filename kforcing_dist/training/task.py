"""What a trainer task provides (the :class:`Task` protocol) and the teacher's task, :class:`LMTask`.

The trainer is the same for the AR teacher and every distillation stage; a task turns micro-batches
of tokens into (loss, metrics). The distillation stages' task is ``distill.task.DistillTask``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    """What :class:`~.trainer.LMTrainer` asks of a task.

    ``kind`` names the model in checkpoints (teacher, pflm-kN) and must match on resume;
    ``lr_scales`` maps parameter-name prefixes to learning-rate multipliers (None: one LR).
    ``step``/``micro`` let a task derive its noise from the position in training, so a resumed run
    draws exactly the same noise. With pipeline parallelism the engine pulls (inputs, labels) per
    micro-batch from ``pipe_micro_batches``, the loss runs on the last stage (``pipe_loss``, which
    appends each micro-batch's scalars to ``records``).
    """

    kind: str
    lr_scales: dict[str, float] | None
    records: list[dict[str, float]]

    def train_loss(self, engine, batch: torch.Tensor, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of training micro-batch ``micro`` of optimizer step ``step``."""

    def eval_loss(self, engine, batch: torch.Tensor, index: int) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of validation batch ``index``."""

    def pipe_micro_batches(self, batches: list[torch.Tensor], step: int | None) -> list[tuple]:
        """The pipeline engine's (inputs, labels) per micro-batch; ``step`` None: validation."""

    def pipe_loss(self, outputs: torch.Tensor, labels) -> torch.Tensor:
        """The loss of one micro-batch on the last pipeline stage (records its scalars)."""


class LMTask:
    """Next-token prediction: the AR teacher's objective (see :class:`Task`)."""

    kind = "teacher"
    lr_scales = None

    def __init__(self, tp_group):
        self.tp_group = tp_group
        self.records: list[dict[str, float]] = []  # pipeline: per-micro-batch scalars (last stage)

    def train_loss(self, engine, batch: torch.Tensor, step: int, micro: int):
        from ..model.loss import lm_loss

        return lm_loss(engine(batch[:, :-1]), batch[:, 1:], self.tp_group), {}

    def eval_loss(self, engine, batch: torch.Tensor, index: int):
        return self.train_loss(engine, batch, -1, index)

    def pipe_micro_batches(self, batches: list[torch.Tensor], step: int | None) -> list[tuple]:
        return [(b[:, :-1], b[:, 1:]) for b in batches]

    def pipe_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from ..model.loss import lm_loss

        loss = lm_loss(logits, labels, self.tp_group)
        self.records.append({"loss": loss.item()})
        return loss
