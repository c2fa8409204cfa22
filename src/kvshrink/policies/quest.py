"""Quest: keep every token, but let each decode query read only the pages that may matter to it.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (arXiv
2406.10774). Tokens are grouped in pages of 16 (by position, from the sequence's first real token);
each page keeps the channel-wise max and min of its keys, so q . k <= sum_c max(q_c max_c, q_c min_c)
bounds every key in it. A query reads the top pages by that bound (averaged over the KV head's query
heads) that fit its token budget ceil(t / CR), the current page always included. Memory is not saved;
reads are, minus the two summary vectors per page that the selection itself reads (SPEC 7 counts them
in `kv_reads`, so Quest's achieved ratio sits below the nominal CR). The prompt is read densely, as in
the paper.

A page table (the slot of each page's 16 tokens) lets a query gather just its chosen pages, so a
decode step touches the page summaries and a quarter of the cache at CR 4, never every slot.
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
    frees_memory = False
    # (B, Hkv, pages, 2D): each page's channel-wise key max, then minus its min (both halves are maxima, so
    # one in-place "amax" keeps them); (B, Hkv, pages, page) int32: the slot of each of a page's tokens,
    # -1 where none is stored yet
    layer_fields = ("page_bounds", "page_slots")

    def init_layer(self, layer, keys: torch.Tensor) -> None:
        B, H, _, D = keys.shape
        layer.page_bounds = keys.new_zeros(B, H, 0, 2 * D)
        layer.page_slots = torch.zeros(B, H, 0, self.page, dtype=torch.int32, device=keys.device)

    def on_write(self, layer, k, slots, valid) -> None:
        """Fold the new real keys into their pages' bounds and page table (pages grow as positions do)."""
        B, H, _, D = k.shape
        index = (layer.pos.gather(2, slots).long() - layer.first_pos[:, None, None]).clamp(min=0)  # in its sequence; padding -> 0
        grow = layer.seen // self.page + 1 - layer.page_bounds.shape[2]  # a host bound on the pages written (no sync)
        if grow > 0:
            layer.page_bounds = torch.cat([layer.page_bounds, k.new_full((B, H, grow, 2 * D), float("-inf"))], 2)
            layer.page_slots = torch.cat([layer.page_slots, layer.page_slots.new_full((B, H, grow, self.page), -1)], 2)
            layer.cache.accounting.note_bytes(layer.cache.allocated_bytes())
        real = valid[:, None, :].expand_as(slots)
        where = (index // self.page)[..., None].expand(B, H, k.shape[2], 2 * D)
        layer.page_bounds.scatter_reduce_(2, where, torch.cat([k, -k], -1).masked_fill(~real[..., None], float("-inf")), "amax")
        # padding writes -1, which "amax" never lets win over a real slot of the same entry
        layer.page_slots.view(B, H, -1).scatter_reduce_(2, index, torch.where(real, slots, -1).to(torch.int32), "amax")

    def on_compact(self, layer, new_slot: torch.Tensor) -> None:
        stored = layer.page_slots >= 0
        moved = new_slot.gather(2, layer.page_slots.clamp(min=0).long().flatten(2)).view_as(layer.page_slots)
        layer.page_slots = torch.where(stored, moved.to(torch.int32), -1)

    def select(self, layer, q, valid):
        B, H = q.shape[:2]
        empty = torch.isneginf(layer.page_bounds[..., 0])  # (B, Hkv, P): pages holding no real token
        # sum_c max(q_c max_c, q_c min_c) = q+ . max + (-q-) . (-min), and the mean over the G query heads of
        # a linear form is the form of their mean: one matrix-vector product; q: (B, Hkv, G, D)
        q_split = torch.cat([q.clamp(min=0), -q.clamp(max=0)], -1).mean(2, keepdim=True)
        score = (q_split @ layer.page_bounds.mT).squeeze(2).masked_fill(empty, float("-inf"))  # (B, Hkv, P)
        current = ((layer.real - 1).clamp(min=0) // self.page).view(B, 1, 1).expand(B, H, 1)  # the query's own page
        score = score.scatter(2, current, float("inf"))
        pages_allowed = (self.budget(layer) // self.page).clamp(min=1)  # (B,)
        n = min(max(1, math.ceil(layer.seen / self.cr) // self.page), score.shape[2])  # >= every row's allowance
        top = score.topk(n, dim=-1).indices  # best first, the current page at the head
        slots = layer.page_slots.gather(2, top[..., None].expand(-1, -1, -1, self.page))  # (B, Hkv, n, page)
        allowed = torch.arange(n, device=top.device) < pages_allowed[:, None, None]
        readable = (slots >= 0) & allowed[..., None]
        summaries = 2 * (~empty).sum(-1).sum(1)  # the max and min vector of every non-empty page, over KV heads
        return slots.flatten(2).clamp(min=0).long(), readable.flatten(2), summaries.to(torch.float64)

    def describe(self) -> dict:
        return {"policy": self.name, "cr": self.cr, "page": self.page}
