"""Training-free eviction to a token budget: the shared rule of TOVA, H2O and the StreamingLLM window.

The baselines' prompt rule (docs/conventions.md): every (sequence, KV head) row keeps at most ceil(t / CR)
tokens, t = the sequence's real tokens seen so far, enforced after every decode step and after each 16-token prefill chunk (the prompt is
processed in chunks of 16, evicting between them as in decode). A policy only says which tokens are
worth keeping (`keep_scores`); the cache frees the lowest-scoring live slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVShrinkError, check_cr
from .base import EVICTION_CHUNK, CachePolicy
from .state import SLOT, PolicyState

PROTECTED = 1e30  # a score no attention weight or position reaches: the token is never evicted


@dataclass
class BudgetPolicy(CachePolicy):
    cr: float
    prefill_chunk = EVICTION_CHUNK
    frees_memory = True

    def __post_init__(self):
        if self.cr is None:
            raise KVShrinkError(f"policy {self.name!r} works to a token budget: give cr (e.g. cr=8)")
        check_cr(self.cr)

    @property
    def expected_cr(self) -> float:
        return self.cr

    def budget(self, layer) -> torch.Tensor:
        return torch.ceil(layer.real.to(torch.float64) / self.cr).to(torch.long)

    def describe(self) -> dict:
        return {"policy": self.name, "cr": self.cr}


def most_recent(layer, n: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: the `n` (B,) most recent live tokens of each row."""
    pos = layer.pos.masked_fill(~layer.live, -1)
    rank = torch.empty_like(pos, dtype=torch.long).scatter_(
        -1, pos.argsort(-1, descending=True), torch.arange(pos.shape[-1], device=pos.device).expand(pos.shape))
    return layer.live & (rank < n[:, None, None])


def per_slot_score(keys: torch.Tensor) -> PolicyState:
    """TOVA's and H2O's state: an fp32 attention score per slot, 0 for a new token."""
    B, H = keys.shape[:2]
    return PolicyState().add("score", torch.zeros(B, H, 0, dtype=torch.float32, device=keys.device), SLOT)
