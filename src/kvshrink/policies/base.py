"""The cache-policy interface: a policy decides which cached tokens go; the cache does everything else.

The cache (`kvshrink.cache.KVCache`) owns the slot storage, writes, attention over live slots and the
accounting. At each forward of Q new tokens at positions t0 .. t0+Q-1 of one layer it asks the policy:

1. `expired(layer, t0)`: which live slots are gone for the first new query (freed before the new
   tokens are written, so their slots can be reused at once);
2. `hidden(layer, query_pos)`: for multi-token forwards only, which still-stored slots a later query
   of the same chunk must not see (a token can expire in the middle of a chunk);
3. `attend(layer, q, scaling)`: at decode, a read-selection policy (Quest) attends over the slots it
   picks, with its own kernel; by default the cache attends over every live slot;
4. after attention, budget policies (`keep_scores`, `budget`) have their lowest-scoring tokens freed,
   scored from the attention weights handed to `observe` when `needs_attention` is set.

A layer exposes per-slot metadata: `live` (B, Hkv, S) bool, `pos` (B, Hkv, S) int32 token positions,
and `flag` (B, Hkv, S) bool "marked for delayed eviction". What a policy keeps of its own it declares in
`new_state` (`kvshrink.policies.state`), so that the cache can move it with the rows and slots.
"""

from __future__ import annotations

import torch

from ..errors import KVShrinkError
from .state import PolicyState

#: prompt chunk length for policies that evict while the prompt goes through (16: docs/conventions.md)
EVICTION_CHUNK = 16


class CachePolicy:
    """Base class: keeps everything (vanilla attention)."""

    name = "none"
    #: the compression ratio the policy aims at (None: unknown); callers size batches and budgets by it
    expected_cr: float | None = 1.0
    #: whether evicted tokens free cache memory (Quest only skips reads: it keeps every token)
    frees_memory = False
    #: set when the policy needs per-token eviction decisions from a DMS model
    needs_dms = False
    #: set when the policy scores tokens by attention weights: the cache then computes them explicitly
    needs_attention = False
    #: prefill chunk length the policy is defined with (budget policies evict between 16-token chunks)
    prefill_chunk: int | None = None
    #: a sequence's first `sinks` real tokens are never evicted (DMS: the cache clears their flags)
    sinks: int = 0

    def new_state(self, keys: torch.Tensor) -> PolicyState:
        """The tensors the policy keeps on a layer whose first keys (B, Hkv, Q, D) just arrived, at capacity 0
        (`layer.state`; see `kvshrink.policies.state`)."""
        return PolicyState()

    def expired(self, layer, first_query_pos: int) -> torch.Tensor | None:
        return None

    def hidden(self, layer, query_pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def on_write(self, layer, k: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> None:
        """New keys k (B, Hkv, Q, D) were stored in `slots` (B, Hkv, Q): keep per-layer summaries current."""

    def attend(self, layer, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decode only, read-selection policies: attention of q (B, Hkv, G, D) over the slots the policy
        picks -> ((B, Hkv, G, Dv) output, (B, 1) slots read over KV heads, what picking them read included).
        None: the cache attends over every live slot."""
        return None

    def observe(self, layer, weights: torch.Tensor, valid: torch.Tensor) -> None:
        """weights: (B, Hkv, Q, S) attention of this forward's queries, averaged over each KV head's
        query heads; valid: (B, Q) real (non-padding) queries. Called only if `needs_attention`."""

    def keep_scores(self, layer) -> torch.Tensor | None:
        """Budget policies: (B, Hkv, S) scores, higher = keep; the cache frees the lowest live slots
        down to `budget(layer)` after each forward. None: no budget."""
        return None

    def budget(self, layer) -> torch.Tensor | None:
        return None

    def describe(self) -> dict:
        return {"policy": self.name}


def dms_model_needed(name: str) -> KVShrinkError:
    """The one answer to a DMS policy on a model without DMS (asked by name, or found at the first forward)."""
    return KVShrinkError(f"policy {name!r} needs a DMS model; retrofit one with `kvshrink retrofit MODEL --out DIR`")


def sink_slots(layer, sinks: int) -> torch.Tensor:
    """(B, Hkv, S) bool: slots holding one of the first `sinks` real tokens of their sequence (attention
    sinks, which window and DMS policies never evict). `first_pos` skips each row's left padding."""
    return layer.pos < (layer.first_pos + sinks)[:, None, None]
