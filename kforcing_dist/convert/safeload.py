"""Read weight files without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True).

DeepSpeed's optimizer files hold a few small DeepSpeed objects (the loss scaler, the ZeRO stage
enum, bf16 fragment addresses); exactly those classes are allow-listed, nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..training.checkpoint import CheckpointError


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_torch_file(path, *, deepspeed_objects: bool = False, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU; CheckpointError naming the file when the
    restricted unpickler refuses it (the file holds objects other than tensors and containers)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (a missing shard?); copy the complete checkpoint")
    try:
        if deepspeed_objects:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as e:
        text = str(e)
        first = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                     text.splitlines()[0] if text else type(e).__name__)
        if "weights only" in text.lower() or "weights_only" in text.lower() or "GLOBAL" in text:
            raise CheckpointError(
                f"{path} holds objects other than tensors ({first[:200]}); it is refused because loading "
                f"it would run arbitrary code. Re-save only its state dict (torch.save(model.state_dict())) "
                f"or convert it to safetensors where you trust it") from None
        raise CheckpointError(f"{path} cannot be read by torch.load ({type(e).__name__}: {first[:200]}); "
                              f"the file is truncated or corrupt: copy it again") from None


def load_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                              f"truncated or corrupt: copy it again") from None


def load_weight_folder(folder) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face style folder: model.safetensors, model.safetensors.index.json
    (sharded), pytorch_model.bin or pytorch_model.bin.index.json, in that order of preference."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the folder holding config.json and the weights")
    for index_name, loader in (("model.safetensors.index.json", load_safetensors),
                               ("pytorch_model.bin.index.json", load_torch_file)):
        index = folder / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid weight index ({e}); copy it again") from None
            out: dict[str, torch.Tensor] = {}
            for name in files:
                part = loader(folder / name)
                if not isinstance(part, dict):
                    raise CheckpointError(f"{folder / name} does not hold a state dict")
                out.update(part)
            return out
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        sd = load_torch_file(folder / "pytorch_model.bin")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{folder / 'pytorch_model.bin'} is not a flat state dict of tensors")
        return sd
    raise CheckpointError(f"{folder} holds no model.safetensors or pytorch_model.bin (nor a sharded index); "
                          f"pass a folder saved with save_pretrained")
