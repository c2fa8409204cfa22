"""StreamingLLM window: the first 4 tokens (attention sinks) and the most recent ones.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import sink_slots
from .budget import PROTECTED, BudgetPolicy


@dataclass
class WindowPolicy(BudgetPolicy):
    sinks: int = 4
    name = "window"

    def keep_scores(self, layer) -> torch.Tensor:
        return layer.pos.to(torch.float32) + PROTECTED * sink_slots(layer, self.sinks)  # newest first, sinks always
