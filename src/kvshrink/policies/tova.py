"""TOVA: evict the token the current query attends least (averaged over the KV head's query heads).

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv 2401.06104). In a 16-token prefill
chunk the chunk's last query scores the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import BudgetPolicy


@dataclass
class TOVAPolicy(BudgetPolicy):
    name = "tova"
    needs_attention = True
    slot_fields = ("score",)

    def observe(self, layer, weights: torch.Tensor, valid: torch.Tensor) -> None:
        last = weights[:, :, -1, :]
        # a finished sequence's padding query says nothing: keep its old scores
        layer.score = torch.where(valid[:, -1, None, None], last, layer.score)

    def keep_scores(self, layer) -> torch.Tensor:
        return layer.score
