"""Quest: keep every token, but let each decode query read only the pages that may matter to it.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (arXiv
2406.10774). Tokens are grouped in pages of 16 (by position, from the sequence's first real token);
each page keeps the channel-wise max and min of its keys, so q . k <= sum_c max(q_c max_c, q_c min_c)
bounds every key in it. A query reads the top pages by that bound (averaged over the KV head's query
heads) that fit its token budget ceil(t / CR), the current page always included. Memory is not saved;
reads are, minus the two summary vectors per page that the selection itself reads (docs/conventions.md counts them
in `kv_reads`, so Quest's achieved ratio sits below the nominal CR). The prompt is read densely, as in
the paper.

A page table (the slot of each page's 16 tokens) lets a query gather just its chosen pages, so a
decode step touches the page summaries and a quarter of the cache at CR 4, never every slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import BudgetPolicy
from .state import ROW, PolicyState


@dataclass
class QuestPolicy(BudgetPolicy):
    """The budget rule of the eviction baselines, used to select reads instead (nothing is freed:
    no `keep_scores`), and a dense prompt (no 16-token prefill chunks)."""

    page: int = 16
    name = "quest"
    prefill_chunk = None
    frees_memory = False

    def new_state(self, keys: torch.Tensor) -> PolicyState:
        """Per row, grown a page at a time: (B, Hkv, pages, 2D) each page's channel-wise key max, then minus its
        min (both halves are maxima, so one in-place "amax" keeps them; -inf: empty); (B, Hkv, pages, page)
        int32 the slot of each of a page's tokens, -1 where none is stored yet."""
        B, H, _, D = keys.shape
        return (PolicyState()
                .add("page_bounds", keys.new_zeros(B, H, 0, 2 * D), ROW, fill=float("-inf"))
                .add("page_slots", torch.zeros(B, H, 0, self.page, dtype=torch.int32, device=keys.device), ROW, fill=-1,
                     slot_index=True))

    def on_write(self, layer, k, slots, valid) -> None:
        """Fold the new real keys into their pages' bounds and page table (pages grow as positions do)."""
        B, H, _, D = k.shape
        state = layer.state
        index = (layer.pos.gather(2, slots).long() - layer.first_pos[:, None, None]).clamp(min=0)  # in its sequence; padding -> 0
        layer.grow_state(("page_bounds", "page_slots"), 2, layer.seen // self.page + 1 - state.page_bounds.shape[2])  # a host bound (no sync)
        real = valid[:, None, :].expand_as(slots)
        where = (index // self.page)[..., None].expand(B, H, k.shape[2], 2 * D)
        state.page_bounds.scatter_reduce_(2, where, torch.cat([k, -k], -1).masked_fill(~real[..., None], float("-inf")), "amax")
        # padding writes -1, which "amax" never lets win over a real slot of the same entry
        state.page_slots.view(B, H, -1).scatter_reduce_(2, index, torch.where(real, slots, -1).to(torch.int32), "amax")

    def attend(self, layer, q, scaling):
        slots, readable, summaries = self.select(layer, q)
        reads = readable.sum(-1).sum(1, keepdim=True) + summaries[:, None]
        return read_slots(layer, q, slots, readable, scaling), reads

    def select(self, layer, q):
        """The pages query q (B, Hkv, G, D) reads: ((B, Hkv, n) their slots, (B, Hkv, n) which of those hold a
        token this row may read, (B,) the page summaries the choice read, over KV heads)."""
        B, H = q.shape[:2]
        bounds = layer.state.page_bounds
        empty = torch.isneginf(bounds[..., 0])  # (B, Hkv, P): pages holding no real token
        # sum_c max(q_c max_c, q_c min_c) = q+ . max + (-q-) . (-min), and the mean over the G query heads of
        # a linear form is the form of their mean: one matrix-vector product; q: (B, Hkv, G, D)
        q_split = torch.cat([q.clamp(min=0), -q.clamp(max=0)], -1).mean(2, keepdim=True)
        score = (q_split @ bounds.mT).squeeze(2).masked_fill(empty, float("-inf"))  # (B, Hkv, P)
        current = ((layer.real - 1).clamp(min=0) // self.page).view(B, 1, 1).expand(B, H, 1)  # the query's own page
        score = score.scatter(2, current, float("inf"))
        pages_allowed = (self.budget(layer) // self.page).clamp(min=1)  # (B,)
        n = min(max(1, math.ceil(layer.seen / self.cr) // self.page), score.shape[2])  # >= every row's allowance
        top = score.topk(n, dim=-1).indices  # best first, the current page at the head
        slots = layer.state.page_slots.gather(2, top[..., None].expand(-1, -1, -1, self.page))  # (B, Hkv, n, page)
        allowed = torch.arange(n, device=top.device) < pages_allowed[:, None, None]
        readable = (slots >= 0) & allowed[..., None]
        summaries = 2 * (~empty).sum(-1).sum(1)  # the max and min vector of every non-empty page, over KV heads
        return slots.flatten(2).clamp(min=0).long(), readable.flatten(2), summaries.to(torch.float64)

    def describe(self) -> dict:
        return {"policy": self.name, "cr": self.cr, "page": self.page}


def read_slots(layer, q: torch.Tensor, slots: torch.Tensor, readable: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of q (B, Hkv, G, D) over just the (B, Hkv, n) `slots` of `layer` (entries not `readable`
    masked), so that a step reads n slots instead of S. The keys are copied out (one row copy per slot) for
    one batched product; the values are never copied: `embedding_bag` sums each query head's chosen rows in
    place with its attention weights (on CPUs the copy cost about as much as the read;
    benchmarks/quest_kernels.py)."""
    B, H, G, _ = q.shape
    n = slots.shape[-1]
    rows = layer.rows_of(slots)  # rows of the layer's flat keys/values storage
    key_rows, value_rows = layer.storage()
    keys = pick_rows(layer.cache, key_rows, rows.flatten()).view(B, H, n, -1)
    bias = torch.zeros(slots.shape, dtype=q.dtype, device=q.device).masked_fill(~readable, float("-inf"))
    probs = torch.softmax(((q @ keys.mT) * scaling + bias[:, :, None, :]).float(), dim=-1)  # (B, Hkv, G, n)
    per_head = rows[:, :, None, :].expand(B, H, G, n).reshape(-1)
    out = F.embedding_bag(per_head, value_rows, torch.arange(0, per_head.numel(), n, device=q.device), mode="sum",
                          per_sample_weights=probs.reshape(-1).to(value_rows.dtype))
    return out.view(B, H, G, -1)


def pick_rows(cache, storage: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a flat (rows, D) storage: one row copy per slot, far faster than an element-wise
    gather. Outside autograd they land in the cache's reusable buffer (layers run one at a time), so that
    decode does not allocate and fault in fresh pages every step."""
    flat = storage.reshape(-1, storage.shape[-1])
    if torch.is_grad_enabled():
        return flat.index_select(0, rows)
    out = cache.scratch(rows.numel() * flat.shape[1], flat).view(rows.numel(), flat.shape[1])
    return torch.index_select(flat, 0, rows, out=out)
