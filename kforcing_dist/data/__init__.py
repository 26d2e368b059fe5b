"""The data pipeline: corpus, document sources, tokenizers, token shards and the training sampler.

Only the light names are imported here so that ``import kforcing_dist.data`` stays cheap (it is
imported by spawned worker processes); import the submodules for the rest.
"""

from .errors import DataError

__all__ = ["DataError"]
