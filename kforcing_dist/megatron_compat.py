"""megatron-core versions: what differs between the pinned 0.16.1 and 0.19.2, and the one bridge.

requirements.txt pins megatron-core 0.16.1 (the CPU environment the tests run in); 0.19.2 is the
newest release with a CPython 3.12 wheel, the one ``tools/gpu_wheelhouse.sh`` ships to a GPU
machine with Python 3.12. Read from both releases' source, for the APIs this package uses
(``ModelParallelConfig``, ``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``, ``VocabParallelCrossEntropy``'s static methods, ``parallel_state``):

1. Bridged here: ``import megatron.core`` 0.19 imports Triton kernels unconditionally
   (``pipeline_parallel.schedules`` -> ``transformer.moe.paged_stash`` ->
   ``transformer.moe.ops.paged_stash``, ``import triton``). CUDA builds of torch bring Triton;
   CPU-only builds do not, so the import fails there. :func:`allow_import_without_triton` stands
   in for that one module (MoE paged stash, which this package never uses) when Triton is absent.
2. No change needed: the cross-entropy static methods (``calculate_logits_max``,
   ``calculate_predicted_logits``, ``calculate_cross_entropy_loss``,
   ``prepare_gradient_calculation_operands``, ``calculate_gradients``) keep their signatures;
   0.19 adds a ``tp_group`` argument to ``vocab_parallel_cross_entropy``, which
   ``model/loss.py`` does not call (it passes its group explicitly already).
3. No change needed: the linears and the embedding gain "GTP" weight sharding, looked up from
   ``parallel_state`` with ``check_initialized=False``; the group is None or of size 1 unless
   ``initialize_model_parallel(gtp_remat_size>1)``, so they behave as before. The embedding skips
   its all-reduce at TP 1 (same values). Parameters always carry ``tensor_model_parallel`` /
   ``partition_dim`` now (before only when initialised; this package always initialises).
4. No change needed: ``ModelParallelConfig`` drops ``moe_extended_tp`` and
   ``async_tensor_model_parallel_allreduce`` (not passed here) and adds fields that default off;
   ``initialize_model_parallel`` gains ``gtp_remat_size=1``; the data-parallel getters gain
   ``with_gtp_remat=True``, equal to the plain group when GTP is off.
5. Side effect to know: ``import megatron.core`` 0.19 replaces ``torch.storage._load_from_bytes``
   with a ``weights_only=True`` loader (plain-pickled tensors only; ``torch.save`` / ``torch.load``
   files, which checkpoints use, do not go through it).

Checked on CPU (Python 3.11, torch 2.13) by running the model, tensor-parallel and distillation
tests and the teacher CLI end to end against 0.19.2's pure-Python sources (its one compiled
module, the dataset helpers, is not used); not yet on a GPU with Python 3.12.
"""

from __future__ import annotations

import importlib.util
import sys
import types

PAGED_STASH_KERNELS = "megatron.core.transformer.moe.ops.paged_stash"


def _needs_triton(*args, **kwargs):
    raise RuntimeError("megatron-core's MoE paged stash needs Triton (a CUDA build of torch brings it)")


def allow_import_without_triton() -> bool:
    """Let ``import megatron.core`` (0.19+) succeed without Triton; True when the stand-in is used.

    Call before the first megatron import. Does nothing when Triton is importable or the
    stand-in is already registered (idempotent).
    """
    if PAGED_STASH_KERNELS in sys.modules:
        return isinstance(sys.modules[PAGED_STASH_KERNELS], _StandIn)
    if importlib.util.find_spec("triton") is not None:
        return False
    stand_in = _StandIn(PAGED_STASH_KERNELS, "Stand-in for Triton kernels absent on a CPU-only torch.")
    stand_in.GLOBAL_BLOCK_SIZE = 1024  # the value upstream defines (imported by name, never used here)
    stand_in.paged_stash_copy_kernel = stand_in.paged_stash_pop_kernel = _needs_triton
    sys.modules[PAGED_STASH_KERNELS] = stand_in
    return True


class _StandIn(types.ModuleType):
    """Marks the module registered by :func:`allow_import_without_triton`."""
