"""The ``convert <what>`` commands: consolidate, reshard, from-hf, from-kforcing, to-hf.

Thin functions over :mod:`kforcing_dist.convert`; each prints what it wrote, its wall time and the
process's peak memory. Only ``reshard`` starts a process group (it runs at the target layout).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from ..training.checkpoint import CheckpointError
from .runtime import setup_logging

log = logging.getLogger("kforcing_dist")


def _report(what: str, out: Path, t0: float) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{what}: wrote {out} in {time.time() - t0:.1f} s (peak memory {peak_mib:.0f} MiB)")


def run_consolidate(args) -> int:
    from ..convert.training import consolidate

    setup_logging(0)
    t0 = time.time()
    out = consolidate(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    _report("consolidate", out, t0)
    return 0


def run_reshard(args) -> int:
    """Every rank of the target job runs this (torchrun / srun at the new layout, or one process)."""
    from ..config import check, derive_layout, load_config
    from ..convert.reshard import reshard
    from ..convert.training import read_training_checkpoint
    from ..parallel.launch import resolve_launch
    from .runtime import distributed

    info = resolve_launch()
    setup_logging(info.rank)
    t0 = time.time()
    ck = read_training_checkpoint(args.checkpoint)
    cfg, _ = load_config(ck.path / "config.yaml", args.overrides, args.output_dir)
    original = (ck.path / "original_config.yaml").read_text() if (ck.path / "original_config.yaml").is_file() else ""
    check(cfg, info.world_size, source=f"{ck.path / 'config.yaml'} + --set")
    with distributed(info, cfg) as groups:
        path, how, reason = reshard(ck.path, cfg, original, groups, derive_layout(cfg, info.world_size))
    if info.rank == 0:
        if reason:
            print(f"reshard: the optimizer state (Adam moments) is RESET: {reason}. Weights, step, LR schedule "
                  f"and data position are carried; metadata.json records optimizer_reset.")
        elif how == "universal":
            print("reshard: the optimizer state (fp32 master weights, Adam moments and step) was carried over "
                  "through a DeepSpeed universal checkpoint, re-partitioned for the new data-parallel size")
        else:
            print("reshard: the optimizer state was carried over by DeepSpeed unchanged")
        _report("reshard", path, t0)
    return 0


def _hf_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    from ..data.errors import DataError
    from ..data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(folder, kind="hf")
    except DataError as e:
        raise CheckpointError(f"the tokenizer in {folder} cannot be loaded: {e}") from None


def run_from_hf(args) -> int:
    from ..convert.hf import import_hf
    from ..decode.format import save_decoder

    setup_logging(0)
    t0 = time.time()
    folder = Path(args.model)
    model, padded, weights, hf_cfg = import_hf(folder, args.make_vocab_size_divisible_by)
    tokenizer = _hf_tokenizer(folder)
    eos = hf_cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    out = save_decoder(args.out, kind="ar", model_config=model, padded_vocab_size=padded, state_dict=weights,
                       tokenizer=tokenizer, eos_id=eos if isinstance(eos, int) and eos < model["vocab_size"] else None,
                       dtype=args.dtype, overwrite=args.overwrite,
                       source={"converted_by": "convert from-hf", "hf_folder": str(folder),
                               "model_type": hf_cfg.get("model_type")})
    _report("from-hf", out, t0)
    return 0


def run_from_kforcing(args) -> int:
    from ..convert.released import PRESETS, check_finite, import_released
    from ..decode.format import save_decoder

    setup_logging(0)
    t0 = time.time()
    preset = PRESETS[args.preset] if args.preset else {}
    params = {}
    for name in ("num_heads", "max_seq_len", "mask_token_id"):
        value = getattr(args, name)
        value = preset.get(name) if value is None else value
        if value is None:
            raise CheckpointError(f"--{name.replace('_', '-')} is required (or --preset owt / lm1b): the released "
                                  f"files do not record it")
        params[name] = value
    fields = import_released(args.checkpoint, max_k=args.max_k, **params)
    check_finite(fields["state_dict"], str(args.checkpoint))
    if preset and fields["model_config"]["vocab_size"] != preset["vocab_size"]:
        raise CheckpointError(f"{args.checkpoint} has a vocabulary of {fields['model_config']['vocab_size']}, the "
                              f"{args.preset} preset expects {preset['vocab_size']}: wrong preset for this file")
    tokenizer = _hf_tokenizer(Path(args.tokenizer)) if args.tokenizer else None
    out = save_decoder(args.out, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite,
                       source={"converted_by": "convert from-kforcing", "file": str(args.checkpoint),
                               "preset": args.preset}, **fields)
    _report("from-kforcing", out, t0)
    return 0


def run_to_hf(args) -> int:
    from ..convert.hf import export_hf

    setup_logging(0)
    t0 = time.time()
    out = export_hf(args.model, args.out, overwrite=args.overwrite)
    _report("to-hf", out, t0)
    return 0

