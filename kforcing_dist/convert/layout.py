"""How our training checkpoints lay weights out: tensor-parallel split dims and pipeline layer files.

Plain-model names are ``TransformerLM`` / ``PFLM`` ``named_parameters()`` names at TP=1. The table
below says along which dim megatron-core shards each one over TP ranks (column linears and the
vocabulary on dim 0, row linears on dim 1); everything else (norms, row-linear biases, learned
positions, the noise encoder) is replicated. A unit test checks the table against the model's own
``tensor_model_parallel`` / ``partition_dim`` flags.

Pipeline files (the convention shared with the pipeline-parallel trainer): layer 0 holds the
embedding stage (``embed_tokens.*``, ``embed_positions.*``, ``noise_encoder.*``), layers 1..L hold
block i-1 without its ``layers.{i-1}.`` prefix, layer L+1 holds ``final_norm.*`` and ``lm_head.*``;
files are ``layer_{index:02d}-model_{tp_rank:02d}-model_states.pt`` in the engine folder.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from ..nn.names import plain_param_name
from ..training.checkpoint import CheckpointError

TP_SPLIT_DIMS: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"^embed_tokens\.weight$"), 0),
    (re.compile(r"^lm_head\.(weight|bias)$"), 0),
    (re.compile(r"^layers\.\d+\.attention\.(q_proj|k_proj|v_proj)\.(weight|bias)$"), 0),
    (re.compile(r"^layers\.\d+\.attention\.out_proj\.weight$"), 1),
    (re.compile(r"^layers\.\d+\.mlp\.(fc1|gate_proj|up_proj)\.(weight|bias)$"), 0),
    (re.compile(r"^layers\.\d+\.mlp\.(fc2|down_proj)\.weight$"), 1),
)

PIPELINE_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def tp_split_dim(name: str) -> Optional[int]:
    """The dim ``name`` is split along over TP ranks, or None when it is replicated."""
    for pattern, dim in TP_SPLIT_DIMS:
        if pattern.match(name):
            return dim
    return None


def merge_tp_shards(shards: list[Mapping[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """Full tensors from the per-TP-rank state dicts (rank order). Replicated tensors must agree."""
    names = set(shards[0])
    for rank, sd in enumerate(shards[1:], start=1):
        if set(sd) != names:
            diff = sorted(names.symmetric_difference(sd))[:6]
            raise CheckpointError(f"{where}: TP rank {rank} holds other weights than rank 0 ({diff}); "
                                  f"the checkpoint mixes files of different runs: copy it again")
    out = {}
    for name in sorted(names):
        parts = [sd[name] for sd in shards]
        dim = tp_split_dim(name)
        if dim is None or len(parts) == 1:
            if any(p.shape != parts[0].shape or not torch.equal(p, parts[0]) for p in parts[1:]):
                raise CheckpointError(f"{where}: the replicated weight {name} differs between TP ranks; "
                                      f"the shards come from different runs or steps: copy the checkpoint again")
            out[name] = parts[0]
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def split_tp(full: Mapping[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """This TP rank's shard of full weights (the inverse of :func:`merge_tp_shards`)."""
    out = {}
    for name, t in full.items():
        dim = tp_split_dim(name)
        out[name] = t if dim is None or tp == 1 else t.chunk(tp, dim=dim)[rank].contiguous()
    return out


def pipeline_name(layer_index: int, key: str, num_layers: int) -> str:
    """Plain-model name of ``key`` stored in pipeline layer ``layer_index`` (the rule of
    :mod:`kforcing_dist.nn.names`); CheckpointError for a layer the metadata does not have."""
    try:
        return plain_param_name(layer_index, key, num_layers)
    except ValueError as e:
        raise CheckpointError(f"{e}; the checkpoint does not match its metadata.json") from None


def pipeline_file(layer_index: int, tp_rank: int) -> str:
    return f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"
