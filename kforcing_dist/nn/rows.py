"""Row selection along a sequence dimension: a slice, or a [b, r] index per sequence.

Both the training model (the last layer run on the rows that are read: a student's window rows,
a teacher's head rows) and the decoder (the last layer run on a step's output rows) take rows
this way, views for a slice and one gather for an index.
"""

from __future__ import annotations

from typing import Union

import torch


def take_rows(x: torch.Tensor, rows: Union[slice, torch.Tensor], dim: int) -> torch.Tensor:
    """The rows ``rows`` (a slice, or a [b, r] index per sequence) of ``x`` along ``dim`` (x is
    [b, ...] with the positions on ``dim``; a broadcast batch dimension must be expanded first)."""
    if isinstance(rows, slice):
        return x[(slice(None),) * dim + (rows,)]
    shape = [1] * x.dim()
    shape[0], shape[dim] = rows.shape
    return x.gather(dim, rows.view(shape).expand(*x.shape[:dim], rows.shape[1], *x.shape[dim + 1:]))
