"""Quest: keep every token, but let each decode query read only the pages that may matter to it.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (arXiv
2406.10774). Tokens are grouped in pages of 16 (by position, from the sequence's first real token);
each page keeps the channel-wise max and min of its keys, so q . k <= sum_c max(q_c max_c, q_c min_c)
bounds every key in it. A query reads the top pages by that bound (averaged over the KV head's query
heads) that fit its token budget ceil(t / CR), the current page always included. Memory is not saved;
reads are, minus the two summary vectors per page that the selection itself reads (SPEC 7 counts them
in `kv_reads`, so Quest's achieved ratio sits below the nominal CR). The prompt is read densely, as in
the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .budget import BudgetPolicy


@dataclass
class QuestPolicy(BudgetPolicy):
    """The budget rule of the eviction baselines, used to select reads instead (nothing is freed:
    no `keep_scores`), and a dense prompt (no 16-token prefill chunks)."""

    page: int = 16
    name = "quest"
    prefill_chunk = None
    layer_fields = ("page_max", "page_min")  # (B, Hkv, pages, D): channel-wise key bounds of every page

    def init_layer(self, layer, keys: torch.Tensor) -> None:
        layer.page_max = keys.new_zeros(*keys.shape[:2], 0, keys.shape[3])
        layer.page_min = layer.page_max.clone()

    def _page_of(self, layer, pos: torch.Tensor) -> torch.Tensor:
        return ((pos - layer.first_pos[:, None, None]) // self.page).clamp(min=0).long()

    def on_write(self, layer, k, slots, valid) -> None:
        """Fold the new real keys into their pages' max/min (pages grow as positions do)."""
        pages = self._page_of(layer, layer.pos.gather(2, slots))  # (B, Hkv, Q)
        grow = layer.seen // self.page + 1 - layer.page_max.shape[2]  # a host bound on the pages written (no sync)
        if grow > 0:
            new_max = k.new_full((*k.shape[:2], grow, k.shape[3]), float("-inf"))
            layer.page_max = torch.cat([layer.page_max, new_max], 2)
            layer.page_min = torch.cat([layer.page_min, -new_max], 2)
            layer.cache.accounting.note_bytes(layer.cache.allocated_bytes())
        real = valid[:, None, :, None].expand_as(k)
        index = pages[..., None].expand_as(k)
        layer.page_max.scatter_reduce_(2, index, k.masked_fill(~real, float("-inf")), "amax")
        layer.page_min.scatter_reduce_(2, index, k.masked_fill(~real, float("inf")), "amin")

    def select(self, layer, q, valid):
        empty = torch.isneginf(layer.page_max[..., 0])  # (B, Hkv, P): pages holding no real token
        bound = torch.maximum(q[:, :, :, None] * layer.page_max[:, :, None], q[:, :, :, None] * layer.page_min[:, :, None])
        score = bound.sum(-1).mean(2).masked_fill(empty, float("-inf"))  # (B, Hkv, P), q: (B, Hkv, G, D)
        current = self._page_of(layer, layer.pos.gather(2, layer.last_slot[..., None]))  # the query's own page
        score = score.scatter(2, current, float("inf"))
        pages_allowed = (self.budget(layer) // self.page).clamp(min=1)  # (B,)
        k = min(max(1, math.ceil(layer.seen / self.cr) // self.page), score.shape[2])  # >= every row's allowance
        top = score.topk(k, dim=-1).indices
        allowed = (torch.arange(k, device=top.device) < pages_allowed[:, None, None]).expand_as(top)
        chosen_pages = torch.zeros_like(empty).scatter_(2, top, allowed)
        chosen = layer.live & chosen_pages.gather(2, self._page_of(layer, layer.pos).clamp(max=score.shape[2] - 1))
        summaries = 2 * (~empty).sum(-1).sum(1)  # the max and min vector of every non-empty page, over KV heads
        return chosen, summaries.to(torch.float64), min(k * self.page, chosen.shape[2])

    def describe(self) -> dict:
        return {"policy": self.name, "cr": self.cr, "page": self.page}
