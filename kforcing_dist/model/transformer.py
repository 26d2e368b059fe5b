"""The causal Transformer LM built from megatron-core tensor-parallel layers.

``TransformerLM`` is split into ``embed`` / ``backbone`` / ``head`` so that the distillation
student can compose it (insert noise slots between embedding and blocks, pass its own boolean
mask and position ids). Weights are initialised on the CPU from full master tensors drawn with
the torch default RNG and then split (megatron's ``use_cpu_initialization``), so a model built
after ``torch.manual_seed(s)`` has the same full weights at every TP size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from ..config.schema import MODEL_CHOICE_FIELDS, ModelConfig, field_choices
from ..nn.norm import Norm
from ..nn.rotary import RotaryEmbedding
from ..nn.rows import take_rows
from ..nn.sizes import MASKED_LOGIT_VALUE, PADDED_LOGIT_VALUE
from .layers import TransformerBlock, normal_init, resolve_ffn_hidden_size
from .loss import lm_loss, resolve_tp_group, vocab_parallel_cross_entropy  # noqa: F401 (re-export)

def validate_model_config(cfg: ModelConfig, padded_vocab_size: int, tp: int) -> None:
    """Raise ValueError for a configuration the model cannot be built with at this TP size."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size is 0: set it from the tokenizer before building the model")
    if padded_vocab_size < cfg.vocab_size or padded_vocab_size % tp:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} must be >= model.vocab_size "
                         f"{cfg.vocab_size} and divisible by tp={tp} (use pad_vocab_size)")
    for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    H, nh = cfg.hidden_size, cfg.num_heads
    nkv = cfg.num_kv_heads or nh
    if cfg.num_kv_heads < 0:
        raise ValueError(f"model.num_kv_heads must be >= 0, got {cfg.num_kv_heads}")
    if H % nh:
        raise ValueError(f"model.num_heads={nh} must divide model.hidden_size={H}")
    if nh % nkv:
        raise ValueError(f"model.num_kv_heads={nkv} must divide model.num_heads={nh}")
    if nh % tp or nkv % tp:
        raise ValueError(f"model.num_heads={nh} and key/value heads={nkv} must both be "
                         f"divisible by parallel.tp={tp}")
    for name in MODEL_CHOICE_FIELDS:
        allowed = field_choices(ModelConfig, name)
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.position == "rope" and (H // nh) % 2:
        raise ValueError(f"rotary positions need an even head dimension, got {H // nh}")
    ffn = resolve_ffn_hidden_size(cfg)
    if ffn <= 0 or ffn % tp:
        raise ValueError(f"MLP width {ffn} (model.ffn_hidden_size) must be positive and "
                         f"divisible by parallel.tp={tp}")
    if cfg.tie_embeddings and cfg.lm_head_bias:
        raise ValueError("model.lm_head_bias needs an untied head (model.tie_embeddings: false)")
    if cfg.init_std <= 0:
        raise ValueError(f"model.init_std must be positive, got {cfg.init_std}")


def check_masked_token_ids(masked_token_ids: Sequence[int], padded_vocab_size: int) -> tuple[int, ...]:
    """The sorted, de-duplicated ids whose logits are forced to MASKED_LOGIT_VALUE (a released
    model's mask token); ValueError for ids outside the padded vocabulary."""
    ids = tuple(sorted({int(t) for t in masked_token_ids}))
    if any(not 0 <= t < padded_vocab_size for t in ids):
        raise ValueError(f"masked_token_ids {list(ids)} must lie in [0, {padded_vocab_size})")
    return ids


def model_parallel_config(tp: int, params_dtype: torch.dtype) -> ModelParallelConfig:
    """megatron's layer config: full master weights drawn on the CPU, then split (seed -> same
    full weights at every TP size)."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=params_dtype)


def build_token_embedding(cfg: ModelConfig, padded_vocab_size: int, mp_config, tp_group):
    return VocabParallelEmbedding(padded_vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                  config=mp_config, tp_group=tp_group)


def build_position_embedding(cfg: ModelConfig, params_dtype: torch.dtype) -> Optional[nn.Embedding]:
    """The learned position table, or None with rotary positions."""
    if cfg.position != "learned":
        return None
    table = nn.Embedding(cfg.max_seq_len, cfg.hidden_size, dtype=params_dtype)
    nn.init.normal_(table.weight, mean=0.0, std=cfg.init_std)
    return table


def build_lm_head(cfg: ModelConfig, padded_vocab_size: int, mp_config, tp_group):
    # Tied: like megatron's GPTModel, the head owns no weight and is called with the
    # embedding's (both are split on the padded-vocab dim, so the shards line up).
    return ColumnParallelLinear(
        cfg.hidden_size, padded_vocab_size, config=mp_config, init_method=normal_init(cfg.init_std),
        bias=cfg.lm_head_bias and not cfg.tie_embeddings, gather_output=False,
        skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp_group)


class TransformerLM(nn.Module):
    """Pre-norm causal decoder; logits are vocab-parallel over ``tp_group``.

    Parameters live on the CPU after construction; move the model with ``.to(device)``.
    ``masked_token_ids``: tokens whose logits are always MASKED_LOGIT_VALUE (the decoder config's
    ``masked_token_ids``: a released model's mask token), so training sees what decoding does.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group,
                 params_dtype: torch.dtype = torch.float32, masked_token_ids: Sequence[int] = ()):
        super().__init__()
        tp_group = resolve_tp_group(tp_group)
        tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        validate_model_config(cfg, padded_vocab_size, tp)
        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = tp, tp_rank
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.local_vocab_size = padded_vocab_size // tp
        self.vocab_start = tp_rank * self.local_vocab_size
        self.masked_token_ids = check_masked_token_ids(masked_token_ids, padded_vocab_size)
        self.params_dtype = params_dtype
        H = cfg.hidden_size
        mp_config = model_parallel_config(tp, params_dtype)
        # Construction order is the RNG order: keep it fixed so weights depend only on the seed
        # (the pipeline stages of kforcing_dist.model.pipeline are built in the same order).
        self.embed_tokens = build_token_embedding(cfg, padded_vocab_size, mp_config, tp_group)
        self.embed_positions = build_position_embedding(cfg, params_dtype)
        self.rotary = None if self.embed_positions is not None else \
            RotaryEmbedding(H // cfg.num_heads, cfg.rope_base)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, mp_config, tp_group, params_dtype) for _ in range(cfg.num_layers))
        self.final_norm = Norm(H, cfg.norm, cfg.norm_bias, cfg.norm_eps, params_dtype)
        self.lm_head = build_lm_head(cfg, padded_vocab_size, mp_config, tp_group)

    # ---------------------------------------------------------------- input checks

    def default_position_ids(self, batch: int, seq: int, device) -> torch.Tensor:
        return torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)

    def _check_position_ids(self, position_ids: Optional[torch.Tensor], batch: int, seq: int,
                            device) -> torch.Tensor:
        if position_ids is None:
            return self.default_position_ids(batch, seq, device)
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise ValueError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or \
                position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape [b, s] = [{batch}, {seq}] "
                             f"(or [1, {seq}]), got {tuple(position_ids.shape)}")
        return position_ids.expand(batch, seq)

    # ---------------------------------------------------------------- the three stages

    def embed(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [b, s] -> hidden [b, s, H] (token + learned position embeddings)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [b, s], got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        hidden = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            b, s = input_ids.shape
            if position_ids is None and s > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {s} tokens is longer than model.max_seq_len="
                                 f"{self.cfg.max_seq_len} (learned positions)")
            pos = self._check_position_ids(position_ids, b, s, input_ids.device)
            hidden = hidden + self.embed_positions(pos)
        return hidden

    def backbone(self, hidden: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, causal_prefix: int = 0,
                 read_from: int = 0, read_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All blocks and the final norm. hidden [b, s, H]; position_ids [b, s] drive rotary
        positions (learned positions are added in ``embed``); attention_mask: boolean,
        broadcastable to [b, heads, s, s], True = may attend, None = causal. An explicit mask
        replaces the causal one, so it must contain the causality itself. ``causal_prefix`` P: the
        mask's first P rows are plain causal over the first P positions (a staircase's context),
        which lets attention skip the rest of those rows (``layers.attention_core``).
        ``read_from`` R > 0 (with a mask): only rows R.. are read afterwards, so the last layer
        runs its queries, attention output and MLP on those rows alone (every row still gives it
        keys and values) and the result is [b, s - R, H]: the same values as the full result's
        rows R.. (a staircase's context rows need no last-layer output). ``read_rows`` [b, r] (row
        indices): the same for those rows of each sequence (the teacher's head rows); the result
        is [b, r, H]."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"hidden must have shape [b, s, {self.cfg.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        b, s, _ = hidden.shape
        if read_from and (attention_mask is None or not 0 < read_from < s):
            raise ValueError(f"read_from must lie in [1, {s - 1}] and needs an attention_mask, "
                             f"got {read_from}")
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(self._check_position_ids(position_ids, b, s, hidden.device))
        if read_rows is not None:
            if read_from or read_rows.dim() != 2 or read_rows.shape[0] != b:
                raise ValueError(f"read_rows must be row indices [b, r] = [{b}, r] (and no read_from), "
                                 f"got shape {tuple(read_rows.shape)}")
            read_rows = read_rows.to(hidden.device).long()
        rows = slice(read_from, None) if read_from else read_rows
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last and rows is not None:
                hidden = self._last_layer_on_rows(layer, hidden, rotary, attention_mask, rows)
            else:
                hidden = layer(hidden, rotary, attention_mask, causal_prefix=causal_prefix)
        return self.final_norm(hidden)

    @staticmethod
    def _last_layer_on_rows(layer, hidden: torch.Tensor, rotary, attention_mask: Optional[torch.Tensor],
                            rows) -> torch.Tensor:
        """``layer`` on hidden's rows only (queries, attention output, MLP; ``rows`` a slice or a
        [b, r] index, see :func:`~kforcing_dist.nn.rows.take_rows`), every row giving keys and
        values: the mask rows of those positions (causal when ``attention_mask`` is None)."""
        b, s, _ = hidden.shape
        if attention_mask is None:
            positions = take_rows(torch.arange(s, device=hidden.device).expand(b, s), rows, 1)
            mask = (torch.arange(s, device=hidden.device) <= positions[:, :, None])[:, None]  # [b, 1, r, s]
        else:
            m = attention_mask[(None,) * (4 - attention_mask.dim())]
            mask = take_rows(m.expand(b, *m.shape[1:]), rows, 2)
        # cos/sin [b or 1, 1, s, d]: the rows' entries
        read_rotary = None if rotary is None else tuple(take_rows(t.expand(b, *t.shape[1:]), rows, 2) for t in rotary)
        return layer(take_rows(hidden, rows, 1), read_rotary, mask, kv_x=hidden, kv_rotary=rotary)

    def rotary_tables(self, position_ids: torch.Tensor):
        """(cos, sin) for ``TransformerBlock``'s ``rotary``/``kv_rotary``; None with learned positions."""
        return None if self.rotary is None else self.rotary(position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, H] -> vocab-parallel float32 logits [b, s, V_padded/tp], padding and
        masked_token_ids masked."""
        weight = self.embed_tokens.weight if self.cfg.tie_embeddings else None
        logits = self.lm_head(hidden, weight=weight)[0].float()
        pad_from = self.vocab_size - self.vocab_start  # first padded column in this shard
        if pad_from < self.local_vocab_size:
            cols = torch.arange(self.local_vocab_size, device=logits.device)
            logits = logits.masked_fill(cols >= pad_from, PADDED_LOGIT_VALUE)
        local = [t - self.vocab_start for t in self.masked_token_ids
                 if 0 <= t - self.vocab_start < self.local_vocab_size]
        if local:
            logits = logits.index_fill(-1, torch.tensor(local, device=logits.device), MASKED_LOGIT_VALUE)
        return logits

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                head_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [b, s] -> vocab-parallel float32 logits [b, s, V_padded/tp]; with ``head_rows``
        [b, r] (row indices) only those rows' logits [b, r, V_padded/tp]: the full pass's logits
        there (up to float rounding when r < s, as the last layer then attends from those rows
        alone). Inside this call, so that a ZeRO-3 partitioned model gathers the head's (or tied
        embedding's) weight as in any forward."""
        rows = None if head_rows is None else head_rows.to(input_ids.device).long()
        # fewer head rows than positions: the last layer, too, runs its queries and MLP on those
        # rows alone (with every row of the sequence, it keeps the causal fast path)
        fewer = rows is not None and rows.shape[-1] < input_ids.shape[-1]
        hidden = self.backbone(self.embed(input_ids, position_ids), position_ids, attention_mask,
                               read_rows=rows if fewer else None)
        if rows is not None and not fewer:
            hidden = hidden.gather(1, rows[:, :, None].expand(*rows.shape, hidden.shape[-1]))
        return self.head(hidden)
