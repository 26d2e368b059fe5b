"""Parameter names in the pipeline layer files: shared by the pipeline-parallel model (which
writes them) and the checkpoint converter (which reads them).

Layer 0 holds the embedding stage (``embed_tokens.*``, ``embed_positions.*``, ``noise_encoder.*``),
layers 1..L hold block i-1 without its ``layers.{i-1}.`` prefix, layer L+1 holds ``final_norm.*``
and ``lm_head.*``.
"""

from __future__ import annotations


def plain_param_name(layer_index: int, key: str, num_layers: int) -> str:
    """The plain model's name of ``key`` stored in pipeline layer ``layer_index`` (ValueError
    for an index outside 0..num_layers+1)."""
    if layer_index == 0 or layer_index == num_layers + 1:
        return key
    if 1 <= layer_index <= num_layers:
        return f"layers.{layer_index - 1}.{key}"
    raise ValueError(f"pipeline layer index {layer_index} is outside 0..{num_layers + 1} for a "
                     f"{num_layers}-layer model")
