"""The engine-free decoder: load an exported AR or PFLM checkpoint and generate, with torch alone.

Needs only torch + safetensors (and the tokenizer libraries for text): never imports megatron,
deepspeed, ``kforcing_dist.model`` or ``kforcing_dist.distill`` (the maths it shares with
training lives in ``kforcing_dist.nn``). ``format`` defines the checkpoint folder, ``model`` the
plain-torch Transformer with a static KV cache, ``generate`` the batched AR / PFLM / lossless
loops, ``bench`` the speed sweep.
"""

from .errors import DecodeError
from .format import (FORMAT_VERSION, expected_weight_shapes, load_decoder_tokenizer,
                     load_decoder_weights, read_decoder_config, save_decoder,
                     validate_decoder_config)
from .generate import (Decoder, GenerationResult, TauRangeWarning, decode_kwargs, generate, generate_lossless,
                       generate_text, load_decoder, noise_table, tau_range_message)
from ..nn.sizes import MASKED_LOGIT_VALUE, PADDED_LOGIT_VALUE
from .model import DecoderLM, KVCache

__all__ = [
    "FORMAT_VERSION", "MASKED_LOGIT_VALUE", "PADDED_LOGIT_VALUE", "DecodeError", "Decoder",
    "DecoderLM", "GenerationResult", "KVCache", "TauRangeWarning", "decode_kwargs", "expected_weight_shapes",
    "generate", "generate_lossless", "generate_text", "load_decoder", "load_decoder_tokenizer",
    "load_decoder_weights", "noise_table", "read_decoder_config", "save_decoder", "tau_range_message",
    "validate_decoder_config",
]
