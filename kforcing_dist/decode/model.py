"""DecoderLM: TransformerLM's maths in plain torch, with a static KV cache for batched decoding.

The parameters carry TransformerLM's (TP=1) names, so a decoder folder's weights load as is.
The maths follows ``kforcing_dist.model.layers`` exactly and shares its pieces from
:mod:`kforcing_dist.nn` (norms, rotary positions, the noise encoder, the padded/masked logit
values): learned absolute positions, grouped-query attention, gelu_tanh / swiglu MLPs, a tied or
untied head whose padded vocabulary columns get PADDED_LOGIT_VALUE and whose
``masked_token_ids`` get MASKED_LOGIT_VALUE. A PFLM adds the NoiseEncoder.

KV cache (:class:`KVCache`): one preallocated tensor per K and V, ``[layers, batch, kv_heads,
capacity, head_dim]``, plus a per-sequence length vector. :meth:`DecoderLM.forward_step` runs, per
sequence, a chunk of ``c`` real tokens (right-padded; ``num_new[b]`` of them are real) followed by
``m`` noise slots, in one forward pass. The whole chunk's keys/values are scattered into the
cache at indices ``length[b] .. length[b]+c+m-1``; afterwards only ``length[b] += num_new[b]``, so
the padding and the noise slots sit past the sequence's end (scratch space) and are overwritten
by the next step: they are used in this step only. Attention reads a view of the cache up to the
longest sequence's end, with a per-sequence boolean mask (True = may attend).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.noise import NoiseEncoder
from ..nn.norm import Norm
from ..nn.rotary import apply_rotary, rotary_tables
from ..nn.rows import take_rows
from ..nn.sizes import MASKED_LOGIT_VALUE, PADDED_LOGIT_VALUE
from .errors import DecodeError
from .format import DTYPES, expected_weight_shapes, resolve_ffn_hidden_size, validate_decoder_config

OUTPUTS = ("auto", "all", "last", "noise", "none")


# --------------------------------------------------------------------------------------------
# Layers (parameter names = TransformerLM's)


class Linear(nn.Module):
    """y = x W^T + b with uninitialised storage (weights always come from a checkpoint)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclasses.dataclass
class _StepPlan:
    """What every layer of one forward needs (computed once per forward)."""
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]  # [b, 1, s, d] (fast: [b, s, 1, d])
    mask: torch.Tensor  # [b, 1, rep * s, s_k] bool, rows in (group member, query) order
    # [b * kv_heads * s] row of every new key/value in a layer's cache viewed as
    # [b * kv_heads * capacity, head_dim], in k's (b, kv_heads, s) order
    write_rows: Optional[torch.Tensor] = None
    key_len: int = 0  # cache positions attended to (a prefix view of the cache)
    fast: bool = False  # fused q/k/v projection and one rotary call for q and k
    # The last layer's query rows whose outputs are read (None: all): a slice of the chunk
    # (the noise slots; an empty one when only the cache is filled) or a [b, r] row index (each
    # sequence's last real token). The other rows only need their keys/values there.
    out_rows: Union[None, slice, torch.Tensor] = None
    out_mask: Optional[torch.Tensor] = None  # ``mask``'s rows of out_rows (same row order)


class Attention(nn.Module):
    def __init__(self, m: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        H = m["hidden_size"]
        self.num_heads = m["num_heads"]
        self.num_kv_heads = m["num_kv_heads"] or m["num_heads"]
        self.head_dim = H // self.num_heads
        self.rep = self.num_heads // self.num_kv_heads
        self.q_proj = Linear(H, self.num_heads * self.head_dim, m["qkv_bias"], dtype)
        self.k_proj = Linear(H, self.num_kv_heads * self.head_dim, m["qkv_bias"], dtype)
        self.v_proj = Linear(H, self.num_kv_heads * self.head_dim, m["qkv_bias"], dtype)
        self.out_proj = Linear(self.num_heads * self.head_dim, H, m["attn_out_bias"], dtype)
        self._fused: Optional[tuple] = None

    def fused_qkv(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[q; k; v] weight (and bias) for one projection matmul instead of three, rebuilt when
        any of the three changes (new storage, dtype, device or an in-place edit)."""
        parts = [self.q_proj, self.k_proj, self.v_proj]
        key = tuple((t.data_ptr(), t._version, t.dtype) for p in parts
                    for t in (p.weight, p.bias) if t is not None)
        if self._fused is None or self._fused[0] != key:
            weight = torch.cat([p.weight for p in parts])
            bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def forward(self, x: torch.Tensor, plan: _StepPlan, cache_k: Optional[torch.Tensor] = None,
                cache_v: Optional[torch.Tensor] = None, last: bool = False) -> torch.Tensor:
        """``last``: the model's last layer, whose outputs are read only at ``plan.out_rows``
        (every row's keys/values are still written to the cache)."""
        b, s, _ = x.shape
        d, nkv, nh = self.head_dim, self.num_kv_heads, self.num_heads
        if plan.fast:
            weight, bias = self.fused_qkv()
            qkv = F.linear(x, weight, bias)
            qk = qkv[..., :(nh + nkv) * d].view(b, s, nh + nkv, d)
            if plan.rotary is not None:
                qk = apply_rotary(qk, *plan.rotary)  # q and k heads in one call
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[..., (nh + nkv) * d:].view(b, s, nkv, d).transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, s, nh, d).transpose(1, 2)
            k = self.k_proj(x).view(b, s, nkv, d).transpose(1, 2)
            v = self.v_proj(x).view(b, s, nkv, d).transpose(1, 2)
            if plan.rotary is not None:
                q = apply_rotary(q, *plan.rotary)
                k = apply_rotary(k, *plan.rotary)
        if cache_k is not None:
            # In-place row copies into this layer's preallocated slice (no per-step cache
            # growth): whole head_dim rows, cheaper than an element-wise scatter.
            cache_k.view(-1, d).index_copy_(0, plan.write_rows, k.reshape(-1, d).to(cache_k.dtype))
            cache_v.view(-1, d).index_copy_(0, plan.write_rows, v.reshape(-1, d).to(cache_v.dtype))
            k = cache_k[:, :, :plan.key_len]
            v = cache_v[:, :, :plan.key_len]
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        mask = plan.mask
        if last and plan.out_rows is not None:
            q, mask = take_rows(q, plan.out_rows, 2), plan.out_mask
            s = q.shape[2]
            if s == 0:
                return x.new_zeros(b, 0, x.shape[-1])
        if self.rep > 1:
            # GQA without expanding K/V: the rep query heads sharing a KV head (heads
            # g*rep .. g*rep+rep-1, as repeat_interleave pairs them) become rep*s query rows of
            # that KV head, so the cache is read once per KV head.
            q = q.reshape(b, nkv, self.rep * s, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.reshape(b, self.num_heads, s, d).transpose(1, 2).reshape(b, s, self.num_heads * d)
        return self.out_proj(out)


_GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, 0.5 x (1 + tanh(a)) = x sigmoid(2a), a = sqrt(2/pi) (x +
    0.044715 x^3). On a CPU in float32/64 the sigmoid form, in place on one temporary: this
    build's vectorised tanh is about 3x slower than its sigmoid, which made the activation ~8% of
    a batch-8 PFLM step (64 rows). Equal to F.gelu(approximate="tanh") up to float rounding
    (<= 5e-7 on float32 activations); elsewhere (GPU kernels, bf16) F.gelu itself."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
        return F.gelu(x, approximate="tanh")
    t = x * x
    t.mul_(x).mul_(0.044715).add_(x).mul_(_GELU_TANH_SCALE).sigmoid_()
    return t.mul_(x)


class MLP(nn.Module):
    def __init__(self, m: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        H, Fh, bias = m["hidden_size"], resolve_ffn_hidden_size(m), m["mlp_bias"]
        self.activation = m["activation"]
        if self.activation == "swiglu":
            self.gate_proj = Linear(H, Fh, bias, dtype)
            self.up_proj = Linear(H, Fh, bias, dtype)
            self.down_proj = Linear(Fh, H, bias, dtype)
        else:
            self.fc1 = Linear(H, Fh, bias, dtype)
            self.fc2 = Linear(Fh, H, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(gelu_tanh(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, m: Mapping[str, Any], dtype: torch.dtype):
        super().__init__()
        H = m["hidden_size"]
        self.input_norm = Norm(H, m["norm"], m["norm_bias"], m["norm_eps"], dtype)
        self.attention = Attention(m, dtype)
        self.mlp_norm = Norm(H, m["norm"], m["norm_bias"], m["norm_eps"], dtype)
        self.mlp = MLP(m, dtype)

    def forward(self, x, plan, cache_k=None, cache_v=None, last: bool = False):
        attended = self.attention(self.input_norm(x), plan, cache_k, cache_v, last)
        if last and plan.out_rows is not None:
            x = take_rows(x, plan.out_rows, 1)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------
# Cache


@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values of context tokens, with per-sequence lengths.

    ``k``/``v``: [layers, batch, kv_heads, capacity, head_dim]; ``lengths``: [batch] int64 on the
    cache's device (tokens kept per sequence); ``host_lengths``: the same on the CPU, so that
    bounds and the attended prefix are known without a device sync.
    """
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    host_lengths: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def rewind(self, num_tokens) -> None:
        """Forget the last ``num_tokens`` (int or host [batch]) tokens of each sequence: what a
        verify pass wrote past the accepted prefix becomes scratch again."""
        n = torch.as_tensor(num_tokens, dtype=torch.long).expand(self.batch)
        if bool((n < 0).any()) or bool((n > self.host_lengths).any()):
            raise DecodeError(f"rewind by {n.tolist()} tokens, but the sequences hold "
                              f"{self.host_lengths.tolist()}")
        self.host_lengths -= n
        self.lengths -= n.to(self.lengths.device, non_blocking=True)

    def reset(self) -> None:
        """Forget every sequence (the storage is kept and reused)."""
        self.lengths.zero_()
        self.host_lengths.zero_()


# --------------------------------------------------------------------------------------------
# The model


class DecoderLM(nn.Module):
    """TransformerLM (kind 'ar') or PFLM (kind 'pflm': + noise encoder) for inference.

    ``config`` is a decoder config (the content of a decoder folder's config.json); the weights
    are uninitialised until loaded (:func:`kforcing_dist.decode.load_decoder` does both).
    Logits are float32 over the padded vocabulary ``[.., padded_vocab_size]``.
    """

    def __init__(self, config: Mapping[str, Any], dtype: Union[torch.dtype, str, None] = None):
        super().__init__()
        cfg = validate_decoder_config(config, where="DecoderLM config")
        if dtype is None:
            dtype = DTYPES[cfg["dtype"]]
        elif isinstance(dtype, str):
            if dtype not in DTYPES:
                raise DecodeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        self.config = cfg
        m = self.model_config = cfg["model"]
        self.kind = cfg["kind"]
        self.max_k = cfg["max_k"]
        self.eos_id = cfg["eos_id"]
        self.vocab_size = m["vocab_size"]
        self.padded_vocab_size = cfg["padded_vocab_size"]
        self.max_seq_len = m["max_seq_len"]
        self.hidden_size = H = m["hidden_size"]
        self.num_layers = m["num_layers"]
        self.num_kv_heads = m["num_kv_heads"] or m["num_heads"]
        self.head_dim = H // m["num_heads"]
        self.rope = m["position"] == "rope"
        self.rope_base = float(m["rope_base"])

        self.embed_tokens = nn.Embedding(self.padded_vocab_size, H, dtype=dtype,
                                         _weight=torch.empty(self.padded_vocab_size, H, dtype=dtype))
        self.embed_positions = None
        if not self.rope:
            self.embed_positions = nn.Embedding(
                self.max_seq_len, H, dtype=dtype, _weight=torch.empty(self.max_seq_len, H, dtype=dtype))
        self.layers = nn.ModuleList(Block(m, dtype) for _ in range(self.num_layers))
        self.final_norm = Norm(H, m["norm"], m["norm_bias"], m["norm_eps"], dtype)
        self.lm_head = None
        if not m["tie_embeddings"]:
            self.lm_head = Linear(H, self.padded_vocab_size, m["lm_head_bias"], dtype)
        self.noise_encoder = None
        if self.kind == "pflm":
            self.noise_encoder = NoiseEncoder(H, max_freq=cfg["noise"]["max_freq"], dtype=dtype,
                                              features=cfg["noise"]["features"])
        self.register_buffer("masked_ids", torch.tensor(cfg["masked_token_ids"], dtype=torch.long),
                             persistent=False)
        self.requires_grad_(False)
        # forward_step's fast path (fused q/k/v, rotary rows from a table); False runs the
        # plain per-projection path, the reference the tests compare it with
        self.fast = True
        self._rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_weight_shapes(self.config)

    def init_random_(self, seed: int = 0, std: float = 0.02) -> "DecoderLM":
        """Fill every weight with N(0, std) (norm weights 1, biases 0): benchmarks and tests."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
                elif "norm" in name.rsplit(".", 2)[-2]:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DecodeError(f"{name} must be an integer tensor [batch, seq], got "
                              f"{ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise DecodeError(f"{name} holds token ids outside [0, {self.vocab_size}) (min "
                              f"{int(ids.min())}, max {int(ids.max())}); encode with the "
                              f"checkpoint's tokenizer")

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.embed_tokens.weight)
        if self.embed_positions is not None:
            h = h + F.embedding(positions, self.embed_positions.weight)
        return h

    def encode_noise(self, u: torch.Tensor, tau) -> torch.Tensor:
        """NoiseEncoder(u, tau) in the model's dtype: u [b, m] -> [b, m, H], what a noise slot
        holds before its position embedding. It depends on (u, tau) only, so a decode can encode
        its whole noise table in one batched pass and give :meth:`forward_step` the rows."""
        self._require_pflm()
        if not isinstance(tau, torch.Tensor):
            tau = torch.tensor(float(tau), dtype=torch.float64, device=u.device)
        elif tau.dim() == 1:
            tau = tau.to(u.device)[:, None]
        return self.noise_encoder(u, tau).to(self.dtype)

    def _embed_noise(self, u: torch.Tensor, tau, positions: torch.Tensor) -> torch.Tensor:
        """Noise slot inputs: NoiseEncoder(u, tau) (u [b, m], or its encode_noise rows
        [b, m, H]) + the learned position embedding of the slot, like any input there."""
        h = u if u.dim() == 3 else self.encode_noise(u, tau)
        if self.embed_positions is not None:
            h = h + F.embedding(positions, self.embed_positions.weight)
        return h

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """final-normed hidden [.., H] -> float32 logits [.., padded_vocab_size]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        bias = None if self.lm_head is None else self.lm_head.bias
        logits = F.linear(hidden, weight, bias).float()
        if self.padded_vocab_size > self.vocab_size:
            logits[..., self.vocab_size:] = PADDED_LOGIT_VALUE
        if self.masked_ids.numel():
            logits.index_fill_(-1, self.masked_ids, MASKED_LOGIT_VALUE)
        return logits

    def _input_major_weights(self) -> None:
        """On a CPU, store the LM head's and each MLP output projection's weight input-major
        (the same [out, in] parameter over [in, out]-contiguous memory, no copy kept): MKL
        multiplies a few rows by the wide head (and by the 4x-wide down projection) markedly
        faster in that layout, which a PFLM step's 2k rows and its k head rows feel most. Same
        values and names; a tied head stays as is (token lookups read embedding rows)."""
        if self.device.type != "cpu":
            return
        linears = [layer.mlp.fc2 if hasattr(layer.mlp, "fc2") else layer.mlp.down_proj
                   for layer in self.layers]
        if self.lm_head is not None:
            linears.append(self.lm_head)
        for lin in linears:
            w = lin.weight
            if w.dim() == 2 and w.stride(0) != 1 and w.shape[0] > 1:
                w.data = w.data.t().contiguous().t()

    def _rotary_table(self, length: int, device: torch.device):
        """cos/sin [length, head_dim] of positions 0..length-1, grown on demand: the fast path
        gathers rows instead of recomputing pow/cos/sin every step. Same float32 maths as
        :func:`rotary_tables`, so the values are identical."""
        table = self._rope_table
        if table is None or table[0].shape[0] < length or table[0].device != device:
            size = max(length, 2 * (table[0].shape[0] if table is not None else 0), 256)
            pos = torch.arange(size, device=device)[None]
            cos, sin = rotary_tables(pos, self.head_dim, self.rope_base)
            table = self._rope_table = (cos[0, 0], sin[0, 0])
        return table

    def _plan(self, positions: torch.Tensor, mask: torch.Tensor, fast: bool = False,
              max_position: Optional[int] = None) -> _StepPlan:
        rep = self.model_config["num_heads"] // self.num_kv_heads
        if rep > 1:
            mask = mask.repeat(1, 1, rep, 1)
        rotary = None
        if self.rope and fast:
            cos, sin = self._rotary_table(max_position + 1, positions.device)
            rotary = (cos[positions][:, :, None], sin[positions][:, :, None])  # [b, s, 1, d]
        elif self.rope:
            rotary = rotary_tables(positions, self.head_dim, self.rope_base)
        return _StepPlan(rotary=rotary, mask=mask, fast=fast)

    def _run(self, hidden: torch.Tensor, plan: _StepPlan, cache: Optional[KVCache] = None):
        """The layers; with ``plan.out_rows`` set, the result holds those rows only."""
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            if cache is None:
                hidden = layer(hidden, plan, last=i == last)
            else:
                hidden = layer(hidden, plan, cache.k[i], cache.v[i], last=i == last)
        return hidden

    # ------------------------------------------------------------------ reference (no cache)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward: input_ids [b, s] -> float32 logits [b, s, padded_vocab_size]."""
        self._check_ids(input_ids, "input_ids")
        b, s = input_ids.shape
        if not self.rope and s > self.max_seq_len:
            raise DecodeError(f"{s} tokens exceed model.max_seq_len={self.max_seq_len} (learned "
                              f"positions); shorten the input")
        dev = input_ids.device
        pos = torch.arange(s, device=dev).expand(b, s)
        mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None]
        hidden = self._run(self._embed(input_ids, pos), self._plan(pos, mask))
        return self._head(self.final_norm(hidden))

    @torch.no_grad()
    def pflm_logits(self, context_ids: torch.Tensor, u: torch.Tensor, tau=1.0) -> torch.Tensor:
        """Reference PFLM pass: context [b, s] + k noise slots -> float32 logits [b, k, V_padded].

        Slot i (0-based) sits at position s + i (i.e. t + i + 1 with t = s - 1 the last context
        position); it sees the whole context and slots 0..i. ``tau``: float or [b].
        """
        self._require_pflm()
        self._check_ids(context_ids, "context_ids")
        b, s = context_ids.shape
        if u.dim() != 2 or u.shape[0] != b:
            raise DecodeError(f"u must have shape [batch, k] = [{b}, k], got {tuple(u.shape)}")
        k = u.shape[1]
        if not self.rope and s + k > self.max_seq_len:
            raise DecodeError(f"context {s} + {k} slots exceed model.max_seq_len="
                              f"{self.max_seq_len} (learned positions)")
        dev = context_ids.device
        pos = torch.arange(s + k, device=dev).expand(b, s + k)
        n = s + k
        qi = torch.arange(n, device=dev)[:, None]
        ki = torch.arange(n, device=dev)[None, :]
        ctx_hi = torch.where(qi < s, qi, torch.full_like(qi, s - 1))
        mask = (ki <= ctx_hi) | ((qi >= s) & (ki >= s) & (ki <= qi))
        hidden = torch.cat([self._embed(context_ids, pos[:, :s]),
                            self._embed_noise(u.to(dev), tau, pos[:, s:])], dim=1)
        hidden = self._run(hidden, self._plan(pos, mask[None, None]))
        return self._head(self.final_norm(hidden[:, s:]))

    def _require_pflm(self) -> None:
        if self.noise_encoder is None:
            raise DecodeError("this is an 'ar' checkpoint: it has no noise encoder, so it cannot "
                              "run PFLM noise slots; load a 'pflm' checkpoint or decode with "
                              "mode='ar'")

    # ------------------------------------------------------------------ cached decoding

    def allocate_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                       device=None) -> KVCache:
        """A static cache for ``batch`` sequences; ``max_len`` is the number of slots, which must
        cover every step's ``length + chunk + noise slots`` (scratch included)."""
        if batch < 1 or max_len < 1:
            raise DecodeError(f"allocate_cache needs batch >= 1 and max_len >= 1, got "
                              f"{batch}, {max_len}")
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else torch.device(device)
        shape = (self.num_layers, batch, self.num_kv_heads, max_len, self.head_dim)
        # Zero-filled, not empty: never-written slots are masked out, but uninitialised memory
        # could hold NaN/inf, and 0 * NaN in the attention product would still be NaN.
        return KVCache(k=torch.zeros(shape, dtype=dtype, device=device),
                       v=torch.zeros(shape, dtype=dtype, device=device),
                       lengths=torch.zeros(batch, dtype=torch.long, device=device),
                       host_lengths=torch.zeros(batch, dtype=torch.long))

    @torch.no_grad()
    def forward_step(self, cache: KVCache, input_ids: Optional[torch.Tensor] = None,
                     num_new: Union[None, int, Sequence[int], torch.Tensor] = None,
                     noise_u: Optional[torch.Tensor] = None, tau=1.0,
                     output: str = "auto", check_ids: bool = True,
                     static: bool = False) -> Optional[torch.Tensor]:
        """One forward pass over, per sequence, a chunk of real tokens then noise slots.

        ``input_ids`` [b, c] (or None: c = 0): right-padded real tokens; the first ``num_new[b]``
        (default all c) of row b are appended to sequence b at positions length[b] ... ``noise_u``
        [b, m] (PFLM only, or None; or :meth:`encode_noise` of it, [b, m, H], which ``tau`` then
        no longer affects): noise slot i of sequence b sits at position
        ``length[b] + num_new[b] + i`` and sees the sequence (new tokens included) and slots
        0..i; its keys/values are not kept. ``tau``: float or [b] tensor for the noise encoder.
        After the call ``cache.lengths += num_new``.

        ``output``: "last" -> [b, V_padded] logits of each sequence's last new real token;
        "noise" -> [b, m, V_padded] logits of the noise slots; "all" -> [b, c+m, V_padded]
        (padding rows are meaningless); "none" -> None; "auto" = "noise" if m else "last".
        ``check_ids=False`` skips the token-range check (a device sync) for ids the model made.
        ``static=True`` attends over the whole cache capacity (masked past each sequence's end)
        instead of the longest sequence's prefix: every tensor shape then depends only on
        (batch, c, m), which CUDA graphs need (:class:`kforcing_dist.decode.graphs.GraphStepper`).
        """
        b = cache.batch
        c = 0 if input_ids is None else input_ids.shape[1]
        m = 0 if noise_u is None else noise_u.shape[1]
        s = c + m
        if output not in OUTPUTS:
            raise DecodeError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "auto":
            output = "noise" if m else "last"
        if s == 0:
            raise DecodeError("forward_step needs input_ids and/or noise_u (got neither)")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != b:
                raise DecodeError(f"input_ids must be [batch, c] = [{b}, c], got "
                                  f"{tuple(input_ids.shape)}")
            if check_ids:
                self._check_ids(input_ids, "input_ids")
        if noise_u is not None:
            self._require_pflm()
            if noise_u.shape[0] != b or not (noise_u.dim() == 2 or (
                    noise_u.dim() == 3 and noise_u.shape[2] == self.hidden_size)):
                raise DecodeError(f"noise_u must be [batch, m] = [{b}, m] (or its encode_noise "
                                  f"rows [{b}, m, {self.hidden_size}]), got "
                                  f"{tuple(noise_u.shape)}")
        if num_new is None:
            n_host = torch.full((b,), c, dtype=torch.long)
        elif isinstance(num_new, int):
            n_host = torch.full((b,), num_new, dtype=torch.long)
        else:
            n_host = torch.as_tensor(num_new, dtype=torch.long).cpu()
        if n_host.shape != (b,) or (c and (int(n_host.min()) < 0 or int(n_host.max()) > c)) \
                or (not c and int(n_host.abs().max()) != 0):
            raise DecodeError(f"num_new must give, per sequence, 0..{c} real tokens of the "
                              f"chunk, got {n_host.tolist()}")
        if output == "last" and (c == 0 or int(n_host.min()) < 1):
            raise DecodeError("output='last' needs at least one new real token per sequence")
        if output == "noise" and m == 0:
            raise DecodeError("output='noise' needs noise_u")
        len_host = cache.host_lengths
        need = int((len_host + s).max())
        if need > cache.capacity:
            raise DecodeError(f"the step needs {need} cache slots (length + {c} tokens + {m} "
                              f"noise slots) but the cache holds {cache.capacity}; allocate a "
                              f"larger cache")
        if not self.rope and int((len_host + n_host + m).max()) > self.max_seq_len:
            raise DecodeError(f"positions past model.max_seq_len={self.max_seq_len} (learned "
                              f"positions); generate fewer tokens or use shorter prompts")

        dev = cache.device
        key_len = cache.capacity if static else need
        out = self.step_on_device(cache, None if input_ids is None else input_ids.to(dev),
                                  n_host.to(dev, non_blocking=True),
                                  None if noise_u is None else noise_u.to(dev), tau, key_len,
                                  output)
        len_host += n_host
        return out

    def step_on_device(self, cache: KVCache, input_ids: Optional[torch.Tensor], n: torch.Tensor,
                       noise_u: Optional[torch.Tensor], tau, key_len: int,
                       output: str) -> Optional[torch.Tensor]:
        """The device work of :meth:`forward_step`, unchecked: no host sync, no host-to-device
        copy (``n``: device [b] new real tokens per row; ``tau`` a float or a device tensor), so
        a CUDA graph can capture it. Advances ``cache.lengths`` by ``n``, not host_lengths."""
        b = cache.batch
        c = 0 if input_ids is None else input_ids.shape[1]
        m = 0 if noise_u is None else noise_u.shape[1]
        s = c + m
        dev = cache.device
        if self.fast:
            self._input_major_weights()
        lengths = cache.lengths
        ar = torch.arange(s, device=dev)
        write = lengths[:, None] + ar  # [b, s] cache index of every chunk entry
        new_len = lengths + n
        parts = []
        pos_real = write[:, :c]
        pos_noise = new_len[:, None] + ar[:m]
        if self.embed_positions is not None:
            # padding rows may run past the table; their outputs are never used
            pos_real = pos_real.clamp(max=self.max_seq_len - 1)
        if c:
            parts.append(self._embed(input_ids, pos_real))
        if m:
            parts.append(self._embed_noise(noise_u, tau, pos_noise))
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        positions = torch.cat([pos_real, pos_noise], dim=1) if m and c else \
            (pos_real if c else pos_noise)

        kidx = torch.arange(key_len, device=dev)
        # Per query: visible context is [0, ctx_hi]; noise slots also see [noise_lo, write].
        # Real query j: ctx_hi = length + j (old cache + new tokens 0..j); noise slot i:
        # ctx_hi = new_len - 1, plus the slots 0..i at cache indices length + c .. length + c + i.
        ctx_hi = torch.cat([write[:, :c], (new_len - 1)[:, None].expand(b, m)], dim=1)
        noise_lo = torch.cat([torch.full((b, c), key_len, device=dev, dtype=torch.long),
                              (lengths + c)[:, None].expand(b, m)], dim=1)
        kk = kidx[None, None, :]
        mask = (kk <= ctx_hi[..., None]) | ((kk >= noise_lo[..., None]) & (kk <= write[..., None]))
        plan = self._plan(positions, mask[:, None], fast=self.fast, max_position=key_len)
        heads = torch.arange(b * self.num_kv_heads, device=dev).view(b, self.num_kv_heads, 1)
        plan.write_rows = (heads * cache.capacity + write[:, None, :]).reshape(-1)
        plan.key_len = key_len
        # Only the rows the output reads go through the last layer's attention and MLP: a PFLM
        # step's k fed-back tokens need their keys/values there, not their hidden states.
        if output == "noise":
            plan.out_rows = slice(c, s)
        elif output == "none":
            plan.out_rows = slice(0, 0)
        elif output == "last" and s > 1:
            plan.out_rows = (n - 1)[:, None]
        if plan.out_rows is not None:
            rep = self.model_config["num_heads"] // self.num_kv_heads
            plan.out_mask = take_rows(mask[:, None], plan.out_rows, 2).repeat(1, 1, rep, 1)
        hidden = self._run(hidden, plan, cache)

        lengths += n

        if output == "none":
            return None
        if output == "last":
            return self._head(self.final_norm(hidden))[:, -1]
        return self._head(self.final_norm(hidden))
