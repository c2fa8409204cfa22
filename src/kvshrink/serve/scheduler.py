"""The engine's admission arithmetic: the KV tokens a request will hold, whether the queue's head fits
beside what runs, and when live tokens have outgrown the budget. Plain numbers read on the host; the engine
gathers them and acts.

A request's expected footprint is its prompt plus `max_tokens`, compressed by the policy's ratio (DMS: its
trained CR) beyond the window, which is never compressed, or by the ratio the running sequences really reach
if that is lower; an evicting policy also needs one prefill chunk of headroom (a chunk is held whole before
its evictions apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import KVShrinkError


@dataclass
class Scheduler:
    budget: int  # KV tokens, averaged over (layer, KV head)
    max_batch: int  # running sequences
    expected_cr: float = 1.0
    window: int = 0
    headroom: int = 0

    def footprint(self, prompt: int, new: int, n: int, cr: float | None = None) -> int:
        """Expected live tokens at the end of a request: the window stays, the rest is compressed."""
        total = prompt + new
        keep = min(total, self.window + math.ceil(max(0, total - self.window) / (cr or self.expected_cr)))
        return n * keep

    def check_fits_alone(self, prompt: int, new: int, n: int) -> None:
        """Refuse at submission a request that could never run, even alone."""
        if n > self.max_batch:
            raise KVShrinkError(f"n = {n} samples exceed the server's --max-batch {self.max_batch}; lower n")
        need = self.footprint(prompt, new, n) + self.headroom
        if need > self.budget:
            raise KVShrinkError(f"this request needs about {need} KV tokens ({prompt} prompt + {new} max_tokens, x{n} "
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
        """Whether the queue's head, (prompt, max_tokens, n), fits beside the admitted requests' reserved
        footprints at ratio `cr`, within the budget and the batch size. Alone, it always fits (it was
        checked at submission)."""
        if not running_rows:
            return True
        need = sum(self.footprint(*r, cr) for r in admitted) + self.footprint(*head, cr) + self.headroom
        return need <= self.budget and running_rows + head[2] <= self.max_batch

    def over_budget(self, live_tokens: float, admitted_requests: int) -> bool:
        """Live tokens outgrew the budget and more than one request holds them (one alone always goes on)."""
        return admitted_requests > 1 and live_tokens > self.budget
