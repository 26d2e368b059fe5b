"""Plain-torch building blocks shared by the tensor-parallel model and the engine-free decoder.

Nothing here imports megatron-core, DeepSpeed or another kforcing_dist package, so
``kforcing_dist.model`` (training) and ``kforcing_dist.decode`` (inference) run one definition
of the maths: ``norm`` (LayerNorm/RMSNorm), ``rotary`` (rotary positions), ``noise`` (the noise
encoder), ``window`` (the staircase window layout), ``rows`` (row selection: a slice or a
per-sequence index), ``inverse_cdf`` (G(x, u)), ``sizes`` (MLP width, vocabulary padding and the
logit values of padded/masked entries; no torch import) and ``names`` (pipeline layer <-> plain
parameter names). This file imports nothing, so
``kforcing_dist.nn.sizes`` stays torch-free for ``kforcing-dist plan``.
"""
