"""The paper's released checkpoints (Tang et al. 2026: ``ar_openwebtxt.ckpt``, ``ar_best_lm1b.ckpt``,
``pflm_owt_k4.ckpt``, ``pflm_lm1b_k4.ckpt``) -> our full weights and decoder config.

The file is a ``torch.save`` dict whose ``state_dict`` keys may carry a ``backbone.`` prefix; it is
read with ``torch.load(weights_only=True)``. The architecture is the MDLM backbone: bias-free
LayerNorm (eps 1e-5), tanh GELU, pre-norm blocks, rotate-half rotary (base recovered from the stored
``inv_freq``), fused bias-free qkv laid out (q|k|v, head, head_dim), untied head with bias, the
mask token's logit forced to -1000; a PFLM's noise encoder runs the released noise features
(falling frequencies, exact GELU: ``features: released`` in :mod:`kforcing_dist.nn.noise`).
Neither the head count, the context length nor the mask token id is in the file: they come from
a preset (``owt``, ``lm1b``) or explicit arguments.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch

from ..config.schema import ModelConfig
from ..nn.noise import noise_section
from ..nn.sizes import pad_vocab_size
from ..training.checkpoint import CheckpointError
from .safeload import load_torch_file

# What the paper (Tang et al. 2026) states for its two datasets: 12 heads of 64, GPT-2
# vocabulary + one mask token at length 1024 (OWT), bert-base-uncased at length 128 (LM1B).
PRESETS = {
    "owt": {"num_heads": 12, "max_seq_len": 1024, "mask_token_id": 50257, "vocab_size": 50258},
    "lm1b": {"num_heads": 12, "max_seq_len": 128, "mask_token_id": 103, "vocab_size": 30522},
}

# released name (after the backbone. prefix) -> our name; {i} is the block index
NAME_MAP = (
    (r"vocab_embed\.embedding", "embed_tokens.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", "layers.{0}.input_norm.weight"),
    (r"blocks\.(\d+)\.attn_out\.weight", "layers.{0}.attention.out_proj.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", "layers.{0}.mlp_norm.weight"),
    (r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", "layers.{0}.mlp.fc1.{1}"),
    (r"blocks\.(\d+)\.mlp\.2\.(weight|bias)", "layers.{0}.mlp.fc2.{1}"),
    (r"output_layer\.norm_final\.weight", "final_norm.weight"),
    (r"output_layer\.linear\.(weight|bias)", "lm_head.{0}"),
    (r"noise_encoder\.(combined_proj|mlp\.0|mlp\.2)\.(weight|bias)", "noise_encoder.{0}.{1}"),
    (r"noise_encoder\.norm\.(weight|bias)", "noise_encoder.norm.{0}"),
)
QKV_RE = re.compile(r"blocks\.(\d+)\.attn_qkv\.weight")
INV_FREQ = "rotary_emb.inv_freq"


def read_released_state_dict(path) -> dict[str, torch.Tensor]:
    obj = load_torch_file(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} has no state_dict of tensors; it is not one of the released K-Forcing "
                              f"checkpoints (expected a dict with a 'state_dict' entry)")
    return {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}


def _rope_base(inv_freq: torch.Tensor, head_dim: int, where: str) -> float:
    if inv_freq.shape != (head_dim // 2,):
        raise CheckpointError(f"{where}: {INV_FREQ} has shape {tuple(inv_freq.shape)}, a head of {head_dim} "
                              f"needs ({head_dim // 2},): wrong num_heads?")
    base = float(inv_freq[1].double() ** (-head_dim / 2.0))
    base = float(round(base)) if abs(base - round(base)) < 1e-3 * base else base
    want = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not torch.allclose(inv_freq.double(), want, rtol=1e-4):
        raise CheckpointError(f"{where}: {INV_FREQ} is not a standard rotary table for any base; the file "
                              f"is not the documented format")
    return base


def import_released(path, *, num_heads: int, max_seq_len: int, mask_token_id: int,
                    make_vocab_size_divisible_by: int = 64, max_k: Optional[int] = None) -> dict:
    """The keyword arguments of ``save_decoder`` (kind, model_config, padded_vocab_size, state_dict,
    masked_token_ids, max_k, noise) for a released file. ``max_k`` is required for a PFLM file (k=4
    for the released ones); the noise encoder is stored under its own (matching) names and runs
    the released noise-feature convention (``noise.features: released``)."""
    from ..training.export import fit_vocab_rows

    where = str(path)
    sd = read_released_state_dict(path)
    if "vocab_embed.embedding" not in sd:
        raise CheckpointError(f"{where}: no vocab_embed.embedding; not the released K-Forcing format")
    V, H = sd["vocab_embed.embedding"].shape
    if H % num_heads:
        raise CheckpointError(f"{where}: hidden size {H} is not divisible by num_heads={num_heads}")
    hd = H // num_heads
    out: dict[str, torch.Tensor] = {}
    blocks: set[int] = set()
    unknown = []
    for key, t in sd.items():
        if key == INV_FREQ:
            continue
        m = QKV_RE.fullmatch(key)
        if m:
            i = int(m.group(1))
            blocks.add(i)
            if t.shape != (3 * H, H):
                raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {(3 * H, H)}")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, 0)):
                out[f"layers.{i}.attention.{name}.weight"] = part.float().contiguous()
            continue
        for pattern, target in NAME_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                if m.groups() and pattern.startswith("blocks"):
                    blocks.add(int(m.group(1)))
                out[target.format(*m.groups())] = t.float()
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: keys outside the documented released format: {sorted(unknown)[:8]}")
    L = len(blocks)
    if blocks != set(range(L)):
        raise CheckpointError(f"{where}: blocks {sorted(set(range(max(blocks) + 1)) - blocks)} are missing "
                              f"(a truncated file?)")
    if INV_FREQ not in sd:
        raise CheckpointError(f"{where}: {INV_FREQ} is missing; the rotary base cannot be recovered")
    kind = "pflm" if any(k.startswith("noise_encoder.") for k in out) else "ar"
    if kind == "pflm" and not (isinstance(max_k, int) and max_k >= 1):
        raise CheckpointError(f"{where} is a PFLM (it has a noise encoder): pass max_k, the k it was trained "
                              f"with (4 for the released pflm_*_k4 files)")
    if "layers.0.mlp.fc1.weight" not in out:
        raise CheckpointError(f"{where}: blocks.0.mlp.0.weight is missing (a truncated file?)")
    F = out["layers.0.mlp.fc1.weight"].shape[0]
    if not 0 <= mask_token_id < V:
        raise CheckpointError(f"mask_token_id {mask_token_id} is outside the vocabulary of {V}")
    model = dataclasses.asdict(ModelConfig())
    model.update(vocab_size=V, make_vocab_size_divisible_by=make_vocab_size_divisible_by, hidden_size=H,
                 num_layers=L, num_heads=num_heads, num_kv_heads=0, ffn_hidden_size=F, max_seq_len=max_seq_len,
                 norm="layernorm", norm_bias=False, norm_eps=1e-5, activation="gelu_tanh", mlp_bias=True,
                 qkv_bias=False, attn_out_bias=False, position="rope",
                 rope_base=_rope_base(sd[INV_FREQ], hd, where), tie_embeddings=False, lm_head_bias=True,
                 attention_backend="auto")
    padded = pad_vocab_size(V, make_vocab_size_divisible_by, 1)
    return {"kind": kind, "model_config": model, "padded_vocab_size": padded,
            "state_dict": fit_vocab_rows(out, padded), "masked_token_ids": [mask_token_id],
            "max_k": max_k if kind == "pflm" else None,
            "noise": noise_section("released", None) if kind == "pflm" else None}


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: weights {bad[:5]} hold NaN/inf; the file is corrupt")

