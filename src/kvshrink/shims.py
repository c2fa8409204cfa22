"""Differences between the transformers versions kvshrink supports (>= 5.4, < 6), in one place."""

from __future__ import annotations

import transformers
from packaging.version import Version

# transformers 5.24 renamed the model's cache argument `past_key_values` to `cache` (the old name warns)
_CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cache_arg(cache) -> dict:
    """`model(..., **cache_arg(cache))`: the cache under the name this transformers version expects."""
    return {_CACHE_ARG: cache}
