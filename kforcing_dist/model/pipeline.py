"""The pipeline-parallel stage split of TransformerLM and PFLM: a DeepSpeed ``PipelineModule``.

Layer list (the shared checkpoint convention; the converter reads the saved layer files):

- index 0, :class:`EmbedStage`: ``embed_tokens.*``, ``embed_positions.*`` (learned positions)
  and, for a PFLM, ``noise_encoder.*`` (the plain model's names, no prefix);
- index 1..L, :class:`PipeBlock`: Transformer block i-1 (the keys of ``layers.{i-1}.``);
- index L+1, :class:`HeadStage`: ``final_norm.*``, ``lm_head.*``.

DeepSpeed saves layer i of TP rank r as ``layer_{i:02d}-model_{r:02d}-model_states.pt``.
The stages are megatron-core tensor-parallel layers (GPT-NeoX style) and run the very code of
the plain model (``TransformerLM.embed``/``head``, ``PFLM.window_inputs``/``window_logits``,
``TransformerBlock``). Between stages travel (hidden, position ids, uint8 mask, slot shape);
only the hidden states are floating point, so only they carry gradients.
Layers are built in the plain model's RNG order on every rank (other stages' layers are built
and dropped), so a seed gives the same full weights at every TP x PP layout.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config.schema import ModelConfig
from ..nn.names import plain_param_name
from ..nn.noise import DEFAULT_NOISE_MAX_FREQ, NoiseEncoder
from ..nn.norm import Norm
from ..nn.rotary import RotaryEmbedding
from .layers import TransformerBlock
from .loss import resolve_tp_group
from .state import full_state_dict, load_full_state_dict
from .student import PFLM
from .transformer import (TransformerLM, build_lm_head, build_position_embedding, build_token_embedding,
                          check_masked_token_ids, model_parallel_config, validate_model_config)

# The mask slot of a plain causal pass (no staircase): a 1-element placeholder, because every
# stage must receive the same tuple of tensors.
_CAUSAL = 1


def _no_mask(device) -> torch.Tensor:
    return torch.zeros(_CAUSAL, dtype=torch.uint8, device=device)


class EmbedStage(nn.Module):
    """Layer 0: token (+ learned position) embeddings; for a PFLM also the noise encoder.

    Input: token ids [b, s] (plain LM) or the tuple (input_ids, window_starts, u, tau,
    window_tokens [b, W, m_real], m_real may be 0) of ``PFLM.forward_windows``.
    """

    embed = TransformerLM.embed
    default_position_ids = TransformerLM.default_position_ids
    _check_position_ids = TransformerLM._check_position_ids
    window_inputs = PFLM.window_inputs
    _check_windows = PFLM._check_windows
    _window_items = PFLM._window_items

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, mp_config, tp_group,
                 params_dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = build_token_embedding(cfg, padded_vocab_size, mp_config, tp_group)
        self.embed_positions = build_position_embedding(cfg, params_dtype)
        self.noise_encoder = None  # a PFLM's, attached after the head (the plain RNG order)
        self.max_k = 0

    def forward(self, inputs):
        if self.noise_encoder is None:
            ids = inputs
            # p2p sends need contiguous tensors
            pos = self.default_position_ids(ids.shape[0], ids.shape[1], ids.device).contiguous()
            return (self.embed(ids), pos, _no_mask(ids.device),
                    torch.zeros(3, dtype=torch.long, device=ids.device))
        ids, starts, u, tau, window_tokens = inputs
        hidden, pos, mask, shape = self.window_inputs(
            ids, starts, u, tau, window_tokens if window_tokens.shape[-1] else None)
        return (hidden, pos.contiguous(), mask.to(torch.uint8).contiguous(),
                torch.tensor(shape, dtype=torch.long, device=ids.device))


class PipeBlock(TransformerBlock):
    """Layers 1..L: one Transformer block (same parameters as ``TransformerLM.layers[i]``)."""

    def __init__(self, cfg: ModelConfig, mp_config, tp_group, params_dtype: torch.dtype):
        super().__init__(cfg, mp_config, tp_group, params_dtype)
        # parameter-free: the rotary tables are recomputed from the position ids on each stage
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_base) \
            if cfg.position == "rope" else None

    def forward(self, inputs):
        hidden, pos, mask, shape = inputs
        rotary = self.rotary(pos) if self.rotary is not None else None
        attn_mask = None if mask.numel() == _CAUSAL else mask.bool()
        return super().forward(hidden, rotary, attn_mask), pos, mask, shape


class HeadStage(nn.Module):
    """Layer L+1: final norm and the LM head; a PFLM's keeps only the noise slots' logits."""

    head = TransformerLM.head
    window_logits = PFLM.window_logits

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, mp_config, tp_group,
                 params_dtype: torch.dtype, tp: int, tp_rank: int, masked_token_ids: Sequence[int] = ()):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.local_vocab_size = padded_vocab_size // tp
        self.vocab_start = tp_rank * self.local_vocab_size
        self.masked_token_ids = check_masked_token_ids(masked_token_ids, padded_vocab_size)
        self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_bias, cfg.norm_eps, params_dtype)
        self.lm_head = build_lm_head(cfg, padded_vocab_size, mp_config, tp_group)

    def forward(self, inputs):
        hidden, _pos, _mask, shape = inputs
        hidden = self.final_norm(hidden)
        if int(shape[2]) == 0:  # plain LM pass: logits of every position
            return self.head(hidden)
        return self.window_logits(hidden, shape.tolist())


def stage_boundaries(num_layers: int, pp: int) -> list[int]:
    """First layer index of each stage (and the end): blocks balanced, embed/head with the
    first/last stage; what DeepSpeed's ``partition_method="type:PipeBlock"`` computes."""
    from deepspeed.runtime import utils as ds_utils

    return ds_utils.partition_balanced(weights=[0] + [1] * num_layers + [0], num_parts=pp)


def plain_name(name: str, num_layers: int) -> str:
    """``{layer index}.{key}`` of the pipeline module -> the plain model's parameter name (the
    same rule the offline converter applies to saved layer files)."""
    index, key = name.split(".", 1)
    return plain_param_name(int(index), key, num_layers)


def pipe_name(name: str, num_layers: int) -> str:
    """The plain model's parameter name -> ``{layer index}.{key}`` of the pipeline module."""
    if name.startswith("layers."):
        _, i, key = name.split(".", 2)
        return f"{int(i) + 1}.{key}"
    if name.startswith(("final_norm.", "lm_head.")):
        return f"{num_layers + 1}.{name}"
    return f"0.{name}"


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class PipelinedLM(PipelineModule):
        """A TransformerLM or PFLM split into pipeline stages (see the module docstring)."""

        def plain_name(self, name: str) -> str:
            return plain_name(name, self.num_blocks)

    return PipelinedLM


def _check_grid_matches(pipe, groups) -> None:
    """DeepSpeed's grid and megatron-core's groups must put every rank at the same coordinates
    (otherwise TP pairs would silently be treated as data-parallel)."""
    grid = pipe._grid
    ours = (groups.pp_rank, groups.dp_rank, groups.tp_rank)
    theirs = (grid.get_stage_id(), grid.get_data_parallel_id(), grid.get_slice_parallel_rank())
    if ours != theirs or dist.get_rank(groups.pp_group) != groups.pp_rank:
        raise RuntimeError(f"rank {groups.world_rank}: megatron-core places it at (pp, dp, tp) = {ours} "
                           f"but DeepSpeed's pipeline grid at {theirs}; the two layouts disagree")


def build_pipeline_model(cfg: ModelConfig, padded_vocab_size: int, groups, *, max_k: int = 0,
                         noise_max_freq: Optional[float] = DEFAULT_NOISE_MAX_FREQ,
                         noise_init_std: Optional[float] = None, noise_features: str = "rising",
                         masked_token_ids: Sequence[int] = (), loss_fn=None,
                         params_dtype: torch.dtype = torch.float32):
    """The pipeline module of a TransformerLM (``max_k`` 0) or a PFLM (``max_k`` > 0) for this
    rank's stage, with the full weights a plain model built after the same seed would have.
    ``noise_*`` and ``masked_token_ids`` as for :class:`PFLM`.

    Collective over the world (DeepSpeed builds its communicators). ``loss_fn(outputs, labels)``
    runs on the last stage. Parameters stay on the CPU until the engine moves them.
    """
    import deepspeed.comm as ds_comm
    from deepspeed.pipe import LayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tp_group = resolve_tp_group(groups)
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    validate_model_config(cfg, padded_vocab_size, tp)
    if cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings with parallel.pp > 1 is not supported: the head and the "
                         "embedding live on different stages; set model.tie_embeddings: false")
    if cfg.num_layers < groups.pp_size:
        raise ValueError(f"model.num_layers={cfg.num_layers} must be >= parallel.pp={groups.pp_size}")
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                 dist_init_required=False)
    L = cfg.num_layers
    bounds = stage_boundaries(L, groups.pp_size)
    lo, hi = bounds[groups.pp_rank], bounds[groups.pp_rank + 1]
    mp_config = model_parallel_config(tp, params_dtype)

    layers: list = []

    def keep(index: int, module: nn.Module):
        # another stage's layer was built only to advance the RNG; DeepSpeed never builds a spec
        layers.append(module if lo <= index < hi else LayerSpec(type(module)))

    embed = EmbedStage(cfg, padded_vocab_size, mp_config, tp_group, params_dtype)
    keep(0, embed)
    for i in range(L):
        keep(i + 1, PipeBlock(cfg, mp_config, tp_group, params_dtype))
    keep(L + 1, HeadStage(cfg, padded_vocab_size, mp_config, tp_group, params_dtype, tp, tp_rank,
                          masked_token_ids))
    if max_k:
        embed.noise_encoder = NoiseEncoder(cfg.hidden_size, max_freq=noise_max_freq,
                                           init_std=cfg.init_std if noise_init_std is None else float(noise_init_std),
                                           dtype=params_dtype, features=noise_features)
        embed.max_k = max_k
    topology = PipeModelDataParallelTopology(num_pp=groups.pp_size, num_mp=tp, num_dp=groups.dp_size)
    pipe = _pipeline_module_class()(layers=layers, topology=topology, loss_fn=loss_fn,
                                    partition_method="type:PipeBlock")
    if list(pipe.parts) != list(bounds):
        raise RuntimeError(f"DeepSpeed partitioned the layers as {pipe.parts}, expected {bounds}")
    pipe.num_blocks = L
    pipe.cfg, pipe.padded_vocab_size, pipe.vocab_size, pipe.max_k = cfg, padded_vocab_size, cfg.vocab_size, max_k
    _check_grid_matches(pipe, groups)
    return pipe


def build_model(cfg: ModelConfig, padded_vocab_size: int, groups, pp: int, *, max_k: int = 0,
                noise: Optional[Mapping] = None, masked_token_ids: Sequence[int] = ()):
    """The model of a run at its layout: a pipeline module when ``pp`` > 1, else a plain
    TransformerLM (``max_k`` 0) or PFLM with the noise-feature convention ``noise``
    ({"features", "max_freq"}, as recorded in exports and checkpoints) and the masked tokens."""
    kw = dict(max_k=max_k, noise_features=noise["features"], noise_max_freq=noise["max_freq"]) if max_k else {}
    if pp > 1:
        return build_pipeline_model(cfg, padded_vocab_size, groups, masked_token_ids=masked_token_ids, **kw)
    if max_k:
        return PFLM(cfg, padded_vocab_size, groups.tp_group, masked_token_ids=masked_token_ids, **kw)
    return TransformerLM(cfg, padded_vocab_size, groups.tp_group, masked_token_ids=masked_token_ids)


def is_pipeline(module) -> bool:
    return hasattr(module, "num_blocks") and hasattr(module, "_grid")


def plain_state_dict(module: nn.Module, groups) -> dict[str, torch.Tensor]:
    """Full (TP=1) weights of a plain or pipeline model under the plain model's names, on every
    rank (CPU copies). Collective over the TP group and, for a pipeline, the pipeline group."""
    full = {k: v.detach().cpu() for k, v in full_state_dict(module, resolve_tp_group(groups)).items()}
    if not is_pipeline(module):
        return full
    mine = {module.plain_name(k): v for k, v in full.items()}
    parts: list = [None] * groups.pp_size
    dist.all_gather_object(parts, mine, group=groups.pp_group)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out


def load_plain_state_dict(module: nn.Module, full_sd: Mapping[str, torch.Tensor], groups) -> None:
    """Load full (TP=1) plain-model weights into a plain or pipeline model (this rank's slices)."""
    tp_group = resolve_tp_group(groups)
    if not is_pipeline(module):
        load_full_state_dict(module, full_sd, tp_group)
        return
    L = module.num_blocks
    unknown = sorted(k for k in full_sd if not _valid_plain_name(k, L))
    if unknown:
        raise ValueError(f"state dict does not match the model: unexpected keys {unknown}")
    local = {}
    missing = []
    for name, _ in module.named_parameters():
        plain = module.plain_name(name)
        if plain in full_sd:
            local[name] = full_sd[plain]
        else:
            missing.append(plain)
    if missing:
        raise ValueError(f"state dict does not match the model: missing keys {sorted(missing)}")
    load_full_state_dict(module, local, tp_group)


def _valid_plain_name(name: str, num_layers: int) -> bool:
    if name.startswith("layers."):
        index = name.split(".", 2)[1]
        return index.isdigit() and int(index) < num_layers
    return name.startswith(("embed_tokens.", "embed_positions.", "noise_encoder.", "final_norm.", "lm_head."))


class PipelineForward:
    """Forward-only, micro-batched passes of a frozen pipeline model (the teacher's targets).

    Every rank calls it with the same list of micro-batch inputs; the last stage gets each
    micro-batch's vocab-parallel logits, the other stages None.
    """

    def __init__(self, engine):
        self.engine = engine
        self.max_k = engine.module.max_k
        self.vocab_size = engine.module.vocab_size

    @property
    def is_last_stage(self) -> bool:
        return self.engine.is_last_stage()

    def __call__(self, inputs: list) -> Optional[list[torch.Tensor]]:
        e = self.engine
        # DeepSpeed never resets total_loss (a stale one breaks the last stage) and keeps the
        # activation shapes of the previous pass (the two self-forcing passes differ).
        e.total_loss = None
        e.reset_activation_shape()
        dummy = torch.zeros(1)
        out = e.eval_batch(iter([(x, dummy) for x in inputs]), compute_loss=False, reduce_output=None,
                           bcast_loss=False, num_micro_batches=len(inputs))
        return list(out) if e.is_last_stage() else None
