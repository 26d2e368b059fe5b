"""Export a trained model (any TP size, any ZeRO stage) to the decoder's single-folder format.

All ranks of a tensor-parallel group (and of a pipeline, whose stages each hold some layers)
take part in gathering full weights (under ZeRO-3 the partitioned parameters are gathered
first); rank 0 writes the folder atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from ..config.schema import ModelConfig
from ..parallel.groups import ParallelGroups


def _gathered(module: torch.nn.Module, zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def full_weights(module: torch.nn.Module, groups: ParallelGroups, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full (TP=1) float32 CPU weights of ``module`` (plain or pipeline) on every rank, under the
    plain model's names."""
    from ..model.pipeline import plain_state_dict

    with _gathered(module, zero_stage):
        sd = plain_state_dict(module, groups)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def export_decoder(module: torch.nn.Module, groups: ParallelGroups, folder: Path, *, kind: str,
                   model_cfg: ModelConfig, padded_vocab_size: int, zero_stage: int, tokenizer=None,
                   max_k: int | None = None, noise: dict | None = None, cdf_order: str = "vocab",
                   masked_token_ids=(), source: dict | None = None,
                   tau_range: tuple[float, float] | None = None,
                   teacher_min_p: float | None = None) -> Path:
    """Write ``folder`` (model.safetensors + config.json + tokenizer/); collective over all ranks.

    An existing export of the same checkpoint (``source``) is kept; any other is replaced
    atomically (a rerun after resuming a finished stage re-exports nothing).
    """
    from ..decode.format import read_decoder_config, save_decoder

    folder = Path(folder)
    if (folder / "config.json").exists() and read_decoder_config(folder).get("source") == (source or {}):
        return folder
    weights = full_weights(module, groups, zero_stage)
    if groups.world_rank == 0:
        save_decoder(folder, kind=kind, model_config=dataclasses.asdict(model_cfg),
                     padded_vocab_size=padded_vocab_size, state_dict=weights, tokenizer=tokenizer,
                     max_k=max_k, noise=noise, cdf_order=cdf_order, masked_token_ids=masked_token_ids,
                     tau_range=tau_range, teacher_min_p=teacher_min_p,
                     eos_id=getattr(tokenizer, "eos_id", None), source=source or {}, overwrite=True)
    dist.barrier()
    return folder


def fit_vocab_rows(state_dict: dict[str, torch.Tensor], padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Pad (zeros) or trim the padded vocabulary rows so full weights fit another TP size's padding.

    Rows past the real vocabulary are padding whose logits are masked anyway, so this is exact.
    """
    out = dict(state_dict)
    for key in ("embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        if key not in out:
            continue
        t = out[key]
        if t.shape[0] > padded_vocab_size:
            out[key] = t[:padded_vocab_size].contiguous()
        elif t.shape[0] < padded_vocab_size:
            pad = torch.zeros((padded_vocab_size - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            out[key] = torch.cat([t, pad])
    return out
