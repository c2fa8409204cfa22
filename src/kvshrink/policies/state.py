"""Per-layer tensors declared by kind, so that the cache moves them without knowing what they mean.

- per slot (`SLOT`): (B, Hkv, S, ...), an entry per cache slot (a key, a TOVA score). Growing the cache adds
  slots at the fill; compacting keeps the slots it keeps; a policy's entries restart at the fill for each
  new token.
- per row (`ROW`): (B, ...), any other shape per sequence (a row's token count, Quest's page bounds). The
  rows of two caches join after the smaller is padded with the fill along its other dimensions.

A tensor of slot indices into its own (sequence, KV head) (`slot_index`, -1: none) follows the slots when
the cache compacts them. Every kind is taken (rows kept), appended and counted in bytes alike. The cache
declares its own layout this way (`SlotLayer.LAYOUT`), and each policy its state (`CachePolicy.new_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SLOT, ROW = "slot", "row"


@dataclass(frozen=True)
class Kind:
    per: str  # SLOT or ROW
    fill: float = 0
    slot_index: bool = False


class PolicyState:
    """A policy's tensors on one cache layer, read and written as attributes (`layer.state.score`), each
    declared once by `add`. Empty for a policy that keeps nothing beside the cache's layout."""

    def __init__(self):
        self.kinds: dict[str, Kind] = {}

    def add(self, name: str, tensor: torch.Tensor, per: str, fill: float = 0, slot_index: bool = False) -> PolicyState:
        self.kinds[name] = Kind(per, fill, slot_index)
        setattr(self, name, tensor)
        return self

    def __len__(self) -> int:
        return len(self.kinds)


# The moves below take a holder (an object carrying the tensors as attributes) and its {name: Kind}.

def pad(t: torch.Tensor, dim: int, n: int, fill: float) -> torch.Tensor:
    """t with n more entries of `fill` along `dim`."""
    if n <= 0:
        return t
    return torch.cat([t, t.new_full((*t.shape[:dim], n, *t.shape[dim + 1:]), fill)], dim)


def grow(holder, kinds: dict[str, Kind], extra: int) -> None:
    """Add `extra` slots at the end of every per-slot tensor."""
    for name, kind in kinds.items():
        if kind.per == SLOT:
            setattr(holder, name, pad(getattr(holder, name), 2, extra, kind.fill))


def take(holder, kinds: dict[str, Kind], rows: torch.Tensor) -> None:
    """Keep sequences `rows` (B',) of every tensor."""
    for name in kinds:
        setattr(holder, name, getattr(holder, name).index_select(0, rows))


def append(holder, other, kinds: dict[str, Kind]) -> None:
    """`other`'s sequences after `holder`'s, each tensor padded with its fill to the larger of the two shapes."""
    for name, kind in kinds.items():
        a, b = getattr(holder, name), getattr(other, name)
        for dim in range(1, a.dim()):
            a, b = pad(a, dim, b.shape[dim] - a.shape[dim], kind.fill), pad(b, dim, a.shape[dim] - b.shape[dim], kind.fill)
        setattr(holder, name, torch.cat([a, b], 0))


def compact(holder, kinds: dict[str, Kind], keep: torch.Tensor, new_slot: torch.Tensor) -> None:
    """Keep slots `keep` (B, Hkv, n) of every per-slot tensor, in that order; old slot s is now new_slot[..., s]
    (B, Hkv, S), which slot indices are mapped through."""
    for name, kind in kinds.items():
        t = getattr(holder, name)
        if kind.per == SLOT:
            t = t.gather(2, keep.view(*keep.shape, *[1] * (t.dim() - 3)).expand(*keep.shape, *t.shape[3:]))
        elif kind.slot_index:
            moved = new_slot.gather(2, t.clamp(min=0).long().reshape(*new_slot.shape[:2], -1)).view_as(t)
            t = torch.where(t >= 0, moved.to(t.dtype), -1)
        setattr(holder, name, t)


def clear(holder, kinds: dict[str, Kind], slots: torch.Tensor) -> None:
    """Per-slot entries of `slots` (B, Hkv, Q) back to their fill (new tokens are written there)."""
    for name, kind in kinds.items():
        if kind.per == SLOT:
            t = getattr(holder, name)
            t.scatter_(2, slots.view(*slots.shape, *[1] * (t.dim() - 3)).expand(*slots.shape, *t.shape[3:]), kind.fill)


def nbytes(holder, kinds: dict[str, Kind]) -> int:
    return sum(getattr(holder, name).nbytes for name in kinds)


def slot_bytes(holder, kinds: dict[str, Kind]) -> int:
    """Bytes one slot of one sequence takes, over its KV heads: what each more slot of capacity costs a row."""
    return sum(t.element_size() * t.shape[1] * math.prod(t.shape[3:])
               for t in (getattr(holder, name) for name, kind in kinds.items() if kind.per == SLOT))
