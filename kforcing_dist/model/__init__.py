"""The causal Transformer LM (megatron-core TP layers), its loss and full-state helpers."""

from ..megatron_compat import allow_import_without_triton

allow_import_without_triton()  # before the first megatron import (below): 0.19 imports Triton

from .loss import lm_loss, vocab_parallel_cross_entropy  # noqa: E402
from .state import (count_parameters, full_grad_dict, full_state_dict, gather_tp_tensor,  # noqa: E402
                    load_full_state_dict)
from .transformer import TransformerLM, validate_model_config  # noqa: E402

__all__ = [
    "TransformerLM", "count_parameters", "full_grad_dict", "full_state_dict", "gather_tp_tensor",
    "lm_loss", "load_full_state_dict", "validate_model_config", "vocab_parallel_cross_entropy",
]
