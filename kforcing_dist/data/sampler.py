"""Deterministic, resumable batches of token windows for training and fixed batches for validation.

A split's token stream is cut into non-overlapping windows: window ``i`` is tokens
``[i * seq_len, i * seq_len + seq_len + 1)`` (the extra token gives the last label; inputs are
``w[:-1]``, labels ``w[1:]``). Each epoch visits the windows in a permutation seeded by
``(seed, epoch)``; one micro-step consumes a global batch of ``micro_batch_size * dp_size``
windows, of which data-parallel rank ``r`` takes the ``r``-th slice. The windows left over at the
end of an epoch (fewer than a global batch) are skipped, so every rank does the same number of
steps. The state is just (epoch, position), so a resumed run continues with exactly the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from .errors import DataError

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many windows of ``seq_len + 1`` tokens start at multiples of ``seq_len`` in ``num_tokens`` tokens."""
    return max(0, (num_tokens - 1) // seq_len)


def _gather(dataset, windows: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = np.stack([dataset.window(int(w) * seq_len, seq_len + 1) for w in windows]).astype(np.int64)
    return torch.from_numpy(rows)


def _describe(dataset) -> str:
    where = getattr(dataset, "shards_dir", None)
    split = getattr(dataset, "split", None)
    return f"split '{split}' of {where}" if where is not None else "the dataset"


class TokenSampler:
    """Training batches ``[micro_batch_size, seq_len + 1]`` for one data-parallel rank."""

    def __init__(self, dataset, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1234):
        if seq_len <= 0 or micro_batch_size <= 0:
            raise DataError(f"train.seq_len ({seq_len}) and train.micro_batch_size ({micro_batch_size}) must be "
                            f"positive; set them to e.g. 256 and 8.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.global_batch = self.micro_batch_size * self.dp_size
        self.num_windows = num_windows(len(dataset), self.seq_len)
        if self.num_windows < self.global_batch:
            raise DataError(
                f"{_describe(dataset)} has {len(dataset)} tokens, i.e. {self.num_windows} windows of "
                f"{self.seq_len + 1} tokens, but one global batch needs {self.global_batch} "
                f"(micro_batch_size {self.micro_batch_size} x {self.dp_size} data-parallel ranks); use more data "
                f"(data.builtin_min_bytes, data.paths) or lower train.seq_len / train.micro_batch_size.")
        self.steps_per_epoch = self.num_windows // self.global_batch
        self.epoch = 0
        self.position = 0  # micro-steps taken in the current epoch
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_windows(self) -> np.ndarray:
        """The window indices of this rank's next micro-batch (advances the state)."""
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        perm = self._permutation(self.epoch)
        first = self.position * self.global_batch + self.dp_rank * self.micro_batch_size
        self.position += 1
        return perm[first:first + self.micro_batch_size]

    def next_batch(self) -> torch.Tensor:
        """The next micro-batch, a LongTensor ``[micro_batch_size, seq_len + 1]``."""
        return _gather(self.dataset, self.next_windows(), self.seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the data and batch geometry must be those it was saved with."""
        for name in ("seed", "seq_len", "global_batch", "num_windows"):
            if int(state.get(name, -1)) != getattr(self, name):
                raise DataError(
                    f"cannot resume the data sampler: the checkpoint has {name}={state.get(name)} but this run has "
                    f"{name}={getattr(self, name)}; resume with the same data, data.seed, train.seq_len and "
                    f"global batch (micro_batch_size x data-parallel size), or start a new output_dir.")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def valid_batches(dataset, seq_len: int, batch_size: int, num_batches: int, dp_rank: int = 0,
                  dp_size: int = 1) -> Iterator[torch.Tensor]:
    """The fixed validation batches ``[batch_size, seq_len + 1]`` of this rank (the same every time).

    Windows are taken in stream order; global batch ``b`` is windows ``[b*G, (b+1)*G)`` with
    ``G = batch_size * dp_size`` and rank ``r`` takes its ``r``-th slice. When the split is too
    small for ``num_batches``, fewer batches (the same number on every rank) are yielded.
    """
    if seq_len <= 0 or batch_size <= 0 or num_batches <= 0:
        raise DataError(f"validation needs positive seq_len ({seq_len}), batch size ({batch_size}) and "
                        f"train.eval_batches ({num_batches}).")
    g = batch_size * dp_size
    available = num_windows(len(dataset), seq_len) // g
    if available == 0:
        raise DataError(
            f"{_describe(dataset)} has {len(dataset)} tokens, fewer than one validation batch of {g} windows of "
            f"{seq_len + 1} tokens; raise data.valid_fraction or lower train.seq_len / train.micro_batch_size.")
    if available < num_batches:
        logger.warning("%s holds only %d validation batches; using those instead of %d", _describe(dataset),
                       available, num_batches)
    for b in range(min(num_batches, available)):
        first = b * g + dp_rank * batch_size
        yield _gather(dataset, np.arange(first, first + batch_size), seq_len)
