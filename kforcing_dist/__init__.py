"""kforcing-dist: distil an autoregressive LM into a K-Forcing push-forward model, at cluster scale."""

__version__ = "0.1.0"
