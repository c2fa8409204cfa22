"""The engine's admission arithmetic, in bytes: what the batch's caches will allocate with the queue's head
admitted, and when they have outgrown the budget. Plain integers on the host, priced by the cache's
`accounting.Footprint` and compared with what the caches' ledgers say they allocate; the engine gathers
them and acts.

A request's rows are expected to end holding their prompt plus `max_tokens`, compressed by the policy's ratio
(DMS: its trained CR) beyond the window, which is never compressed, or by the ratio the running sequences
really reach if that is lower. What a batch allocates then has two parts:

- per slot of capacity: a cache layer sizes every row to its fullest (`accounting.Ledger`), so the slot
  metadata and the policy's per-slot state (and, in a contiguous cache, the keys and values) cost
  rows x the longest row's kept tokens, rounded up to the cache's growth chunk; plus each row's own metadata;
- per held key/value token (a paged cache, that of every policy that frees memory): each row's keys and
  values follow its own kept tokens, rounded up to whole blocks, plus their share of the read buffer.

So a DMS model, whose rows hold about 1/CR of their tokens, admits about CR times the sequences of a vanilla
model in the same bytes. The request being read holds one prefill chunk more (`headroom`: an evicting policy
holds a chunk whole until its evictions apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..accounting import Footprint
from ..cache import DEFAULT_CHUNK
from ..errors import KVShrinkError


@dataclass
class Scheduler:
    budget: int  # bytes the KV caches may allocate
    max_batch: int  # running sequences
    cost: Footprint  # what a sequence's slots, row and held tokens cost
    expected_cr: float = 1.0
    window: int = 0
    headroom: int = 0
    chunk: int = DEFAULT_CHUNK  # a cache row grows by this many slots

    def kept(self, prompt: int, new: int, cr: float | None = None) -> int:
        """Tokens a row of a request keeps at its end: the window stays whole, the rest is compressed."""
        total = prompt + new
        return min(total, self.window + math.ceil(max(0, total - self.window) / (cr or self.expected_cr)))

    def row_slots(self, prompt: int, new: int, cr: float | None = None) -> int:
        """Slots of capacity a row of a request needs at its end: its kept tokens, rounded up to the chunk."""
        return self._chunks(self.kept(prompt, new, cr))

    def allocated(self, requests: list[tuple[int, int, int]], cr: float | None = None) -> int:
        """Bytes a batch of these requests, each (prompt, max_tokens, n), allocates at its end, while one more
        prompt is read: every row's slots sized to the longest, each row's keys and values to its own tokens."""
        rows = sum(n for _, _, n in requests)
        kept = [(self.kept(prompt, new, cr), n) for prompt, new, n in requests]
        capacity = self._chunks(max(k for k, _ in kept))
        return (rows * (self.cost.capacity_bytes(capacity) + self.cost.row) + sum(n * self.cost.held_bytes(k) for k, n in kept)
                + self.cost.capacity_bytes(self._chunks(self.headroom)) + self.cost.held_bytes(self.headroom))

    def check_fits_alone(self, prompt: int, new: int, n: int) -> None:
        """Refuse at submission a request that could never run, even alone."""
        if n > self.max_batch:
            raise KVShrinkError(f"n = {n} samples exceed the server's --max-batch {self.max_batch}; lower n")
        need = self.allocated([(prompt, new, n)])
        if need > self.budget:
            raise KVShrinkError(f"this request needs about {size(need)} of KV cache ({prompt} prompt + {new} max_tokens, x{n} "
                                f"samples, at CR {self.expected_cr:g}), more than the server's budget of {size(self.budget)}; "
                                "shorten the prompt or lower max_tokens or n")

    def achieved_cr(self, rows: list[tuple[int, float]]) -> float:
        """The ratio the running rows, each (tokens seen, live tokens), really reach beyond the window, capped
        by the expected one. Text unlike a DMS model's training data can compress less than its target;
        admitting at the target would overfill the budget, pause the newest request and let it straight back
        in, over and over, re-reading its prompt each time."""
        seen = sum(max(0, tokens - self.window) for tokens, _ in rows)
        held = sum(max(0.0, live - self.window) for _, live in rows)
        return min(self.expected_cr, max(1.0, seen / held)) if held > 0 else self.expected_cr

    def admits(self, admitted: list[tuple[int, int, int]], head: tuple[int, int, int], running_rows: int, cr: float) -> bool:
        """Whether the queue's head, (prompt, max_tokens, n), fits beside the admitted requests at ratio `cr`,
        within the budget and the batch size. Alone, it always fits (it was checked at submission)."""
        if not running_rows:
            return True
        return self.allocated([*admitted, head], cr) <= self.budget and running_rows + head[2] <= self.max_batch

    def over_budget(self, allocated: int, admitted_requests: int) -> bool:
        """The caches' allocated bytes outgrew the budget and more than one request holds them (one alone always goes on)."""
        return admitted_requests > 1 and allocated > self.budget

    def _chunks(self, slots: int) -> int:
        return -(-slots // self.chunk) * self.chunk


def size(nbytes: float) -> str:
    """Bytes for a person: 512 B, 3.2 KB, 256 MB, 1.5 GB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1024 or unit == "GB":
            return f"{nbytes:,.1f}".rstrip("0").rstrip(".") + f" {unit}"
        nbytes /= 1024
