"""The decoder checkpoint format: one folder that the engine-free decoder loads with torch alone.

Layout of a decoder folder::

    model.safetensors   full (un-sharded) weights, keys = TransformerLM.named_parameters() names,
                        plus noise_encoder.* (NoiseEncoder) for a PFLM
    config.json         {"format": "kforcing-dist-decoder/1", "kind": "ar" | "pflm", "model": {...},
                         "padded_vocab_size", "max_k", "noise": {"features", "max_freq"},
                         "cdf_order", "eos_id", "masked_token_ids", "dtype", "source",
                         "weights_bytes", "tau_range", "teacher_min_p"}
                        (noise: a pflm's noise-feature convention, see nn.noise; a folder
                        without "features" was written before it existed and reads as rising)
                        tau_range: [min, max], the temperatures a PFLM was trained on (optional:
                        null for an AR model and in folders written before it existed)
                        teacher_min_p: the min-p truncation of the teacher a PFLM was
                        distilled against (0: the exact teacher; null for an AR model; a
                        folder written before it existed reads as 0)
    tokenizer/          optional, the Tokenizer.save layout (read back with load_tokenizer)

:func:`save_decoder` validates everything, writes into a hidden temporary folder and renames it
into place, so a crash never leaves a folder that loads. Weights are read with
``safetensors.torch.load_file`` only (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..config.schema import MODEL_CHOICE_FIELDS, ModelConfig, field_choices
from ..nn.noise import DEFAULT_NOISE_MAX_FREQ, LEGACY_NOISE_FEATURES, NOISE_FEATURES, noise_section
from ..fsio import apply_umask, fsync_path, fsync_tree
from ..nn.sizes import ffn_hidden_size
from .errors import DecodeError

FORMAT_VERSION = "kforcing-dist-decoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
KINDS = ("ar", "pflm")
CDF_ORDERS = ("vocab", "sorted")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


# --------------------------------------------------------------------------------------------
# Config validation


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def resolve_ffn_hidden_size(model: Mapping[str, Any]) -> int:
    """The MLP width of a config.json model section (the rule in :mod:`kforcing_dist.nn.sizes`,
    shared with the training model and ``plan``; that module imports neither torch nor megatron)."""
    return ffn_hidden_size(int(model["hidden_size"]), model["activation"], int(model["ffn_hidden_size"]))


def _check_model_section(model: Any, where: str) -> dict:
    if isinstance(model, ModelConfig):
        model = dataclasses.asdict(model)
    if not isinstance(model, Mapping):
        raise DecodeError(f"{where}: 'model' must be a mapping of ModelConfig fields, "
                          f"got {type(model).__name__}")
    unknown = sorted(set(model) - set(MODEL_FIELDS))
    missing = sorted(set(MODEL_FIELDS) - set(model))
    if unknown:
        raise DecodeError(f"{where}: unknown model fields {unknown}; this decoder knows "
                          f"ModelConfig fields only (a newer exporter? upgrade kforcing-dist)")
    if missing:
        raise DecodeError(f"{where}: model fields {missing} are missing; config.json must list "
                          f"every ModelConfig field (re-export with save_decoder)")
    m = dict(model)
    defaults = ModelConfig()
    for name in MODEL_FIELDS:
        want = type(getattr(defaults, name))
        value = m[name]
        ok = (_is_int(value) if want is int else
              _is_number(value) if want is float else isinstance(value, want))
        if not ok:
            raise DecodeError(f"{where}: model.{name} must be {want.__name__}, got {value!r}")
        if want is float:
            m[name] = float(value)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
        if m[name] <= 0:
            raise DecodeError(f"{where}: model.{name} must be positive, got {m[name]} "
                              f"(vocab_size comes from the tokenizer: set it before exporting)")
    H, nh, nkv = m["hidden_size"], m["num_heads"], m["num_kv_heads"] or m["num_heads"]
    if m["num_kv_heads"] < 0 or m["ffn_hidden_size"] < 0:
        raise DecodeError(f"{where}: model.num_kv_heads and model.ffn_hidden_size must be >= 0")
    if H % nh or nh % nkv:
        raise DecodeError(f"{where}: model.num_heads={nh} must divide hidden_size={H} and be a "
                          f"multiple of the key/value heads ({nkv})")
    for name in MODEL_CHOICE_FIELDS:
        allowed = field_choices(ModelConfig, name)
        if m[name] not in allowed:
            raise DecodeError(f"{where}: model.{name} must be one of {allowed}, got {m[name]!r}")
    if m["position"] == "rope" and (H // nh) % 2:
        raise DecodeError(f"{where}: rotary positions need an even head dimension, got {H // nh}")
    if m["position"] == "rope" and m["rope_base"] <= 0:
        raise DecodeError(f"{where}: model.rope_base must be positive, got {m['rope_base']}")
    if m["norm_eps"] <= 0:
        raise DecodeError(f"{where}: model.norm_eps must be positive, got {m['norm_eps']}")
    if m["tie_embeddings"] and m["lm_head_bias"]:
        raise DecodeError(f"{where}: model.lm_head_bias needs an untied head "
                          f"(model.tie_embeddings: false)")
    return m


def _check_noise_section(noise: Any, where: str) -> dict:
    """A pflm's noise section -> {"features", "max_freq"}; a folder written before ``features``
    existed reads as ``rising`` (what every model was trained with then)."""
    if not isinstance(noise, Mapping):
        raise DecodeError(f"{where}: a pflm checkpoint needs noise: {{\"features\": one of {NOISE_FEATURES}, "
                          f"\"max_freq\": float >= 1 for rising features}}, got {noise!r}")
    unknown = sorted(set(noise) - {"features", "max_freq"})
    if unknown:
        raise DecodeError(f"{where}: unknown noise fields {unknown}; the noise section holds features and "
                          f"max_freq only")
    features = noise.get("features", LEGACY_NOISE_FEATURES)
    if features not in NOISE_FEATURES:
        raise DecodeError(f"{where}: noise.features must be one of {NOISE_FEATURES} (the noise-feature "
                          f"convention the model was trained with), got {features!r}")
    max_freq = noise.get("max_freq")
    if features == "rising" and not (_is_number(max_freq) and max_freq >= 1):
        raise DecodeError(f"{where}: rising noise features need noise.max_freq >= 1 (distill.noise_max_freq of "
                          f"its training run), got {max_freq!r}")
    if features == "released" and max_freq is not None:
        raise DecodeError(f"{where}: noise.max_freq applies to rising features only; released features have "
                          f"a fixed band: set it to null, got {max_freq!r}")
    return noise_section(features, max_freq)


def _check_tau_range(tau_range: Any, where: str) -> Optional[list[float]]:
    """A PFLM's trained temperature range: None (not recorded) or [min, max], 0 < min <= max."""
    if tau_range is None:
        return None
    if not isinstance(tau_range, (list, tuple)) or len(tau_range) != 2 or not all(map(_is_number, tau_range)) \
            or not 0 < tau_range[0] <= tau_range[1] < math.inf:
        raise DecodeError(f"{where}: tau_range must be [min, max] with 0 < min <= max (distill.tau_min and "
                          f"distill.tau_max of the training run), got {tau_range!r}")
    return [float(tau_range[0]), float(tau_range[1])]


def validate_decoder_config(cfg: Any, where: str = "decoder config") -> dict:
    """Check a decoder config dict (the content of config.json) and return a normalised copy.

    Raises DecodeError naming the field and the fix. ``where`` prefixes the messages (a path).
    """
    if not isinstance(cfg, Mapping):
        raise DecodeError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    fmt = cfg.get("format")
    if fmt != FORMAT_VERSION:
        raise DecodeError(f"{where}: unknown format {fmt!r}; this decoder reads {FORMAT_VERSION!r} "
                          f"(re-export the checkpoint with save_decoder, or upgrade kforcing-dist)")
    out = dict(cfg)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise DecodeError(f"{where}: 'kind' must be one of {KINDS}, got {kind!r}")
    out["model"] = model = _check_model_section(cfg.get("model"), where)
    V = model["vocab_size"]
    pv = cfg.get("padded_vocab_size")
    if not _is_int(pv) or pv < V:
        raise DecodeError(f"{where}: padded_vocab_size must be an integer >= model.vocab_size "
                          f"({V}), got {pv!r}")
    max_k, noise = cfg.get("max_k"), cfg.get("noise")
    if kind == "pflm":
        if not _is_int(max_k) or max_k < 1:
            raise DecodeError(f"{where}: a pflm checkpoint needs max_k (the k it was trained "
                              f"with) >= 1, got {max_k!r}")
        out["noise"] = _check_noise_section(noise, where)
        if model["hidden_size"] % 2:
            raise DecodeError(f"{where}: the noise encoder needs an even hidden size, "
                              f"got {model['hidden_size']}")
        out["max_k"] = max_k
        out["tau_range"] = _check_tau_range(cfg.get("tau_range"), where)
        min_p = cfg.get("teacher_min_p")
        min_p = 0.0 if min_p is None else min_p  # not recorded: distilled before the key existed
        if not _is_number(min_p) or not 0 <= min_p < 1:
            raise DecodeError(f"{where}: teacher_min_p must be a number in [0, 1) (distill.teacher_min_p of "
                              f"the training run; 0: the exact teacher), got {min_p!r}")
        out["teacher_min_p"] = float(min_p)
    else:
        if max_k is not None or noise is not None:
            raise DecodeError(f"{where}: max_k and noise belong to pflm checkpoints; an 'ar' "
                              f"checkpoint must have them null (got max_k={max_k!r}, "
                              f"noise={noise!r})")
        for key, what in (("tau_range", "the temperatures a student was trained on"),
                          ("teacher_min_p", "the teacher truncation a student was distilled against")):
            if cfg.get(key) is not None:
                raise DecodeError(f"{where}: {key} belongs to pflm checkpoints ({what}); an 'ar' "
                                  f"checkpoint must have it null")
        out["max_k"] = out["noise"] = out["tau_range"] = out["teacher_min_p"] = None
    order = cfg.get("cdf_order", "vocab")
    if order not in CDF_ORDERS:
        raise DecodeError(f"{where}: cdf_order must be one of {CDF_ORDERS}, got {order!r}")
    out["cdf_order"] = order
    eos = cfg.get("eos_id")
    if eos is not None and (not _is_int(eos) or not 0 <= eos < V):
        raise DecodeError(f"{where}: eos_id must be null or a token id in [0, {V}), got {eos!r}")
    out["eos_id"] = eos
    masked = cfg.get("masked_token_ids", [])
    if not isinstance(masked, (list, tuple)) or \
            not all(_is_int(t) and 0 <= t < pv for t in masked):
        raise DecodeError(f"{where}: masked_token_ids must be a list of token ids in "
                          f"[0, {pv}), got {masked!r}")
    out["masked_token_ids"] = sorted(set(int(t) for t in masked))
    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise DecodeError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out["dtype"] = dtype
    source = cfg.get("source") or {}
    if not isinstance(source, Mapping):
        raise DecodeError(f"{where}: source must be an object (free-form provenance), "
                          f"got {type(source).__name__}")
    out["source"] = dict(source)
    wb = cfg.get("weights_bytes")
    if wb is not None and (not _is_int(wb) or wb <= 0):
        raise DecodeError(f"{where}: weights_bytes must be a positive integer, got {wb!r}")
    return out


def expected_weight_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight key of a (validated) decoder config and its full shape.

    The keys are TransformerLM's ``named_parameters()`` names at TP=1 (and NoiseEncoder's under
    ``noise_encoder.`` for a PFLM); :class:`DecoderLM` names its parameters the same way.
    """
    m = cfg["model"]
    H, L, nh = m["hidden_size"], m["num_layers"], m["num_heads"]
    nkv = m["num_kv_heads"] or nh
    hd = H // nh
    F = resolve_ffn_hidden_size(m)
    Vp = cfg["padded_vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (Vp, H)}
    if m["position"] == "learned":
        shapes["embed_positions.weight"] = (m["max_seq_len"], H)

    def norm(prefix: str) -> None:
        shapes[f"{prefix}.weight"] = (H,)
        if m["norm"] == "layernorm" and m["norm_bias"]:
            shapes[f"{prefix}.bias"] = (H,)

    def linear(prefix: str, out_f: int, in_f: int, bias: bool) -> None:
        shapes[f"{prefix}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{prefix}.bias"] = (out_f,)

    for i in range(L):
        p = f"layers.{i}"
        norm(f"{p}.input_norm")
        linear(f"{p}.attention.q_proj", nh * hd, H, m["qkv_bias"])
        linear(f"{p}.attention.k_proj", nkv * hd, H, m["qkv_bias"])
        linear(f"{p}.attention.v_proj", nkv * hd, H, m["qkv_bias"])
        linear(f"{p}.attention.out_proj", H, nh * hd, m["attn_out_bias"])
        norm(f"{p}.mlp_norm")
        if m["activation"] == "swiglu":
            linear(f"{p}.mlp.gate_proj", F, H, m["mlp_bias"])
            linear(f"{p}.mlp.up_proj", F, H, m["mlp_bias"])
            linear(f"{p}.mlp.down_proj", H, F, m["mlp_bias"])
        else:
            linear(f"{p}.mlp.fc1", F, H, m["mlp_bias"])
            linear(f"{p}.mlp.fc2", H, F, m["mlp_bias"])
    norm("final_norm")
    if not m["tie_embeddings"]:
        linear("lm_head", Vp, H, m["lm_head_bias"])
    if cfg["kind"] == "pflm":
        linear("noise_encoder.combined_proj", H, 2 * H, True)
        shapes["noise_encoder.norm.weight"] = (H,)
        shapes["noise_encoder.norm.bias"] = (H,)
        linear("noise_encoder.mlp.0", 4 * H, H, True)
        linear("noise_encoder.mlp.2", H, 4 * H, True)
    return shapes


def check_weight_shapes(cfg: Mapping[str, Any], shapes: Mapping[str, tuple], where: str) -> None:
    """Raise DecodeError unless ``shapes`` (key -> shape) is exactly what ``cfg`` needs."""
    want = expected_weight_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    if missing or unexpected:
        hint = ""
        if any(k.startswith("noise_encoder.") for k in unexpected) and cfg["kind"] == "ar":
            hint = " (noise_encoder.* weights belong to kind 'pflm')"
        elif any(k.startswith("noise_encoder.") for k in missing):
            hint = " (a pflm checkpoint needs the NoiseEncoder weights under noise_encoder.*)"
        raise DecodeError(f"{where}: the weights do not match the config{hint}: missing keys "
                          f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                          f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; export the "
                          f"full (TP=1) state dict of the model the config describes")
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise DecodeError(f"{where}: weight {key} has shape {tuple(shapes[key])}, the config "
                              f"needs {shape}; the config.json does not describe these weights")


# --------------------------------------------------------------------------------------------
# Save


def save_decoder(folder, *, kind: str, model_config, padded_vocab_size: int,
                 state_dict: Mapping[str, torch.Tensor], tokenizer=None, max_k: Optional[int] = None,
                 noise: Optional[Mapping[str, float]] = None, cdf_order: str = "vocab",
                 eos_id: Optional[int] = None, masked_token_ids=(), source: Optional[dict] = None,
                 dtype=None, overwrite: bool = False, tau_range=None,
                 teacher_min_p: Optional[float] = None) -> Path:
    """Write a decoder folder atomically and return its path.

    ``model_config``: a ModelConfig or a dict of its fields (missing fields take the ModelConfig
    defaults; vocab_size must be set). ``state_dict``: full (TP=1) weights keyed like
    TransformerLM.named_parameters() (+ noise_encoder.* for kind 'pflm'). ``tokenizer``: an object
    with ``.save(dir)`` (kforcing_dist.data.tokenizer.Tokenizer); its eos_id is the default
    ``eos_id``. ``noise``: {"features": "rising" | "released", "max_freq": float for rising features,
    else None} for a PFLM (default: NoiseEncoder's, rising up to 256; see nn.noise).
    ``tau_range``: (min, max) temperatures a PFLM was trained on (None: not recorded).
    ``teacher_min_p``: the teacher truncation a PFLM was distilled against (None: 0 for a PFLM).
    ``dtype``: "float32" / "bfloat16" (or the torch dtype) to store the weights in; None keeps
    the state dict's dtype. An existing ``folder`` is refused unless ``overwrite``.
    """
    folder = Path(folder)
    if isinstance(model_config, ModelConfig):
        model_config = dataclasses.asdict(model_config)
    if not isinstance(model_config, Mapping):
        raise DecodeError(f"model_config must be a ModelConfig or a dict, got "
                          f"{type(model_config).__name__}")
    unknown = sorted(set(model_config) - set(MODEL_FIELDS))
    if unknown:
        raise DecodeError(f"model_config has unknown fields {unknown}; pass ModelConfig fields only")
    model = {**dataclasses.asdict(ModelConfig()), **dict(model_config)}
    if not isinstance(state_dict, Mapping) or \
            not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise DecodeError("state_dict must map weight names to tensors (use "
                          "kforcing_dist.model.state.full_state_dict on the trained model)")
    float_dtypes = {t.dtype for t in state_dict.values()}
    if dtype is None:
        if len(float_dtypes) != 1:
            raise DecodeError(f"the state dict mixes dtypes {sorted(map(str, float_dtypes))}; "
                              f"pass dtype='float32' or 'bfloat16' to store one")
        dtype = next(iter(float_dtypes))
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise DecodeError(f"weights must be stored as float32 or bfloat16, got {dtype}; "
                              f"pass dtype='float32' or 'bfloat16'")
        dtype = names[dtype]
    if kind == "pflm" and noise is None:
        noise = noise_section("rising", DEFAULT_NOISE_MAX_FREQ)
    if eos_id is None and tokenizer is not None:
        eos_id = int(tokenizer.eos_id)
    cfg = {
        "format": FORMAT_VERSION, "kind": kind, "model": model,
        "padded_vocab_size": padded_vocab_size,
        "max_k": max_k, "noise": dict(noise) if noise is not None else None,
        "tau_range": list(tau_range) if isinstance(tau_range, tuple) else tau_range,
        "teacher_min_p": (teacher_min_p or 0.0) if kind == "pflm" else teacher_min_p,
        "cdf_order": cdf_order, "eos_id": eos_id,
        "masked_token_ids": [int(t) for t in masked_token_ids],
        "dtype": dtype, "source": dict(source or {}),
    }
    cfg = validate_decoder_config(cfg, where="save_decoder")
    check_weight_shapes(cfg, {k: tuple(v.shape) for k, v in state_dict.items()}, "save_decoder")
    if tokenizer is not None:
        if not hasattr(tokenizer, "save"):
            raise DecodeError("tokenizer must be a kforcing_dist.data.tokenizer.Tokenizer "
                              "(an object with .save(dir)), or None")
        tv = getattr(tokenizer, "vocab_size", None)
        if tv is not None and int(tv) > model["vocab_size"]:
            raise DecodeError(f"the tokenizer has {tv} ids but model.vocab_size is "
                              f"{model['vocab_size']}; export the tokenizer the model was "
                              f"trained with")
    try:
        json.dumps(cfg["source"])
    except (TypeError, ValueError) as e:
        raise DecodeError(f"source must be JSON-serialisable ({e}); pass plain strings and "
                          f"numbers") from None
    if folder.exists() and not overwrite:
        raise DecodeError(f"{folder} already exists; pass overwrite=True or choose a new folder")

    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    tensors = {k: v.detach().to(device="cpu", dtype=torch_dtype).contiguous()
               for k, v in state_dict.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_VERSION})
        cfg["weights_bytes"] = (tmp / WEIGHTS_FILE).stat().st_size
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        # config.json last: a temporary folder without it is recognisably unfinished.
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        # safetensors creates its file 0600: readable by others as the umask allows, like any
        # other output; everything on disk before the rename makes it visible
        apply_umask(tmp)
        fsync_tree(tmp)
        if folder.exists():  # overwrite: move the old one aside, then swap in the new one
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        fsync_path(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------
# Read


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise DecodeError(f"decoder folder {folder} does not exist; export one with save_decoder "
                          f"(or fix the path)")
    if not folder.is_dir():
        raise DecodeError(f"{folder} is a file; a decoder checkpoint is a folder holding "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}")


def read_decoder_config(folder) -> dict:
    """The validated config.json of a decoder folder (DecodeError when missing or invalid)."""
    folder = Path(folder)
    _check_folder(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DecodeError(f"{folder} has no {CONFIG_FILE}: not a decoder folder, or an export "
                          f"that did not finish; re-export it with save_decoder")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DecodeError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from None
    return validate_decoder_config(cfg, where=str(path))


def load_decoder_weights(folder, cfg: Optional[Mapping[str, Any]] = None) -> dict[str, torch.Tensor]:
    """The validated weights of a decoder folder as CPU tensors (keys/shapes checked against
    its config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_decoder_config(folder) if cfg is None else cfg
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise DecodeError(f"{folder} has no {WEIGHTS_FILE}; the export is incomplete: re-export "
                          f"it with save_decoder")
    size = path.stat().st_size
    want = cfg.get("weights_bytes")
    if want is not None and size != want:
        raise DecodeError(f"{path} has {size} bytes but {CONFIG_FILE} records {want}: the file is "
                          f"truncated or was replaced (an interrupted copy?); copy or re-export "
                          f"it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_weight_shapes(cfg, shapes, str(path))
        tensors = load_file(str(path), device="cpu")
    except DecodeError:
        raise
    except Exception as e:  # safetensors raises its own error type for corrupt headers/data
        raise DecodeError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); the "
                          f"file is truncated or corrupt: re-export it") from None
    return tensors


def load_decoder_tokenizer(folder):
    """The tokenizer saved with the checkpoint (kforcing_dist.data.tokenizer.Tokenizer), or None."""
    path = Path(folder) / TOKENIZER_DIR
    if not path.is_dir():
        return None
    # Imported here: the tokenizer module is light, but its libraries load on first use only.
    from ..data.errors import DataError
    from ..data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except DataError as e:
        raise DecodeError(f"the tokenizer in {path} cannot be loaded: {e}") from None
