"""K-Forcing distillation on tensor-parallel models: targets, self-forcing, losses, the frozen teacher.

The plain-torch pieces it shares with the decoder (noise encoder, window layout, inverse CDF)
live in :mod:`kforcing_dist.nn`.
"""
