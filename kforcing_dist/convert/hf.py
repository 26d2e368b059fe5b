"""Hugging Face ``transformers`` checkpoints <-> our full (TP=1) weights, without importing transformers.

One two-way mapping table per family (``FAMILIES``: our tensor names, theirs, and a named
transform with its inverse), read one way by the import and the other by ``to-hf``: GPT-2
(learned positions, LayerNorm with bias, tied head, Conv1D weights stored [in, out], fused
c_attn), Llama (RMSNorm, SwiGLU, rotary, GQA, untied) and GPT-NeoX (fused per-head
query_key_value, sequential residual, rotary on every head dim; the export target of the default
paper architecture). Every config field is mapped
explicitly; a field missing from config.json takes the value ``transformers`` itself defaults it to
(written out in ``HF_DEFAULTS``, because ``save_pretrained`` omits fields equal to the default).
Whatever cannot be represented is refused (e.g. a bias the target lacks, unless it is zero).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config.schema import ModelConfig
from ..nn.sizes import ffn_hidden_size, pad_vocab_size
from ..training.checkpoint import CheckpointError
from .safeload import load_weight_folder

# transformers' class defaults for every field read below (transformers 5.x).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "head_dim": None, "rope_theta": 10000.0},
    "gpt_neox": {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
                 "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
                 "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "use_parallel_residual": True,
                 "attention_bias": True, "rotary_pct": 0.25, "rope_theta": 10000.0},
}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXPORT_ACT = "gelu_pytorch_tanh"  # exactly torch's gelu(approximate="tanh"), our activation


def read_hf_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a folder saved with save_pretrained")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg


def _get(cfg: Mapping, family: str, key: str):
    return cfg[key] if key in cfg else HF_DEFAULTS[family][key]


def _rope_theta(cfg: Mapping, family: str, where: str) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{where}: rope type {kind!r} (scaled rotary) is not supported; only the "
                                  f"default rotary embedding is")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(_get(cfg, family, "rope_theta"))


def _family(cfg: Mapping, where: str) -> str:
    family = cfg.get("model_type")
    if family not in ("gpt2", "llama", "gpt_neox"):
        raise CheckpointError(f"{where}: model_type {family!r} is not supported; supported: gpt2, llama (and "
                              f"Llama-family configs with model_type llama), gpt_neox")
    return family


# --------------------------------------------------------------------------------------------
# config mapping


def model_config_from_hf(cfg: Mapping, where: str = "config.json") -> dict:
    """Every ModelConfig field from a Hugging Face config (no field left to our own defaults)."""
    family = _family(cfg, where)
    g = lambda k: _get(cfg, family, k)  # noqa: E731
    if family == "gpt2":
        act = g("activation_function")
        if act not in TANH_GELUS:
            raise CheckpointError(f"{where}: activation_function {act!r} is not the tanh GELU this model has")
        if not g("scale_attn_weights") or g("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(f"{where}: scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true "
                                  f"change the attention scale; not supported")
        H = int(g("n_embd"))
        m = dict(vocab_size=int(g("vocab_size")), hidden_size=H, num_layers=int(g("n_layer")),
                 num_heads=int(g("n_head")), num_kv_heads=0, ffn_hidden_size=int(g("n_inner") or 4 * H),
                 max_seq_len=int(g("n_positions")), norm="layernorm", norm_bias=True,
                 norm_eps=float(g("layer_norm_epsilon")), activation="gelu_tanh", mlp_bias=True,
                 qkv_bias=True, attn_out_bias=True, position="learned", rope_base=10000.0,
                 tie_embeddings=bool(g("tie_word_embeddings")), lm_head_bias=False)
    elif family == "llama":
        if g("hidden_act") != "silu":
            raise CheckpointError(f"{where}: hidden_act {g('hidden_act')!r}; a Llama MLP must be silu (SwiGLU)")
        H, nh = int(g("hidden_size")), int(g("num_attention_heads"))
        if g("head_dim") not in (None, H // nh):
            raise CheckpointError(f"{where}: head_dim {g('head_dim')} differs from hidden_size/num_attention_heads "
                                  f"({H // nh}); not supported")
        nkv = g("num_key_value_heads")
        m = dict(vocab_size=int(g("vocab_size")), hidden_size=H, num_layers=int(g("num_hidden_layers")),
                 num_heads=nh, num_kv_heads=int(nkv) if nkv not in (None, nh) else 0,
                 ffn_hidden_size=int(g("intermediate_size")), max_seq_len=int(g("max_position_embeddings")),
                 norm="rmsnorm", norm_bias=False, norm_eps=float(g("rms_norm_eps")), activation="swiglu",
                 mlp_bias=bool(g("mlp_bias")), qkv_bias=bool(g("attention_bias")),
                 attn_out_bias=bool(g("attention_bias")), position="rope", rope_base=_rope_theta(cfg, family, where),
                 tie_embeddings=bool(g("tie_word_embeddings")), lm_head_bias=False)
    else:
        if g("use_parallel_residual"):
            raise CheckpointError(f"{where}: use_parallel_residual=true (parallel attention+MLP) is not this "
                                  f"model's sequential block")
        rot = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", g("rotary_pct"))
        if float(rot) != 1.0:
            raise CheckpointError(f"{where}: rotary on {rot} of each head is not supported (needs 1.0)")
        if g("hidden_act") not in TANH_GELUS:
            raise CheckpointError(f"{where}: hidden_act {g('hidden_act')!r} is not the tanh GELU")
        m = dict(vocab_size=int(g("vocab_size")), hidden_size=int(g("hidden_size")),
                 num_layers=int(g("num_hidden_layers")), num_heads=int(g("num_attention_heads")), num_kv_heads=0,
                 ffn_hidden_size=int(g("intermediate_size")), max_seq_len=int(g("max_position_embeddings")),
                 norm="layernorm", norm_bias=True, norm_eps=float(g("layer_norm_eps")), activation="gelu_tanh",
                 mlp_bias=True, qkv_bias=bool(g("attention_bias")), attn_out_bias=bool(g("attention_bias")),
                 position="rope", rope_base=_rope_theta(cfg, family, where),
                 tie_embeddings=bool(g("tie_word_embeddings")), lm_head_bias=False)
    defaults = dataclasses.asdict(ModelConfig())
    # the two fields that do not change the function: the training init and the attention kernel choice
    m.update(make_vocab_size_divisible_by=defaults["make_vocab_size_divisible_by"],
             init_std=float(cfg.get("initializer_range", defaults["init_std"])), attention_backend="auto")
    missing = set(defaults) - set(m)
    if missing:  # a ModelConfig field added without a mapping here: fail loudly, never default silently
        raise RuntimeError(f"the Hugging Face mapping does not set ModelConfig fields {sorted(missing)}")
    return m


# --------------------------------------------------------------------------------------------
# weights: one two-way mapping table per family
#
# A rule maps our tensor(s) to one transformers tensor through a named transform; import runs the
# transform's inverse. Import reads a tensor when our model has it (``ours_has``); export writes it
# when the target has it (``theirs_has``), as zeros where ours lacks a bias (exact: a zero bias is no
# bias).


class Transform:
    """How our tensors become one of theirs (``to_hf``) and back (``from_hf``)."""

    name = "same"

    def to_hf(self, ours: list[torch.Tensor], m: Mapping) -> torch.Tensor:
        return ours[0]

    def from_hf(self, theirs: torch.Tensor, n: int, m: Mapping) -> list[torch.Tensor]:
        return [theirs]


class Transposed(Transform):
    """GPT-2's Conv1D stores a linear layer's weight as [in, out]."""

    name = "transposed"

    def to_hf(self, ours, m):
        return ours[0].t().contiguous()

    def from_hf(self, theirs, n, m):
        return [theirs.t().contiguous()]


class Stacked(Transform):
    """Our projections (q, k, v) stacked along the output rows, optionally stored transposed."""

    def __init__(self, transposed: bool = False):
        self.transposed = transposed
        self.name = "stacked_transposed" if transposed else "stacked"

    def to_hf(self, ours, m):
        out = torch.cat(ours, 0)
        return out.t().contiguous() if self.transposed else out

    def from_hf(self, theirs, n, m):
        rows = theirs.t() if self.transposed else theirs
        return [part.contiguous() for part in rows.chunk(n, 0)]


class HeadInterleaved(Transform):
    """GPT-NeoX's fused query_key_value: rows laid out (head, q|k|v, head_dim)."""

    name = "head_interleaved"

    def to_hf(self, ours, m):
        nh = m["num_heads"]
        rest = ours[0].shape[1:]
        stacked = torch.stack([t.view(nh, -1, *rest) for t in ours], 1)
        return stacked.reshape(-1, *rest).contiguous()

    def from_hf(self, theirs, n, m):
        nh = m["num_heads"]
        rest = theirs.shape[1:]
        heads = theirs.view(nh, n, -1, *rest)
        return [heads[:, j].reshape(-1, *rest).contiguous() for j in range(n)]


SAME, TRANSPOSED, STACKED, STACKED_T, HEADS = Transform(), Transposed(), Stacked(), Stacked(True), HeadInterleaved()


def _always(m: Mapping) -> bool:
    return True


def _flag(*names: str):
    """A rule condition: any of these ModelConfig flags is set."""
    return lambda m: any(bool(m[n]) for n in names)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]          # our key(s); "{i}" is the layer index
    theirs: str                    # their key, without the family prefix
    transform: Transform = SAME
    ours_has: Any = _always        # does our model have these tensors (read on import)?
    theirs_has: Any = _always      # does the target have this tensor (written on export)?


def _r(ours, theirs, transform=SAME, ours_has=_always, theirs_has=_always) -> Rule:
    return Rule((ours,) if isinstance(ours, str) else tuple(ours), theirs, transform, ours_has, theirs_has)


def _norm_rules(ours: str, theirs: str, bias: bool) -> list[Rule]:
    return [_r(f"{ours}.weight", f"{theirs}.weight")] + ([_r(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


QKV = ("q_proj", "k_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    prefix: str                    # their module prefix (stripped on import, added on export)
    rules: tuple[Rule, ...]        # whole-model rules (embeddings, final norm)
    layer: tuple[Rule, ...]        # per-block rules, "{i}" the block index
    head: str                      # their untied LM head (outside the prefix)
    skip: str = r"$^"              # their keys that are buffers, not weights


_L = "layers.{i}."
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "transformer.",
        (_r("embed_tokens.weight", "wte.weight"), _r("embed_positions.weight", "wpe.weight"),
         *_norm_rules("final_norm", "ln_f", True)),
        (*_norm_rules(_L + "input_norm", "h.{i}.ln_1", True), *_norm_rules(_L + "mlp_norm", "h.{i}.ln_2", True),
         _r([_L + f"attention.{n}.weight" for n in QKV], "h.{i}.attn.c_attn.weight", STACKED_T),
         _r([_L + f"attention.{n}.bias" for n in QKV], "h.{i}.attn.c_attn.bias", STACKED),
         _r(_L + "attention.out_proj.weight", "h.{i}.attn.c_proj.weight", TRANSPOSED),
         _r(_L + "attention.out_proj.bias", "h.{i}.attn.c_proj.bias"),
         _r(_L + "mlp.fc1.weight", "h.{i}.mlp.c_fc.weight", TRANSPOSED), _r(_L + "mlp.fc1.bias", "h.{i}.mlp.c_fc.bias"),
         _r(_L + "mlp.fc2.weight", "h.{i}.mlp.c_proj.weight", TRANSPOSED),
         _r(_L + "mlp.fc2.bias", "h.{i}.mlp.c_proj.bias")),
        "lm_head.weight",
        # old checkpoints carry the causal mask as buffers: not weights
        skip=r"h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": Family(
        "model.",
        (_r("embed_tokens.weight", "embed_tokens.weight"), _r("final_norm.weight", "norm.weight")),
        (_r(_L + "input_norm.weight", _L + "input_layernorm.weight"),
         _r(_L + "mlp_norm.weight", _L + "post_attention_layernorm.weight"),
         *[_r(_L + f"attention.{ours}.weight", _L + f"self_attn.{theirs}.weight")
           for ours, theirs in (*((n, n) for n in QKV), ("out_proj", "o_proj"))],
         *[_r(_L + f"attention.{n}.bias", _L + f"self_attn.{n}.bias", ours_has=_flag("qkv_bias"),
              theirs_has=_flag("qkv_bias", "attn_out_bias")) for n in QKV],
         _r(_L + "attention.out_proj.bias", _L + "self_attn.o_proj.bias", ours_has=_flag("attn_out_bias"),
            theirs_has=_flag("qkv_bias", "attn_out_bias")),
         *[_r(_L + f"mlp.{n}.weight", _L + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")],
         *[_r(_L + f"mlp.{n}.bias", _L + f"mlp.{n}.bias", ours_has=_flag("mlp_bias"), theirs_has=_flag("mlp_bias"))
           for n in ("gate_proj", "up_proj", "down_proj")]),
        "lm_head.weight"),
    "gpt_neox": Family(
        "gpt_neox.",
        (_r("embed_tokens.weight", "embed_in.weight"), *_norm_rules("final_norm", "final_layer_norm", True)),
        (*_norm_rules(_L + "input_norm", _L + "input_layernorm", True),
         *_norm_rules(_L + "mlp_norm", _L + "post_attention_layernorm", True),
         _r([_L + f"attention.{n}.weight" for n in QKV], _L + "attention.query_key_value.weight", HEADS),
         _r([_L + f"attention.{n}.bias" for n in QKV], _L + "attention.query_key_value.bias", HEADS,
            ours_has=_flag("qkv_bias")),
         _r(_L + "attention.out_proj.weight", _L + "attention.dense.weight"),
         _r(_L + "attention.out_proj.bias", _L + "attention.dense.bias", ours_has=_flag("attn_out_bias")),
         _r(_L + "mlp.fc1.weight", _L + "mlp.dense_h_to_4h.weight"),
         _r(_L + "mlp.fc1.bias", _L + "mlp.dense_h_to_4h.bias"),
         _r(_L + "mlp.fc2.weight", _L + "mlp.dense_4h_to_h.weight"),
         _r(_L + "mlp.fc2.bias", _L + "mlp.dense_4h_to_h.bias")),
        "embed_out.weight"),
}


def _rules(family: Family, m: Mapping):
    """Every rule of the model, with the layer index filled in."""
    yield from family.rules
    for i in range(m["num_layers"]):
        for rule in family.layer:
            yield dataclasses.replace(rule, ours=tuple(k.format(i=i) for k in rule.ours),
                                      theirs=rule.theirs.format(i=i))


def _take(sd: dict, key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{where}: weight {key!r} is missing; the weights do not match config.json "
                              f"(a truncated or partial save?)")
    return sd.pop(key)


def weights_from_hf(family: str, m: Mapping, hf_sd: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Our full weights (vocabulary not padded) from a transformers state dict (the table's inverse)."""
    spec = FAMILIES[family]
    sd = {(k[len(spec.prefix):] if k.startswith(spec.prefix) else k): v.float() for k, v in hf_sd.items()}
    sd = {k: v for k, v in sd.items() if not re.match(spec.skip, k)}
    out: dict[str, torch.Tensor] = {}
    for rule in _rules(spec, m):
        if rule.ours_has(m):
            out.update(zip(rule.ours, rule.transform.from_hf(_take(sd, rule.theirs, where), len(rule.ours), m)))
    head = sd.pop(spec.head, None)
    if m["tie_embeddings"]:
        if head is not None and not torch.equal(head, out["embed_tokens.weight"]):
            raise CheckpointError(f"{where}: config.json says tie_word_embeddings but the head weight differs "
                                  f"from the input embedding")
    else:
        if head is None:
            raise CheckpointError(f"{where}: the untied head weight is missing (tie_word_embeddings=false)")
        out["lm_head.weight"] = head
    # rotary tables stored as buffers by some versions: recomputed from rope_theta, so not weights
    leftover = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError(f"{where}: weights not understood by the {family} mapping: {leftover[:8]}; the "
                              f"checkpoint has parts this architecture does not")
    return out


def import_hf(folder, make_vocab_size_divisible_by: int = 64) -> tuple[dict, int, dict[str, torch.Tensor], dict]:
    """A local transformers folder -> (ModelConfig fields, padded vocabulary at TP=1, full weights padded
    to it with zero rows, the HF config). Training at TP=t pads further (fit_vocab_rows, exact)."""
    from ..training.export import fit_vocab_rows

    folder = Path(folder)
    cfg = read_hf_config(folder)
    where = str(folder)
    family = _family(cfg, where)
    m = model_config_from_hf(cfg, where)
    m["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    weights = weights_from_hf(family, m, load_weight_folder(folder), where)
    V = m["vocab_size"]
    if weights["embed_tokens.weight"].shape[0] != V:
        raise CheckpointError(f"{where}: the embedding has {weights['embed_tokens.weight'].shape[0]} rows but "
                              f"config.json says vocab_size={V}")
    padded = pad_vocab_size(V, make_vocab_size_divisible_by, 1)
    return m, padded, fit_vocab_rows(weights, padded), cfg


# --------------------------------------------------------------------------------------------
# ours -> Hugging Face


def export_family(m: Mapping) -> str:
    """The transformers family that represents a ModelConfig, or CheckpointError saying why none does."""
    if m["position"] == "learned":
        if m["norm"] != "layernorm" or m["activation"] != "gelu_tanh":
            raise CheckpointError("learned positions export as GPT-2, which needs norm=layernorm and "
                                  "activation=gelu_tanh; this model cannot be represented")
        family = "gpt2"
    elif m["norm"] == "rmsnorm" and m["activation"] == "swiglu":
        family = "llama"
    elif m["norm"] == "layernorm" and m["activation"] == "gelu_tanh":
        family = "gpt_neox"
    else:
        raise CheckpointError(f"norm={m['norm']} with activation={m['activation']} has no transformers "
                              f"equivalent here (Llama: rmsnorm+swiglu; GPT-NeoX/GPT-2: layernorm+gelu_tanh)")
    if family != "llama" and (m["num_kv_heads"] or m["num_heads"]) != m["num_heads"]:
        raise CheckpointError(f"grouped-query attention (num_kv_heads={m['num_kv_heads']}) cannot be represented "
                              f"in {family}")
    return family


def hf_config_for(m: Mapping, family: str, eos_id) -> dict:
    H, nh = m["hidden_size"], m["num_heads"]
    F = ffn_hidden_size(H, m["activation"], m["ffn_hidden_size"])
    common = {"vocab_size": m["vocab_size"], "tie_word_embeddings": m["tie_embeddings"],
              "initializer_range": m["init_std"], "dtype": "float32", "bos_token_id": None, "eos_token_id": eos_id,
              "pad_token_id": None}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common, "n_embd": H,
                "n_layer": m["num_layers"], "n_head": nh, "n_inner": F, "n_positions": m["max_seq_len"],
                "activation_function": EXPORT_ACT, "layer_norm_epsilon": m["norm_eps"],
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "hidden_size": H,
                "intermediate_size": F, "num_hidden_layers": m["num_layers"], "num_attention_heads": nh,
                "num_key_value_heads": m["num_kv_heads"] or nh, "head_dim": H // nh, "hidden_act": "silu",
                "max_position_embeddings": m["max_seq_len"], "rms_norm_eps": m["norm_eps"],
                "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_base"]},
                "attention_bias": bool(m["qkv_bias"] or m["attn_out_bias"]), "mlp_bias": m["mlp_bias"],
                "attention_dropout": 0.0, "pretraining_tp": 1}
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common, "hidden_size": H,
            "intermediate_size": F, "num_hidden_layers": m["num_layers"], "num_attention_heads": nh,
            "hidden_act": EXPORT_ACT, "max_position_embeddings": m["max_seq_len"], "layer_norm_eps": m["norm_eps"],
            "use_parallel_residual": False, "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_base"], "partial_rotary_factor": 1.0},
            "attention_dropout": 0.0, "hidden_dropout": 0.0}


def weights_to_hf(family: str, m: Mapping, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict from our full weights (vocabulary rows already trimmed to vocab_size),
    through the same table as the import.

    Biases the target has and ours lacks are written as zeros (exact); an lm_head bias, which no target
    has, is refused unless it is exactly zero.
    """
    w = {k: v.float() for k, v in w.items()}
    if "lm_head.bias" in w and bool(torch.any(w["lm_head.bias"] != 0)):
        raise CheckpointError(f"the LM head has a non-zero bias, which {family} cannot represent (its head has "
                              f"no bias); this model cannot be exported without changing its outputs")

    def ours(key: str) -> torch.Tensor:
        if key not in w and key.endswith(".bias"):  # as many zeros as the layer has outputs
            return torch.zeros(w[key.removesuffix(".bias") + ".weight"].shape[0])
        return w[key]

    spec = FAMILIES[family]
    out = {spec.prefix + rule.theirs: rule.transform.to_hf([ours(k) for k in rule.ours], m)
           for rule in _rules(spec, m) if rule.theirs_has(m)}
    if not m["tie_embeddings"]:
        out[spec.head] = w["lm_head.weight"]
    return out


# --------------------------------------------------------------------------------------------
# tokenizer: what AutoTokenizer.from_pretrained needs (tokenizer.json + tokenizer_config.json +
# special_tokens_map.json), written with the ``tokenizers`` library alone


def spm_to_tokenizers(proto: bytes):
    """(a ``tokenizers.Tokenizer`` that encodes like the SentencePiece model ``proto`` (serialized ModelProto),
    its unknown piece).

    Follows the model's own normalizer spec (charsmap, extra-whitespace removal, dummy prefix, whitespace
    escaping). Built as transformers' ``SpmConverter.build_tokenizer_from_spm_proto`` does, without
    needing transformers. No whitespace pre-split is needed: SentencePiece's trainer never makes a piece
    with an inner ``▁``, so no segmentation crosses one. Control pieces (BOS/EOS) become special added tokens, so
    a literal ``</s>`` in text encodes as EOS here, where SentencePiece spells it out.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    spec, trainer = m.normalizer_spec, m.trainer_spec
    pieces = [(p.piece, p.score) for p in m.pieces]
    unigram, bpe = 1, 2  # TrainerSpec.ModelType
    normal, control, user = 1, 3, 4  # ModelProto.SentencePiece.Type
    if trainer.model_type == unigram:
        tok = Tokenizer(Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback))
    elif trainer.model_type == bpe:
        # merges ranked by the merged piece's score, as SentencePiece's BPE applies them
        score = {p.piece: (-p.score, i) for i, p in enumerate(m.pieces) if p.type == normal}
        ranked = sorted((score[t], t[:j], t[j:]) for t in score for j in range(1, len(t))
                        if t[:j] in score and t[j:] in score)
        tok = Tokenizer(BPE({p: i for i, (p, _) in enumerate(pieces)}, [(a, b) for _, a, b in ranked],
                            unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback))
    else:
        raise CheckpointError(f"the SentencePiece model type {trainer.model_type} (char/word) has no Hugging Face "
                              f"tokenizer equivalent here; only unigram and bpe tokenizers can be exported")
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == control)
                    for p in m.pieces if p.type in (control, user)])
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if trainer.byte_fallback else [])
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, trainer.unk_piece


def hf_tokenizer_files(decoder_folder, model_max_length: int) -> dict[str, bytes]:
    """The transformers tokenizer files for the tokenizer saved in a decoder folder ({} when it has none).

    A Hugging Face tokenizer travels as is (its tokenizer_config.json written if missing); a SentencePiece
    one is converted (:func:`spm_to_tokenizers`). No BOS/EOS is added on encode: training never did.
    """
    from ..data.tokenizer import HF_FILE, SPM_FILE, SentencePieceTokenizer
    from ..decode.format import load_decoder_tokenizer

    tok = load_decoder_tokenizer(decoder_folder)
    if tok is None:
        return {}
    files = dict(tok.defining_files())
    unk = None
    if isinstance(tok, SentencePieceTokenizer):
        fast, unk = spm_to_tokenizers(files.pop(SPM_FILE))
        files = {HF_FILE: fast.to_str().encode()}
    else:
        from tokenizers import Tokenizer as _Tok
        fast = _Tok.from_str(files[HF_FILE].decode())

    def name(i):
        return None if i is None else fast.id_to_token(int(i))

    special = {k: v for k, v in (("bos_token", name(tok.bos_id)), ("eos_token", name(tok.eos_id)),
                                 ("unk_token", unk)) if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
    files.setdefault("tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    files.setdefault("special_tokens_map.json", (json.dumps(special, indent=2) + "\n").encode())
    return files


def export_hf(decoder_folder, out, *, overwrite: bool = False) -> Path:
    """An AR decoder folder -> a transformers folder (config.json + model.safetensors [+ tokenizer files]),
    written to a temporary name and renamed."""
    import os
    import shutil
    import uuid

    from safetensors.torch import save_file

    from ..decode.format import load_decoder_weights, read_decoder_config
    from ..fsio import apply_umask, fsync_path, fsync_tree

    src, out = Path(decoder_folder), Path(out)
    conf = read_decoder_config(src)
    if conf["kind"] != "ar":
        raise CheckpointError(f"{src} holds a {conf['kind']!r} model; only the AR teacher ('ar') has a "
                              f"transformers equivalent")
    if conf["masked_token_ids"]:
        raise CheckpointError(f"{src} forces the logits of tokens {conf['masked_token_ids']} to -1000 (a mask "
                              f"token); transformers' causal LMs cannot represent that")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new folder or pass --overwrite")
    m = conf["model"]
    family = export_family(m)
    V = m["vocab_size"]
    weights = {k: (v[:V] if k in ("embed_tokens.weight", "lm_head.weight", "lm_head.bias") else v)
               for k, v in load_decoder_weights(src, conf).items()}
    tensors = {k: v.contiguous() for k, v in weights_to_hf(family, m, weights).items()}
    hf_cfg = hf_config_for(m, family, conf["eos_id"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in hf_tokenizer_files(src, m["max_seq_len"]).items():
            (tmp / name).write_bytes(data)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")  # last: marks it complete
        apply_umask(tmp)  # safetensors writes 0600; others may read what the umask allows
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
