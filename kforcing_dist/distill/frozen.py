"""How a stage holds its frozen models (the AR teacher, the previous stage's student).

Frozen models never get gradients or optimizer state. By default every data-parallel replica
holds a full (tensor-parallel) copy. A teacher too big for that can be partitioned over the
data-parallel ranks with DeepSpeed ZeRO-3 and no optimizer (``distill.partition_frozen``): its
forward gathers each layer's weights just in time and frees them again, so a rank holds
1/dp of the frozen weights at rest.

Precision (``distill.frozen_precision``): the logits the targets come from (the stage-1 inverse
CDF, the noise inversion, the self-forcing argmax) are always float32, and the inverse CDF runs
in float64 on them. Under bf16 training, ``auto`` stores the frozen body (embeddings, blocks)
in bf16 but keeps its final norm and LM head in float32 and runs them on the float32-upcast
hidden states (:class:`Float32Island`), so the logits carry no bf16 rounding of their own;
``fp32`` (the default) keeps every frozen weight and activation in float32: the targets a
float32 teacher gives, at twice the frozen weights' memory. The float32 head alone is not
enough: on a small trained teacher, 15-20% of stage-1 targets (tau 1, either CDF order) still
differ from the float32 teacher's, against 20-30% for an all-bf16 teacher, because the bf16
body's rounding moves the probabilities that every later CDF boundary sums. A pipeline-parallel
frozen model runs on its own float32 engine (``training.engine.build_frozen_pipeline_engine``)
whatever this says.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..parallel.groups import DeepSpeedMPU, ParallelGroups

FROZEN_PRECISIONS = ("auto", "fp32")


def _bf16_config(precision: str) -> dict:
    return {"enabled": precision == "bf16"}


class Float32Island(nn.Module):
    """Runs ``module`` in float32 on the float32 upcast of its input inside a model cast to bf16.

    The module (and ``weight``, the float32 head weight of a model with tied embeddings, passed
    in place of the bf16 embedding the model hands over) is held in a tuple, outside the
    registered children and parameters, so neither ``model.to(bf16)``, DeepSpeed's bf16 cast
    nor ZeRO-3 partitioning reaches it: it stays whole and float32 on every rank. It is the very
    module the float32 model runs (same code, same TP slicing of a vocab-parallel head).
    """

    def __init__(self, module: nn.Module, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self._held = (module, weight)

    @property
    def module(self) -> nn.Module:
        return self._held[0]

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        module, weight = self._held
        if weight is not None:
            kwargs["weight"] = weight
        return module(hidden.float(), *args, **kwargs)


def keep_head_in_float32(model: nn.Module, device) -> None:
    """Move ``model``'s final norm and LM head (still float32) to ``device`` and wrap each in a
    :class:`Float32Island`, so that casting the model to bf16 afterwards leaves them float32."""
    if model.final_norm.weight.dtype != torch.float32:
        raise ValueError("keep_head_in_float32 needs the model's float32 weights (call it before any cast)")
    tied = model.cfg.tie_embeddings
    head_weight = model.embed_tokens.weight.detach().to(device, torch.float32).clone() if tied else None
    for module in (model.final_norm, model.lm_head):
        module.to(device).requires_grad_(False)
    model.final_norm = Float32Island(model.final_norm)
    model.lm_head = Float32Island(model.lm_head, head_weight)


def frozen_body_precision(training_precision: str, frozen_precision: str) -> str:
    """The dtype ("fp32" / "bf16") the frozen body is stored and run in."""
    if frozen_precision not in FROZEN_PRECISIONS:
        raise ValueError(f"frozen precision must be one of {FROZEN_PRECISIONS}, got {frozen_precision!r}")
    return "fp32" if frozen_precision == "fp32" else training_precision


def freeze(model: torch.nn.Module, groups: ParallelGroups, precision: str, partition: bool,
           frozen_precision: str = "fp32") -> torch.nn.Module:
    """Move ``model`` (full float32 weights already loaded) to the device, eval mode, no grads;
    optionally partition it with ZeRO-3. ``precision``: the training precision; with
    ``frozen_precision`` it sets the frozen dtype (module docstring). Returns the module to call
    (collective under ``partition``: every data-parallel rank must run the same forward passes)."""
    body = frozen_body_precision(precision, frozen_precision)
    if body == "bf16":
        keep_head_in_float32(model, groups.device)
    dtype = torch.bfloat16 if body == "bf16" else torch.float32
    model = model.to(groups.device, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not partition:
        return model
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": _bf16_config(body),
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, mpu=DeepSpeedMPU(groups),
                                           dist_init_required=False)
    engine.eval()
    return engine.module


def export_weights(folder, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """The full weights of a decoder folder, checked like ``generate`` checks them (size recorded in
    config.json, readable safetensors, names and shapes: a DecodeError naming the fix), with the
    vocabulary rows fitted to this run's padding."""
    from ..decode.format import load_decoder_weights
    from ..training.export import fit_vocab_rows

    return fit_vocab_rows(load_decoder_weights(folder), padded_vocab_size)


def load_frozen(folder, builder, groups: ParallelGroups, cfg, layout):
    """Build a model with ``builder()``, load the full weights exported in ``folder``, freeze it.

    A pipeline model comes back as a forward-only :class:`PipelineForward` on its own
    optimizer-free engine (fp32); a plain one is held as ``distill.partition_frozen`` and
    ``distill.frozen_precision`` of the stage's config ``cfg`` say (:func:`freeze`).
    """
    from ..model.pipeline import load_plain_state_dict

    model = builder()
    weights = export_weights(folder, model.padded_vocab_size)
    load_plain_state_dict(model, weights, groups)
    return hold_frozen(model, groups, cfg, layout)


def hold_frozen(model, groups: ParallelGroups, cfg, layout):
    """Freeze a built model (weights in place) the way :func:`load_frozen` holds it: a pipeline
    model as a forward-only :class:`PipelineForward`, a plain one by :func:`freeze` with the stage
    config's ``distill.partition_frozen`` and ``distill.frozen_precision``."""
    from ..model.pipeline import PipelineForward, is_pipeline
    from ..training.engine import build_frozen_pipeline_engine, resolve_precision

    if is_pipeline(model):
        return PipelineForward(build_frozen_pipeline_engine(model, layout))
    return freeze(model, groups, resolve_precision(cfg.train.precision, groups.device, cfg.parallel.zero_stage),
                  cfg.distill.partition_frozen, cfg.distill.frozen_precision)
