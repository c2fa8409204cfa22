"""StreamingLLM window: the first 4 tokens (attention sinks) and the most recent ones.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import PROTECTED, BudgetPolicy


@dataclass
class WindowPolicy(BudgetPolicy):
    sinks: int = 4
    name = "window"

    def keep_scores(self, layer) -> torch.Tensor:
        sink = layer.pos < (layer.first_pos + self.sinks)[:, None, None]
        return layer.pos.to(torch.float32) + PROTECTED * sink  # newest first, sinks always
