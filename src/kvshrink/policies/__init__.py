"""Cache policies behind one interface (`CachePolicy`); `make_policy` builds one by name."""

from __future__ import annotations

from ..errors import KVShrinkError
from .base import CachePolicy
from .dms import DMSPolicy

POLICY_NAMES = ("none", "dms")


def make_policy(name: str, *, dms_window: int | None = None, cr: float | None = None) -> CachePolicy:
    """Build a policy by name. dms_window: the DMS model's window (or the --window override)."""
    if cr is not None and cr < 1:
        raise KVShrinkError(f"--cr must be >= 1 (got {cr}); 1 means no compression")
    if name == "none":
        return CachePolicy()
    if name == "dms":
        if dms_window is None:
            raise KVShrinkError("policy 'dms' needs a DMS model; retrofit one with `kvshrink retrofit MODEL --out DIR`")
        return DMSPolicy(dms_window)
    raise KVShrinkError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")


__all__ = ["CachePolicy", "DMSPolicy", "make_policy", "POLICY_NAMES"]
