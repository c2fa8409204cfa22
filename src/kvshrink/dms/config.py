"""DMS settings, stored in the HF model config so that a saved model reloads with DMS attached.

Field names on the HF config are those of the authors' release (NVIDIA Model-Optimizer
`experimental/dms/models/qwen3/configuration_qwen3_dms.py`), so its checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import KVShrinkError, check_cr, check_sinks, check_window

# our field -> the release's config attribute
_HF_FIELDS = {
    "window": "dms_window_size",
    "alpha_scale": "dms_alpha_scale",
    "alpha_offset": "dms_initial_alpha_offset",
    "tau": "dms_tau",
    "alpha_per": "dms_alpha_per",
    "target_cr": "dms_cr",
    "disable_eviction": "dms_disable_eviction",
    "forced_keep_every": "dms_forced_keep_every",
    "sinks": "dms_sink_tokens",  # kvshrink's addition; absent (release checkpoints) = 0, the paper's rule
}
# fields that a retrofit flag sets (--window, --target-cr, --sinks), and their checks
_CHECKS = {"window": check_window, "target_cr": check_cr, "sinks": check_sinks}


@dataclass
class DMSConfig:
    """How a model predicts and applies evictions.

    window: a token flagged "evict" stays visible while (query pos - its pos) <= window (delayed eviction).
    decision: "neuron" borrows the last channel of the first query head of each KV group (the paper);
        "adapter" adds a zero-initialised RMSNorm + Linear(hidden -> n_kv_heads) on the residual (the release).
    alpha_scale, alpha_offset: logit = scale * raw - offset, so at init P(evict) = sigmoid(-5) ~ 0.7%.
    tau: Gumbel-sigmoid temperature during training.
    alpha_per: "head" (one decision per KV head) or "layer" (KV head 0 decides for the layer).
    target_cr: the compression ratio the model was trained for (informational; `policies.for_model` checks cr against it).
    sinks: the first `sinks` tokens of a sequence are never evicted, whatever their flags (StreamingLLM's
        attention sinks). 0 is the paper. Measured on `tiny-dms4`: with its first token evicted in 8% of the
        (layer, head) pairs, keeping 4 sinks at inference lifted `arith` from 37.5% to 67.5% at the same CR.
    forced_keep_every: mechanics/benchmarks only: ignore the predictor and keep exactly one token in k
        (per KV head, staggered), evicting the rest.
    """

    window: int = 256
    decision: str = "neuron"
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    tau: float = 0.1
    alpha_per: str = "head"
    target_cr: float | None = None
    disable_eviction: bool = False
    forced_keep_every: int | None = None
    sinks: int = 0

    def __post_init__(self):
        for ours, check in _CHECKS.items():
            check(getattr(self, ours), "--" + ours.replace("_", "-"))
        if self.decision not in ("neuron", "adapter"):
            raise KVShrinkError(f"DMS decision must be 'neuron' or 'adapter' (got {self.decision!r})")
        if self.alpha_per not in ("head", "layer"):
            raise KVShrinkError(f"dms_alpha_per must be 'head' or 'layer' (got {self.alpha_per!r})")
        if self.forced_keep_every is not None and self.forced_keep_every < 1:
            raise KVShrinkError(f"forced_keep_every must be >= 1 (got {self.forced_keep_every})")

    def to_hf(self, config) -> None:
        """Write the settings onto an HF config (release field names)."""
        for ours, theirs in _HF_FIELDS.items():
            setattr(config, theirs, getattr(self, ours))
        config.dms_separate_alpha = self.decision == "adapter"

    @classmethod
    def from_hf(cls, config) -> "DMSConfig | None":
        """Read DMS settings from an HF config; None when the model has no DMS. A bad value is named by its
        config field: no flag set it here."""
        if getattr(config, "dms_window_size", None) is None:
            return None
        values = {ours: getattr(config, theirs) for ours, theirs in _HF_FIELDS.items() if hasattr(config, theirs)}
        for ours, check in _CHECKS.items():
            check(values.get(ours), _HF_FIELDS[ours])
        values["decision"] = "adapter" if getattr(config, "dms_separate_alpha", False) else "neuron"
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)
