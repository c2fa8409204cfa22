"""H2O: heavy hitters (largest attention accumulated over all queries so far) plus the recent tokens,
half of the budget each.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv 2306.14048). Attention is averaged over the KV head's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import PROTECTED, BudgetPolicy, most_recent, per_slot_score
from .state import PolicyState


@dataclass
class H2OPolicy(BudgetPolicy):
    name = "h2o"
    needs_attention = True

    def new_state(self, keys: torch.Tensor) -> PolicyState:
        return per_slot_score(keys)

    def observe(self, layer, weights: torch.Tensor, valid: torch.Tensor) -> None:
        layer.state.score += (weights * valid[:, None, :, None]).sum(2)

    def keep_scores(self, layer) -> torch.Tensor:
        recent = most_recent(layer, self.budget(layer) // 2)
        return layer.state.score + PROTECTED * recent
