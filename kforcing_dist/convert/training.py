"""Offline consolidation of a training checkpoint (any TP x PP x DP, ZeRO 0-3, fp32/bf16, teacher or
student) into full weights and the decoder format: reads files only, no process group.

ZeRO-1/2/3 partitions are merged by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``
(fp32 master weights), once per TP rank; the TP shards are then concatenated with the table in
:mod:`.layout`. Without ZeRO the engine's ``mp_rank_XX_model_states.pt`` hold the weights; with
a pipeline the per-layer files do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..training import checkpoint as ckpt
from ..training.checkpoint import CheckpointError
from .layout import PIPELINE_FILE_RE, merge_tp_shards, pipeline_file, pipeline_name
from .safeload import load_torch_file

TRAIN_FORMAT = "kforcing-dist-train/1"
# the trainer's kinds: "teacher" (LMTask) and "pflm-k{k}" (DistillTask of stage k)
STUDENT_KIND_RE = re.compile(r"^pflm-k(\d+)$")


def decoder_kind(kind: str) -> str | None:
    return "ar" if kind == "teacher" else "pflm" if STUDENT_KIND_RE.match(str(kind)) else None


@dataclasses.dataclass
class TrainingCheckpoint:
    """What a checkpoint folder says about itself (metadata.json, trainer_state.json, config.yaml)."""

    path: Path
    meta: dict
    state: dict
    config: Any  # kforcing_dist.config.Config

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def layout(self) -> dict:
        return self.meta["layout"]

    @property
    def engine_dir(self) -> Path:
        return self.path / "engine"


def resolve_checkpoint_folder(path) -> Path:
    """A ``step-XXXXXXXX`` folder, or a run folder / its ``checkpoints`` (the newest complete one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder (…/checkpoints/step-XXXXXXXX) "
                              f"or a run folder")
    if (path / "metadata.json").exists() or (path / "engine").exists():
        return path
    for root in (path / "checkpoints", path):
        latest = ckpt.latest_complete(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path} holds no complete checkpoint (no step-XXXXXXXX folder with a COMPLETE "
                          f"marker); pass the checkpoint folder itself")


def read_training_checkpoint(path) -> TrainingCheckpoint:
    """Validate the folder's marker and JSON files; CheckpointError names what is wrong."""
    from ..config import ConfigError, load_config

    path = resolve_checkpoint_folder(path)
    if not ckpt.is_complete(path):
        raise CheckpointError(f"{path} has no {ckpt.MARKER} marker: the save did not finish (or the copy is "
                              f"partial); use an older complete checkpoint")
    docs = {}
    for name in ("metadata.json", "trainer_state.json"):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path} has no {name}; not a kforcing-dist training checkpoint")
        try:
            docs[name] = json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged") from None
    meta = docs["metadata.json"]
    if meta.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{path}/metadata.json has format {meta.get('format')!r}, expected {TRAIN_FORMAT!r}")
    if decoder_kind(meta.get("kind")) is None:
        raise CheckpointError(f"{path}/metadata.json has kind {meta.get('kind')!r}; expected 'teacher' or "
                              f"'pflm-k<k>' (a distillation stage)")
    lay = meta.get("layout") or {}
    if not all(isinstance(lay.get(k), int) and lay.get(k) >= 0 for k in ("tp", "pp", "dp", "zero_stage")):
        raise CheckpointError(f"{path}/metadata.json has no valid layout (tp, pp, dp, zero_stage): {lay!r}")
    if not isinstance(meta.get("padded_vocab_size"), int):
        raise CheckpointError(f"{path}/metadata.json has no padded_vocab_size")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} has no config.yaml (the resolved config of the run)")
    try:
        cfg, _ = load_config(path / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{path}/config.yaml is not a valid config for this version: {e}") from None
    if dataclasses.asdict(cfg.model) != meta.get("model"):
        raise CheckpointError(f"{path}: config.yaml and metadata.json describe different models; the folder "
                              f"mixes files of different runs")
    if not (path / "engine").is_dir():
        raise CheckpointError(f"{path} has no engine/ folder (the DeepSpeed state); the checkpoint is incomplete")
    return TrainingCheckpoint(path, meta, docs["trainer_state.json"], cfg)


def _tensors_only(sd: dict, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} does not hold a state dict")
    # megatron's layers add ``_extra_state`` entries (None) to their state dicts: not weights
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"missing shard {path.name} in {path.parent}: the checkpoint is incomplete "
                              f"(a failed save or a partial copy); copy it again or use another checkpoint")
    return path


def _zero_rank_weights(engine_dir: Path, tp_rank: int, dp: int, zero: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation of the ZeRO partitions of one TP rank (fp32 master weights)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = f"mp_rank_{tp_rank:02d}"
    ours = sorted(p for p in engine_dir.iterdir() if re.search(rf"(^|_){tag}_", p.name))
    prefix = "bf16_" if any(p.name.startswith("bf16_") for p in ours) else ""
    want = [f"{prefix}zero_pp_rank_{d}_{tag}_optim_states.pt" for d in range(dp)]
    want += ([f"zero_pp_rank_{d}_{tag}_model_states.pt" for d in range(dp)] if zero == 3
             else [f"{tag}_model_states.pt"])
    for name in want:
        _require(engine_dir / name)
        # the restricted unpickler vets every file before DeepSpeed's loader (which unpickles freely) reads it
        load_torch_file(engine_dir / name, deepspeed_objects=True, mmap=True)
    # DeepSpeed's reader globs one folder, so give it only this TP rank's files
    with tempfile.TemporaryDirectory(prefix="kfd-zero-") as tmp:
        view = Path(tmp) / "engine"
        view.mkdir()
        for name in want:
            os.symlink((engine_dir / name).resolve(), view / name)
        try:
            # DeepSpeed prints its progress on stdout: keep stdout for the command's own result
            with contextlib.redirect_stdout(sys.stderr):
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="engine")
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"DeepSpeed could not consolidate the ZeRO-{zero} files of TP rank {tp_rank} "
                                  f"in {engine_dir} ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    return {k: v.detach().float().clone() for k, v in sd.items()}


def consolidate_weights(ck: TrainingCheckpoint) -> dict[str, torch.Tensor]:
    """Full (TP=1) float32 weights of a training checkpoint, keyed like the plain model."""
    lay, eng = ck.layout, ck.engine_dir
    tp, pp, dp, zero = lay["tp"], lay["pp"], lay["dp"], lay["zero_stage"]
    shards = []
    if pp > 1:
        L = ck.config.model.num_layers
        files = {m.groups(): p for p in eng.iterdir() if (m := PIPELINE_FILE_RE.match(p.name))}
        if not files:
            raise CheckpointError(f"{eng} holds no pipeline layer files (layer_XX-model_YY-model_states.pt) "
                                  f"although metadata.json says pp={pp}")
        for r in range(tp):
            sd = {}
            for index in range(L + 2):
                f = _require(eng / pipeline_file(index, r))
                for key, t in _tensors_only(load_torch_file(f), str(f)).items():
                    sd[pipeline_name(index, key, L)] = t.float()
            shards.append(sd)
        extra = sorted(int(i) for i, _ in files if int(i) > L + 1)
        if extra:
            raise CheckpointError(f"{eng} has pipeline layer files up to index {extra[-1]} but the model has "
                                  f"{L} layers (indices 0..{L + 1}); the files do not belong to this metadata")
    elif zero == 0:
        for r in range(tp):
            f = _require(eng / f"mp_rank_{r:02d}_model_states.pt")
            state = load_torch_file(f)
            shards.append({k: v.float() for k, v in _tensors_only(state.get("module"), str(f)).items()})
    else:
        shards = [_zero_rank_weights(eng, r, dp, zero) for r in range(tp)]
    # DeepSpeed numbers its mp_rank_XX files over the model-parallel ranks: tp x pp of them with a
    # pipeline (its grid's slice rank), tp without; layer files carry the TP rank alone
    mp_ranks = {int(m.group(1)) for p in eng.iterdir()
                if (m := re.match(r"(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_", p.name))}
    layer_ranks = {int(m.group(1)) for p in eng.iterdir() if (m := re.match(r"layer_\d+-model_(\d+)-", p.name))}
    extra_ranks = sorted((mp_ranks - set(range(tp * pp))) | (layer_ranks - set(range(tp))))
    if extra_ranks:
        raise CheckpointError(f"{eng} holds files of model-parallel ranks {extra_ranks} but metadata.json says "
                              f"tp={tp}, pp={pp}; the folder mixes runs")
    return merge_tp_shards(shards, str(eng))


def decoder_fields(ck: TrainingCheckpoint) -> dict:
    """The save_decoder keyword arguments a checkpoint implies (everything but the weights)."""
    meta, cfg = ck.meta, ck.config
    kind = decoder_kind(ck.kind)
    out = {"kind": kind, "model_config": dataclasses.asdict(cfg.model),
           "padded_vocab_size": meta["padded_vocab_size"], "cdf_order": meta.get("cdf_order", "vocab"),
           "masked_token_ids": list(meta.get("masked_token_ids", []))}
    if kind == "pflm":
        if not isinstance(meta.get("k"), int):
            raise CheckpointError(f"{ck.path}/metadata.json of a student has no k (the stage's slots per window)")
        out.update(max_k=meta["k"], noise=checkpoint_noise(ck),
                   tau_range=(cfg.distill.tau_min, cfg.distill.tau_max),
                   teacher_min_p=cfg.distill.teacher_min_p)
    return out


def checkpoint_noise(ck: TrainingCheckpoint) -> dict:
    """A student checkpoint's noise-feature convention ({"features", "max_freq"}): metadata.json's
    ``noise``, else (checkpoints written before it was recorded) its config's distill section."""
    from ..nn.noise import noise_section

    recorded = ck.meta.get("noise")
    d = ck.config.distill
    features, max_freq = (recorded["features"], recorded["max_freq"]) if isinstance(recorded, dict) \
        else (d.noise_features, d.noise_max_freq)
    try:
        return noise_section(features, max_freq)
    except ValueError as e:
        raise CheckpointError(f"{ck.path}/metadata.json: invalid noise section {recorded!r} ({e})") from None


def load_checkpoint_tokenizer(ck: TrainingCheckpoint):
    """The tokenizer saved inside the checkpoint (the same sub-folder as a decoder folder's), or None."""
    from ..decode.errors import DecodeError
    from ..decode.format import load_decoder_tokenizer

    try:
        return load_decoder_tokenizer(ck.path)
    except DecodeError as e:
        raise CheckpointError(str(e)) from None


def consolidate(path, out, *, dtype: Optional[str] = "float32", overwrite: bool = False) -> Path:
    """Training checkpoint folder ``path`` -> decoder folder ``out`` (atomic)."""
    from ..decode.errors import DecodeError
    from ..decode.format import check_weight_shapes, save_decoder, validate_decoder_config

    ck = read_training_checkpoint(path)
    fields = decoder_fields(ck)
    weights = consolidate_weights(ck)
    try:
        probe = validate_decoder_config({"format": "kforcing-dist-decoder/1", "max_k": fields.get("max_k"),
                                         "noise": fields.get("noise"), "model": fields["model_config"],
                                         "kind": fields["kind"], "padded_vocab_size": fields["padded_vocab_size"]})
        check_weight_shapes(probe, {k: tuple(v.shape) for k, v in weights.items()}, str(ck.engine_dir))
    except DecodeError as e:
        raise CheckpointError(f"{ck.path}: the weights do not match the checkpoint's own metadata ({e})") from None
    tokenizer = load_checkpoint_tokenizer(ck)
    source = {"checkpoint": str(ck.path), "step": ck.state.get("step"), "converted_by": "convert consolidate",
              "layout": ck.layout}
    return save_decoder(out, state_dict=weights, tokenizer=tokenizer, source=source, dtype=dtype,
                        overwrite=overwrite, **fields)
