"""Every CPU-only patch of megatron-core and DeepSpeed, in one place.

Applied by :func:`apply_cpu_patches` only when CUDA is absent; on a GPU machine this
module changes nothing. Each patch names the upstream behaviour it works around
(each was measured on a 2-core CPU machine with gloo; the comments below say what breaks without it):

1. ``torch.cuda.current_device`` -> the CPU device. megatron-core allocates gather and
   scatter buffers with ``device=torch.cuda.current_device()`` (tensor_parallel/layers.py,
   mappings.py, utils.py).
2. ``torch.cuda.synchronize`` -> no-op. ``dist_checkpointing`` and DeepSpeed timers call it.
3. DeepSpeed's ``build_shm_op`` -> no-op. Its first ``init_distributed`` otherwise compiles a
   shared-memory comm extension (20-48 s) that gloo does not need.
4. megatron-core pipeline schedules create tensors with ``device="cuda"``; the patch
   redirects ``torch.cuda.current_device`` (1) which they use for p2p buffers.

Differences between megatron-core versions (0.16.1 pinned, 0.19.2 on Python 3.12) and their one
bridge (importing 0.19 without Triton) live in ``kforcing_dist/megatron_compat.py``.
"""

from __future__ import annotations

import sys

import torch

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_patches() -> bool:
    """Apply the patches once if CUDA is absent. Returns True when they are active."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    try:
        import deepspeed.comm.torch  # noqa: F401 (imports the module object patched below)

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    except ImportError:  # the decoder runs without DeepSpeed installed
        pass
    _APPLIED = True
    return True
