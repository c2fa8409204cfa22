"""TOVA: evict the token the current query attends least (averaged over the KV head's query heads).

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv 2401.06104). In a 16-token prefill
chunk the chunk's last query scores the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import BudgetPolicy, per_slot_score
from .state import PolicyState


@dataclass
class TOVAPolicy(BudgetPolicy):
    name = "tova"
    needs_attention = True

    def new_state(self, keys: torch.Tensor) -> PolicyState:
        return per_slot_score(keys)

    def observe(self, layer, weights: torch.Tensor, valid: torch.Tensor) -> None:
        last = weights[:, :, -1, :]
        # a finished sequence's padding query says nothing: keep its old scores
        layer.state.score = torch.where(valid[:, -1, None, None], last, layer.state.score)

    def keep_scores(self, layer) -> torch.Tensor:
        return layer.state.score
