"""KVTC's bit allocation: the exact dynamic program over PCA components (paper §3.2, App. B.17).

The basis is orthonormal, so the cache's squared reconstruction error equals the squared error of the
quantized projections D = (X − μ)V, and the allocation can be chosen in the PCA domain. A plan tiles the
leading components with groups (runs of consecutive components, starting anywhere) of a size in
`GROUP_SIZES` and a kind in {int2, int4, fp8}; a group costs size·bits + 32 bits per token, and a
component left out of every group costs nothing and contributes its whole energy to the error. The
error of every candidate group is *measured* by running the real quantizer on calibration projections
(no λ/4^b model), and

    best[i, b] = least error on components [0, i) using at most b budget steps
               = min( best[i−1, b] + ‖P[:, i−1]‖²,                      component i−1 dropped
                      min_{s, kind} best[i−s, b − cost(s, kind)] + err(i−s, s, kind) )

with best[0, b] = 0 is optimal by induction on i. Budget steps are `step_bits` wide; every cost here
is even, so the default of 2 bits keeps the program exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .quant import BITS, GROUP_OVERHEAD_BITS, fake_quant

GROUP_SIZES = (1, 16, 64, 256, 1024)
KINDS = ("int2", "int4", "fp8")


def budget_bits(features: int, cr: float) -> int:
    """Bits per token for compression ratio `cr` against fp16 storage of `features` values."""
    return int(16 * features / cr)


class Group(NamedTuple):
    start: int
    size: int
    kind: str

    @property
    def bits(self) -> int:
        return self.size * BITS[self.kind] + GROUP_OVERHEAD_BITS


@dataclass(frozen=True)
class Plan:
    """The allocation for one stream (keys or values): its quantized groups, in component order."""

    groups: tuple[Group, ...]

    def __post_init__(self):
        end = 0
        for g in self.groups:
            if g.kind not in BITS or g.size < 1 or g.start < end:
                raise ValueError(f"not a KVTC plan: group {g} after component {end}")
            end = g.start + g.size

    @property
    def bits(self) -> int:
        """Bits per token, shift/scale overhead included."""
        return sum(g.bits for g in self.groups)

    @property
    def rank(self) -> int:
        """Components the codec projects onto: the trailing zero-bit ones are trimmed away."""
        return self.groups[-1].start + self.groups[-1].size if self.groups else 0

    def buckets(self) -> list[tuple[str, int, torch.Tensor]]:
        """(kind, size, column index (G, size)) per kind and size, so the codec quantizes each in one batch."""
        out = []
        for kind, size in sorted({(g.kind, g.size) for g in self.groups}):
            starts = torch.tensor([g.start for g in self.groups if (g.kind, g.size) == (kind, size)])
            out.append((kind, size, starts[:, None] + torch.arange(size)))
        return out

    def to_json(self) -> str:
        return json.dumps([list(g) for g in self.groups])

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(tuple(Group(int(a), int(s), str(k)) for a, s, k in json.loads(text)))


def block_errors(P: torch.Tensor, size: int, kind: str, chunk_elems: int = 1 << 22) -> np.ndarray:
    """(r − size + 1,) float64: the squared error of quantizing components [j, j + size) as one group."""
    blocks = P.unfold(1, size, 1)  # (n, r − size + 1, size), a view
    per_chunk = max(1, chunk_elems // (P.shape[0] * size))
    err = [((fake_quant(b, kind) - b) ** 2).sum((0, 2), dtype=torch.float64) for b in blocks.split(per_chunk, dim=1)]
    return torch.cat(err).cpu().numpy()


def allocate(P: torch.Tensor, budgets, sizes=GROUP_SIZES, kinds=KINDS, step_bits: int = 2) -> list[Plan]:
    """The least-error plan within each budget (bits per token). P: (n, r) fp32 calibration projections.

    best[r, b] holds the answer for every budget b up to the largest, so one table serves them all."""
    r = P.shape[1]
    steps = max(budgets) // step_bits
    options = [(s, k, math.ceil((s * BITS[k] + GROUP_OVERHEAD_BITS) / step_bits)) for s in sizes if s <= r for k in kinds]
    errors = [block_errors(P, s, k) for s, k, _ in options]
    dropped = (P.double() ** 2).sum(0).cpu().numpy()  # (r,): error of a component given no bits

    best = np.zeros((r + 1, steps + 1))
    choice = np.full((r + 1, steps + 1), -1, dtype=np.int8)  # -1: component i−1 dropped
    for i in range(1, r + 1):
        best[i] = best[i - 1] + dropped[i - 1]
        for o, (s, _, cost) in enumerate(options):
            if s > i or cost > steps:
                continue
            candidate = best[i - s, : steps + 1 - cost] + errors[o][i - s]  # spend `cost` steps on the group
            better = candidate < best[i, cost:]
            best[i, cost:][better] = candidate[better]
            choice[i, cost:][better] = o
    return [_backtrack(choice, options, budget // step_bits) for budget in budgets]


def _backtrack(choice: np.ndarray, options, steps: int) -> Plan:
    groups, i, b = [], choice.shape[0] - 1, steps
    while i > 0:
        o = choice[i, b]
        if o < 0:
            i -= 1
            continue
        s, kind, cost = options[o]
        groups.append(Group(i - s, s, kind))
        i, b = i - s, b - cost
    return Plan(tuple(reversed(groups)))
