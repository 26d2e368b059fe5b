"""Checkpoint conversion: consolidate and reshard training checkpoints, import Hugging Face and the
paper's released checkpoints, export the AR teacher to Hugging Face.

Every converter ends in the decoder format (:mod:`kforcing_dist.decode.format`): full (TP=1)
weights keyed like ``TransformerLM.named_parameters()`` plus a config listing every architecture
field. One weight-name mapping table per foreign format lives in its own module (``hf``,
``released``); the tensor-parallel / pipeline file layout of our own checkpoints in ``layout``.
Problems are raised as :class:`~kforcing_dist.training.checkpoint.CheckpointError` naming what is
wrong and the fix.
"""
