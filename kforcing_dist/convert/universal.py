"""DeepSpeed universal checkpoints of a training checkpoint: the Adam moments across a data-parallel change.

ZeRO-1/2/3 split the optimizer state (fp32 master weights, ``exp_avg``, ``exp_avg_sq``, ``step``)
into one flat partition per data-parallel rank, so files written at DP=2 do not fit DP=1 or DP=4.
DeepSpeed's own ``ds_to_universal`` rewrites them as one file per parameter and state (``zero/<name>/
exp_avg.pt`` ...), and an engine configured with ``checkpoint.load_universal`` re-partitions those for
its own DP size as it loads. Nothing here does ZeRO partition arithmetic: this module vets the files,
runs DeepSpeed's converter, and turns its failures into a CheckpointError.

The conversion keeps the tensor-parallel split as it is (same TP size on both sides): under ZeRO-1/2
DeepSpeed concatenates the TP ranks' pieces and the loading engine cuts them back apart along the
same axis (measured exact at TP 2). Its ZeRO-3 loader re-splits TP shards only for DeepSpeed's own
AutoTP layers, so ZeRO-3 goes through here only at TP 1; TP and PP changes never do (see
:func:`kforcing_dist.convert.reshard.optimizer_carry`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from ..training.checkpoint import CheckpointError
from .safeload import load_torch_file

# DeepSpeed's engine reads <load_dir>/<tag>/...; the converted folder keeps the trainer's tag
TAG = "engine"


def deepspeed_files(engine_dir: Path) -> list[Path]:
    """The engine folder's DeepSpeed state files (model and optimizer states of every rank)."""
    return sorted(p for p in engine_dir.iterdir() if p.name.endswith(("_model_states.pt", "_optim_states.pt")))


def to_universal(engine_dir: Path, out: Path) -> Path:
    """Write DeepSpeed's universal checkpoint of ``engine_dir`` (a ZeRO-1/2/3 engine folder) into
    ``out/engine``; load it with ``engine.load_checkpoint(out, tag="engine")`` from an engine built with
    ``load_universal=True``. Returns ``out``."""
    from deepspeed.checkpoint import ds_to_universal

    engine_dir, out = Path(engine_dir), Path(out)
    files = deepspeed_files(engine_dir)
    if not any(p.name.endswith("_optim_states.pt") for p in files):
        raise CheckpointError(f"{engine_dir} holds no ZeRO optimizer files (*_optim_states.pt); the checkpoint "
                              f"is incomplete or was not trained with ZeRO")
    source = out / "source"
    source.mkdir(parents=True)
    for f in files:
        # the restricted unpickler vets every file before DeepSpeed's converter (which unpickles freely) reads it
        state = load_torch_file(f, deepspeed_objects=True, mmap=True)
        module = state.get("module") if isinstance(state, dict) else None
        if isinstance(module, dict) and not all(isinstance(v, torch.Tensor) for v in module.values()):
            # megatron-core layers put ``_extra_state`` (None) in their state dicts; DeepSpeed's converter
            # takes every module entry for a weight (``.float()``), so it reads a copy without them
            state["module"] = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
            torch.save(state, source / f.name)
        else:
            os.symlink(f.resolve(), source / f.name)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(out / TAG),
                              # in-process: worker pools would re-import torch on a busy machine for tiny gains
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # ZeRO-1/2 files lack the universal-checkpoint info block that Megatron-DeepSpeed
                              # writes; DeepSpeed's option adds its version stamp (no TP patterns: see above)
                              inject_missing_state=True)
    try:
        # DeepSpeed prints its progress on stdout: keep stdout for the command's own result
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal.main(args)
    except (AssertionError, ValueError, KeyError, RuntimeError, FileNotFoundError, NotImplementedError) as e:
        raise CheckpointError(f"DeepSpeed could not convert {engine_dir} to a universal checkpoint "
                              f"({type(e).__name__}: {e}); the checkpoint is damaged or of an unsupported "
                              f"kind") from None
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return out
