"""DMS: learned per-head eviction with a delay window.

Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression", arXiv 2506.05345 (NeurIPS 2025).
Release: NVIDIA Model-Optimizer `experimental/dms`.

The model flags tokens (the decision at t+1 marks token t, see `kvshrink.dms.retention`); a flagged
token j stays visible to query i while i - j <= window and is then dropped, its slot reused. Prefill and
decode follow the same rule. `window=0` is the paper's immediate-eviction ablation. The first `sinks`
tokens are never flagged (kvshrink's option, 0 = the paper; see `DMSConfig.sinks`): the cache clears their flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_prefill_chunk, check_sinks, check_window
from .base import EVICTION_CHUNK, CachePolicy


@dataclass
class DMSPolicy(CachePolicy):
    window: int
    sinks: int = 0
    #: DMS's output does not depend on how the prompt is chunked (`hidden` masks tokens that expire inside
    #: a chunk); only transient memory does. The default reads prompts in the budget policies' chunks, so
    #: expired tokens leave as they are read and peak memory compares on the same terms; a server reads
    #: longer chunks for speed and holds at most one chunk more.
    prefill_chunk: int = EVICTION_CHUNK
    #: the CR the model was trained for (None: not recorded); DMS's own, not a budget it enforces
    target_cr: float | None = None
    name = "dms"
    needs_dms = True
    frees_memory = True

    @property
    def expected_cr(self) -> float | None:
        return self.target_cr

    def __post_init__(self):
        check_window(self.window)
        check_sinks(self.sinks)
        check_prefill_chunk(self.prefill_chunk)

    def expired(self, layer, first_query_pos: int) -> torch.Tensor:
        # free slots may match too (stale flags): freeing them again is harmless and saves an op per step
        return layer.flag & (layer.pos < first_query_pos - self.window)

    def hidden(self, layer, query_pos: torch.Tensor) -> torch.Tensor:
        # (B, Hkv, Q, S): flagged and older than the window for that query
        age = query_pos[None, None, :, None] - layer.pos[:, :, None, :]
        return layer.flag[:, :, None, :] & (age > self.window)

    def describe(self) -> dict:
        return {"policy": self.name, "window": self.window, **({"sinks": self.sinks} if self.sinks else {})}
