"""Cache policies behind one interface (`CachePolicy`); `for_model` is the one door from a name to a policy."""

from __future__ import annotations

import warnings

from ..dms.config import DMSConfig
from ..errors import KVShrinkError, check_cr, check_sinks, check_window
from .base import CachePolicy, dms_model_needed
from .budget import BudgetPolicy
from .dms import DMSPolicy
from .h2o import H2OPolicy
from .quest import QuestPolicy
from .tova import TOVAPolicy
from .window import WindowPolicy

BUDGETED = {"tova": TOVAPolicy, "h2o": H2OPolicy, "window": WindowPolicy, "quest": QuestPolicy}  # need cr
DMS_NAMES = ("dms", "dms-immediate")
POLICY_NAMES = ("none", *DMS_NAMES, *BUDGETED)


def check_name(name: str) -> None:
    """A policy name this package knows (the CLI asks before it loads a model)."""
    if name not in POLICY_NAMES:
        raise KVShrinkError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")


def model_dms(model) -> DMSConfig | None:
    """The DMS settings the model's attention modules carry (None: no DMS). Read from the modules, not through
    `attach`, which imports this package."""
    return next((m.dms for m in model.modules() if isinstance(getattr(m, "dms", None), DMSConfig)), None)


def for_model(model, name: str | CachePolicy | None = None, *, cr: float | None = None, window: int | None = None,
              sinks: int | None = None) -> CachePolicy:
    """The policy `name` for `model` (a `CachePolicy` comes back as is). None: 'dms' on a DMS model, else
    'none'. DMS's CR is trained, so a disagreeing cr is refused; window and sinks are DMS settings, which
    override the trained ones with a warning; the budget policies need cr."""
    if isinstance(name, CachePolicy):
        return name
    check_cr(cr)
    check_window(window)
    check_sinks(sinks)
    cfg = model_dms(model)
    name = name or ("dms" if cfg is not None else "none")
    check_name(name)
    if name == "none" and cr is not None and cr > 1:
        raise KVShrinkError(f"cr={cr:g} needs a policy that compresses ('tova', 'h2o', 'window' or 'quest') or a DMS model")
    for value, param in ((window, "window"), (sinks, "sinks")):
        if value is not None and name not in DMS_NAMES:
            raise KVShrinkError(f"{param} is a DMS setting; policy {name!r} has none (drop {param})")
    if name == "none":
        return CachePolicy()
    if name in BUDGETED:
        return BUDGETED[name](cr)
    if cfg is None:
        raise dms_model_needed(name)
    if cr is not None and cfg.target_cr is not None and abs(cr - cfg.target_cr) > 1e-9:
        raise KVShrinkError(f"this DMS model was trained for CR {cfg.target_cr:g}; drop cr or pass cr={cfg.target_cr:g}")
    for value, param, trained in ((window, "window", cfg.window), (sinks, "sinks", cfg.sinks)):
        if value is not None and value != trained:
            warnings.warn(f"{param}={value} overrides the trained DMS {param} {trained}", stacklevel=2)
    return DMSPolicy(0 if name == "dms-immediate" else (cfg.window if window is None else window),
                     sinks=cfg.sinks if sinks is None else sinks, target_cr=cfg.target_cr)


__all__ = ["BUDGETED", "BudgetPolicy", "CachePolicy", "DMSPolicy", "H2OPolicy", "TOVAPolicy", "WindowPolicy", "QuestPolicy", "check_name",
           "for_model", "model_dms", "POLICY_NAMES"]
