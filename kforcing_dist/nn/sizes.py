"""Model-size arithmetic and vocabulary-padding values shared by the model, the decoder and the
job planner (no torch import, so that ``kforcing-dist plan`` sizes a job without torch or
megatron-core).
"""

from __future__ import annotations

# Value given to the logits of padded vocabulary entries. Large enough that they never win and
# get exactly zero probability in float32 softmax, yet finite and far from the float32 limits so
# that temperature scaling, differences of log-probs (KL) or fp16/bf16 casts stay finite.
PADDED_LOGIT_VALUE = -1.0e4
# The released checkpoints set their mask token's logit to this before softmax/argmax; every
# model carrying ``masked_token_ids`` (training and decoder) does the same.
MASKED_LOGIT_VALUE = -1000.0


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tp``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if divisible_by <= 0 or tp <= 0:
        raise ValueError(f"make_vocab_size_divisible_by ({divisible_by}) and tp ({tp}) "
                         f"must be positive")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def ffn_hidden_size(hidden_size: int, activation: str, ffn_hidden_size: int = 0) -> int:
    """The MLP width: ``ffn_hidden_size``, or 4H (gelu_tanh) / 8H/3 rounded up to 64 (swiglu)."""
    if ffn_hidden_size:
        return int(ffn_hidden_size)
    if activation == "swiglu":
        return -(-8 * hidden_size // (3 * 64)) * 64
    return 4 * hidden_size
