"""CUDA-graph decode steps: each step shape is captured once and replayed.

A decode step launches a few hundred small kernels; at small batch the GPU waits on the Python
and launch overhead rather than on memory. :class:`GraphStepper` captures
:meth:`DecoderLM.step_on_device` with static shapes (attention over the whole cache capacity,
masked past each sequence's end) once per (chunk width, noise slots, output) and replays it:
inputs are copied into the graph's static buffers, outputs read from its static output. Every
PFLM step has the same shape (k tokens fed back + k noise slots), so a run replays one or two
graphs. Without CUDA (``capture=False``) the same static-buffer code runs eagerly, which is
what the CPU tests check against the plain step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .errors import DecodeError
from .model import DecoderLM, KVCache


@dataclasses.dataclass
class _Entry:
    ids: Optional[torch.Tensor]
    n: torch.Tensor
    u: Optional[torch.Tensor]
    out: Optional[torch.Tensor] = None
    graph: Optional["torch.cuda.CUDAGraph"] = None


class GraphStepper:
    """Replays captured decode steps of ``model`` on ``cache`` (the cache must not be
    reallocated while the stepper lives; ``rewind``/``reset`` are fine: in place). The graphs
    hold the weights they were captured with: build a new stepper after changing weights."""

    def __init__(self, model: DecoderLM, cache: KVCache, *, tau: float = 1.0,
                 capture: Optional[bool] = None):
        self.model, self.cache = model, cache
        self.device = cache.device
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise DecodeError("CUDA graphs need the model and cache on a CUDA device")
        # a device tensor: creating it from a float inside a capture would be a host copy
        self.tau = torch.tensor(float(tau), dtype=torch.float64, device=self.device)
        self.entries: dict[tuple, _Entry] = {}

    def _run(self, e: _Entry, output: str):
        return self.model.step_on_device(self.cache, e.ids, e.n, e.u, self.tau,
                                         self.cache.capacity, output)

    def _build(self, key: tuple) -> _Entry:
        c, m, output = key
        b, dev = self.cache.batch, self.device
        e = _Entry(ids=torch.zeros(b, c, dtype=torch.long, device=dev) if c else None,
                   n=torch.zeros(b, dtype=torch.long, device=dev),
                   u=torch.full((b, m), 0.5, dtype=torch.float64, device=dev) if m else None)
        if not self.capture:
            return e
        # Warm up on a side stream (allocator, kernel selection, the rotary table and fused
        # q/k/v weights get built outside the graph), then capture. Both run the step for real:
        # their cache writes land in scratch past every sequence's end, and the lengths they
        # advance are put back.
        saved = self.cache.lengths.clone()
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(e, output)
                self.cache.lengths.copy_(saved)
        torch.cuda.current_stream(dev).wait_stream(stream)
        e.graph = torch.cuda.CUDAGraph()
        # each graph gets its own memory pool: steps of different shapes replay in any order
        with torch.cuda.graph(e.graph):
            e.out = self._run(e, output)
        self.cache.lengths.copy_(saved)
        return e

    def step(self, input_ids: Optional[torch.Tensor] = None, num_new=None,
             noise_u: Optional[torch.Tensor] = None,
             output: str = "auto") -> Optional[torch.Tensor]:
        """Like ``model.forward_step(cache, ..., static=True)`` (ids made by the model: no
        token-range check). The returned logits live in the graph's output buffer: use them
        before the next step."""
        cache = self.cache
        c = 0 if input_ids is None else input_ids.shape[1]
        m = 0 if noise_u is None else noise_u.shape[1]
        if output == "auto":
            output = "noise" if m else "last"
        if c + m == 0:
            raise DecodeError("step needs input_ids and/or noise_u")
        if num_new is None:
            n_host = torch.full((cache.batch,), c, dtype=torch.long)
        else:
            n_host = torch.as_tensor(num_new, dtype=torch.long).cpu().expand(cache.batch)
        need = int((cache.host_lengths + c + m).max())
        if need > cache.capacity:
            raise DecodeError(f"the step needs {need} cache slots but the cache holds "
                              f"{cache.capacity}; allocate a larger cache")
        if not self.model.rope and int((cache.host_lengths + n_host + m).max()) > \
                self.model.max_seq_len:
            raise DecodeError(f"positions past model.max_seq_len={self.model.max_seq_len}")
        key = (c, m, output)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = self._build(key)
        if c:
            e.ids.copy_(input_ids, non_blocking=True)
        e.n.copy_(n_host, non_blocking=True)
        if m:
            e.u.copy_(noise_u, non_blocking=True)
        if e.graph is not None:
            e.graph.replay()
            out = e.out
        else:
            out = self._run(e, output)
        cache.host_lengths += n_host
        return out
