"""The engine's admission arithmetic, in KV slots: what the batch will allocate with the queue's head admitted,
and when the caches have outgrown the budget. Plain numbers, read on the host (the caches' ledgers); the
engine gathers them and acts.

A cache layer sizes every row to its longest (`accounting.Ledger`), so a batch allocates rows x the longest
row's slots, whatever each row holds. A request's rows are expected to end with its prompt plus `max_tokens`,
compressed by the policy's ratio (DMS: its trained CR) beyond the window, which is never compressed, or by the
ratio the running sequences really reach if that is lower, rounded up to the cache's growth chunk. The request
being read holds one prefill chunk more (`headroom`: an evicting policy holds a chunk whole until its
evictions apply). Slots are counted per (layer, KV head) and summed over sequences, like live tokens; a
slot's bytes over every layer and KV head turn them into memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cache import DEFAULT_CHUNK
from ..errors import KVShrinkError


@dataclass
class Scheduler:
    budget: int  # KV slots the caches may allocate, per (layer, KV head), summed over sequences
    max_batch: int  # running sequences
    expected_cr: float = 1.0
    window: int = 0
    headroom: int = 0
    chunk: int = DEFAULT_CHUNK  # a cache row grows by this many slots

    def row_slots(self, prompt: int, new: int, cr: float | None = None) -> int:
        """Slots a row of a request allocates at its end: the window stays whole, the rest is compressed."""
        total = prompt + new
        keep = min(total, self.window + math.ceil(max(0, total - self.window) / (cr or self.expected_cr)))
        return self._chunks(keep)

    def allocated(self, requests: list[tuple[int, int, int]], cr: float | None = None) -> int:
        """Slots a batch of these requests, each (prompt, max_tokens, n), allocates at its end, while one more
        prompt is read: every row sized to the longest."""
        rows = sum(n for _, _, n in requests)
        return rows * max(self.row_slots(prompt, new, cr) for prompt, new, _ in requests) + self._chunks(self.headroom)

    def check_fits_alone(self, prompt: int, new: int, n: int) -> None:
        """Refuse at submission a request that could never run, even alone."""
        if n > self.max_batch:
            raise KVShrinkError(f"n = {n} samples exceed the server's --max-batch {self.max_batch}; lower n")
        need = self.allocated([(prompt, new, n)])
        if need > self.budget:
            raise KVShrinkError(f"this request needs about {need} KV slots ({prompt} prompt + {new} max_tokens, x{n} "
                                f"samples, at CR {self.expected_cr:g}), more than the server's budget of {self.budget}; "
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

    def over_budget(self, allocated: float, admitted_requests: int) -> bool:
        """The caches' allocation outgrew the budget and more than one request holds it (one alone always goes on)."""
        return admitted_requests > 1 and allocated > self.budget

    def _chunks(self, slots: int) -> int:
        return -(-slots // self.chunk) * self.chunk
