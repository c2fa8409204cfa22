"""Hyper-scaling: spend saved KV memory on longer chains (L) or more samples (W, majority vote)."""

from .voting import majority_vote

__all__ = ["majority_vote"]
