"""megatron_compat: without Triton (a CPU-only torch), megatron-core 0.19's unconditional import
of its MoE paged-stash Triton kernels is stood in for, and the stand-in refuses to run."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from kforcing_dist.megatron_compat import PAGED_STASH_KERNELS, allow_import_without_triton


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None,
                    reason="Triton is installed: the real kernels are imported")
def test_stand_in_registered_once_and_refuses_to_run():
    assert allow_import_without_triton() and allow_import_without_triton()  # idempotent
    stand_in = sys.modules[PAGED_STASH_KERNELS]
    assert stand_in.GLOBAL_BLOCK_SIZE == 1024
    with pytest.raises(RuntimeError, match="needs Triton"):
        stand_in.paged_stash_copy_kernel()
    with pytest.raises(RuntimeError, match="needs Triton"):
        stand_in.paged_stash_pop_kernel()
