"""Cache policies behind one interface (`CachePolicy`); `make_policy` builds one by name."""

from __future__ import annotations

from ..errors import KVShrinkError, check_cr
from .base import CachePolicy
from .budget import BudgetPolicy
from .dms import DMSPolicy
from .h2o import H2OPolicy
from .quest import QuestPolicy
from .tova import TOVAPolicy
from .window import WindowPolicy

BUDGETED = {"tova": TOVAPolicy, "h2o": H2OPolicy, "window": WindowPolicy, "quest": QuestPolicy}  # need --cr
POLICY_NAMES = ("none", "dms", "dms-immediate", *BUDGETED)


def make_policy(name: str, *, dms_window: int | None = None, dms_sinks: int = 0, cr: float | None = None) -> CachePolicy:
    """Build a policy by name. dms_window: the DMS model's window (or the --window override); dms_sinks:
    its never-evicted first tokens."""
    check_cr(cr)
    if name == "none":
        return CachePolicy()
    if name in ("dms", "dms-immediate"):
        if dms_window is None:
            raise KVShrinkError(f"policy {name!r} needs a DMS model; retrofit one with `kvshrink retrofit MODEL --out DIR`")
        return DMSPolicy(0 if name == "dms-immediate" else dms_window, sinks=dms_sinks)
    if name in BUDGETED:
        if cr is None:
            raise KVShrinkError(f"policy {name!r} works to a token budget: give --cr (e.g. --cr 8)")
        return BUDGETED[name](cr)
    raise KVShrinkError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")


__all__ = ["BudgetPolicy", "CachePolicy", "DMSPolicy", "H2OPolicy", "TOVAPolicy", "WindowPolicy", "QuestPolicy", "make_policy", "POLICY_NAMES"]
