"""The real trainer (``LMTrainer.train_step``) on fixed global batches, for the parity tests.

The parallel-equivalence tests drive the trainer itself, not a loop of their own, so its
micro-batch split, pipeline step, data-parallel averaging and checkpoints are what they check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


class GlobalOrderSampler:
    """Global batches ``batch_of(step)`` (``global_batch`` rows each), every rank reading its share
    in the real sampler's global order (micro-step m of data-parallel rank r: rows
    ``(m * dp + r) * micro`` onwards), with the real sampler's state_dict (the position counts
    global batches), so a resumed trainer reads the next global batch."""

    def __init__(self, batch_of: Callable[[int], torch.Tensor], dp_rank: int, dp: int, grad_accum: int, micro: int):
        self.batch_of = batch_of
        self.dp_rank, self.dp, self.grad_accum, self.micro = dp_rank, dp, grad_accum, micro
        self.micro_index = 0

    def next_batch(self) -> torch.Tensor:
        step, m = divmod(self.micro_index, self.grad_accum)
        self.micro_index += 1
        batch = self.batch_of(step)
        start = (m * self.dp + self.dp_rank) * self.micro
        return batch[start:start + self.micro]

    @property
    def global_batch(self) -> int:
        return self.micro * self.dp * self.grad_accum

    def state_dict(self) -> dict:
        return {"position": self.micro_index // self.grad_accum, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        assert state["global_batch"] == self.global_batch
        self.micro_index = state["position"] * self.grad_accum


def real_trainer(cfg, text: str, groups, layout, model, task, batch_of: Callable[[int], torch.Tensor], out: Path,
                 padded: int):
    """An LMTrainer (the apps' class) over ``batch_of``'s global batches, writing into ``out``."""
    from kforcing_dist.training.trainer import LMTrainer

    sampler = GlobalOrderSampler(batch_of, groups.dp_rank, layout.dp, layout.grad_accum, layout.micro_batch_size)
    return LMTrainer(cfg, text, groups, layout, model, task, sampler, lambda: iter(()), out,
                     extra_metadata={"padded_vocab_size": padded})
