"""K-Forcing distillation: inverse-CDF targets, noise features, window layout, self-forcing, losses.

``noise`` and ``inverse_cdf`` are plain torch (the engine-free decoder imports them); the
modules that touch tensor-parallel models import megatron-core themselves.
"""
