"""Paged keys and values: one pool of fixed-size blocks per layer, a block table per (sequence, KV head).

The slot store keeps its logical (B, Hkv, S) layout for the small per-slot metadata (live, position,
flag, policy scores: about ten bytes a slot), but keys and values (2 * D * dtype bytes a slot, 256 to 512
for a 64-dim head) live in blocks: logical slot s of row (b, h) is offset s % block of physical block
table[b, h, s // block]. A row holds a block only where it holds a token, and a block goes back to the
pool when its last token goes, so the bytes follow each (sequence, head)'s own live tokens, not the
fullest row's.

The free list is host-side integers, as in nano-vllm's `BlockManager`: `can_allocate` before acting.
Attention reads the pool in place (`attend_blocks`): each block is scored by the queries of the row that holds it,
so no row is padded to the longest and no key or value is copied to be read.
"""

from __future__ import annotations

import torch

from .errors import KVShrinkError

DEFAULT_BLOCK = 32


class BlockPool:
    """Host-side free list of one layer's physical blocks: integers only, never a device read."""

    def __init__(self, limit: int | None = None):
        self.limit = limit  # None: the pool grows; else a fixed number of blocks (a serving budget)
        self.total = 0  # blocks that exist (the storage's length)
        self.free: list[int] = []

    @property
    def used(self) -> int:
        return self.total - len(self.free)

    def can_allocate(self, n: int) -> bool:
        return self.limit is None or self.used + n <= self.limit

    def allocate(self, n: int) -> tuple[list[int], int]:
        """n block ids, freed ones first; also how many new blocks the storage must add for them."""
        if not self.can_allocate(n):
            raise KVShrinkError(f"the KV pool is full ({self.limit} blocks): raise the memory budget or run fewer sequences")
        reused = [self.free.pop() for _ in range(min(n, len(self.free)))]
        new = n - len(reused)
        ids = reused + list(range(self.total, self.total + new))
        self.total += new
        return ids, new

    def release(self, ids: list[int]) -> None:
        self.free.extend(ids)


class PagedKV:
    """One layer's keys and values in blocks, addressed by the slot store's logical slots."""

    def __init__(self, batch: int, heads: int, key_dim: int, value_dim: int, dtype, device,
                 block: int = DEFAULT_BLOCK, limit: int | None = None):
        self.block, self.pool = block, BlockPool(limit)
        self.keys = torch.zeros(0, block, key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(0, block, value_dim, dtype=dtype, device=device)
        self.table = torch.full((batch, heads, 0), -1, dtype=torch.int32, device=device)
        self._owners: tuple[torch.Tensor, torch.Tensor] | None = None  # who holds each block, until the table changes
        if limit is not None:
            self._extend(limit)

    # -- bookkeeping -----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.table.nbytes

    @property
    def held_blocks(self) -> int:
        return self.pool.used

    def resize(self, slots: int) -> None:
        """Cover `slots` logical slots per row (a multiple of the block); new blocks are not held yet."""
        width = slots // self.block
        have = self.table.shape[2]
        if width > have:
            self.table = torch.cat([self.table, self.table.new_full((*self.table.shape[:2], width - have), -1)], 2)
        elif width < have:
            self.table = self.table[..., :width].contiguous()

    def _extend(self, n: int) -> None:
        """Add n zeroed blocks to the storage (zeros, so that a masked read of a never-written slot is 0, not NaN)."""
        if n:
            self.keys = torch.cat([self.keys, self.keys.new_zeros(n, *self.keys.shape[1:])])
            self.values = torch.cat([self.values, self.values.new_zeros(n, *self.values.shape[1:])])

    def hold(self, slots: torch.Tensor) -> None:
        """Make sure every block that holds one of `slots` (B, Hkv, n) has a physical block."""
        logical = slots.long() // self.block
        unheld = self.table.gather(2, logical) < 0
        if not bool(unheld.any()):  # the usual decode step: the new token lands in a block its row holds
            return
        missing = torch.zeros(self.table.shape, dtype=torch.bool, device=slots.device)
        self.hold_blocks(missing.scatter_(2, logical, unheld))

    def hold_blocks(self, wanted: torch.Tensor) -> None:
        """Give a physical block to each logical block marked in `wanted` (B, Hkv, W) that has none."""
        where = (wanted & (self.table < 0)).nonzero(as_tuple=True)
        n = where[0].numel()
        if n:
            ids, new = self.pool.allocate(n)
            self._extend(new)
            self.table[where] = torch.tensor(ids, dtype=torch.int32, device=self.table.device)
            self._owners = None

    def release_empty(self, live: torch.Tensor) -> None:
        """Return to the pool every held block none of whose slots is live; live: (B, Hkv, S)."""
        B, H, S = live.shape
        empty = (self.table >= 0) & ~live.view(B, H, S // self.block, self.block).any(-1)
        if not bool(empty.any()):
            return
        where = empty.nonzero(as_tuple=True)
        if where[0].numel():
            self.pool.release(self.table[where].tolist())
            self.table[where] = -1
            self._owners = None

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of the flat (blocks * block, D) storage holding the logical `slots` (B, Hkv, n); a slot of a block not
        held maps into block 0, to be masked by the reader."""
        physical = self.table.gather(2, slots.long() // self.block).long().clamp(min=0)
        return physical * self.block + slots.long() % self.block

    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as flat (blocks * block, D) tensors, the rows `rows_of` names."""
        return self.keys.view(-1, self.keys.shape[-1]), self.values.view(-1, self.values.shape[-1])

    def compact(self, order: torch.Tensor, kept: torch.Tensor) -> None:
        """Slot j of each row now holds what slot order[..., j] held, for the `kept` (B, Hkv, n) ones (the others'
        data go); the table narrows to n slots. Live data is copied out, every block released, and the kept
        slots written back from block 0 on, so the storage does not grow for it."""
        B, H, n = order.shape
        kept = kept & (self.table.gather(2, order.long() // self.block) >= 0)  # a slot whose block went holds nothing
        b, h, j = kept.nonzero(as_tuple=True)
        source = self.rows_of(order)[b, h, j]
        keys, values = (flat.index_select(0, source) for flat in self.storage())
        self.pool.release(self.table[self.table >= 0].tolist())
        self.table = self.table.new_full((B, H, n // self.block), -1)
        self._owners = None
        wanted = torch.zeros(self.table.shape, dtype=torch.bool, device=self.table.device)
        wanted[b, h, j // self.block] = True
        self.hold_blocks(wanted)
        target = self.table[b, h, j // self.block].long() * self.block + j % self.block
        for flat, data in zip(self.storage(), (keys, values)):
            flat.index_copy_(0, target, data)
        self.shrink()

    def shrink(self) -> None:
        """Renumber the held blocks 0 .. used - 1 and cut the storage there: after rows leave or a compaction,
        what stays allocated is what is held."""
        if self.pool.limit is not None or self.pool.used == self.pool.total:
            return
        held = self.table >= 0
        old = self.table[held].long()
        new = torch.arange(old.numel(), device=old.device)
        moved = old != new
        if bool(moved.any()):
            self.keys[new[moved]] = self.keys[old[moved]]
            self.values[new[moved]] = self.values[old[moved]]
        self.table[held] = new.to(torch.int32)
        self.keys, self.values = self.keys[: old.numel()].clone(), self.values[: old.numel()].clone()
        self.pool.total, self.pool.free = old.numel(), []
        self._owners = None

    def per_slot(self, weights: torch.Tensor, queries: int) -> torch.Tensor:
        """`attend_blocks`' weights per block of the storage (n, M, block) laid out per logical slot: (B, Hkv, M, S)."""
        B, H, W = self.table.shape
        rows, logical = self.owners()
        out = weights.new_zeros(B * H + 1, W, queries, self.block)  # the last row takes the free blocks' (zero) weights
        out[rows, logical] = weights
        return out[:-1].permute(0, 2, 1, 3).reshape(B, H, queries, W * self.block)

    # -- data ------------------------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, Hkv, n, D) at the logical `slots` (B, Hkv, n), taking blocks as needed."""
        slots = slots.long()
        physical = self.table.gather(2, slots // self.block)
        if bool((physical < 0).any()):
            self.hold(slots)
            physical = self.table.gather(2, slots // self.block)
        rows = (physical.long() * self.block + slots % self.block).flatten()
        for flat, data in zip(self.storage(), (k, v)):
            flat.index_copy_(0, rows, data.reshape(-1, data.shape[-1]).to(flat.dtype))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, S, D) copies of keys and values in the logical layout (zeros where no block is held):
        for export and tests, never for attention."""
        B, H, W = self.table.shape
        physical = self.table.clamp(min=0).flatten().long()
        held = (self.table >= 0)[..., None, None]
        keys = (self.keys.index_select(0, physical).view(B, H, W, self.block, -1) * held).view(B, H, W * self.block, -1)
        values = (self.values.index_select(0, physical).view(B, H, W, self.block, -1) * held).view(B, H, W * self.block, -1)
        return keys, values

    def owners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row b * Hkv + h, logical block) of each of the storage's first `pool.total` blocks; a free block
        belongs to row B * Hkv, one past the last, which no query reads."""
        if self._owners is None:
            B, H, _ = self.table.shape
            b, h, w = (self.table >= 0).nonzero(as_tuple=True)
            physical = self.table[b, h, w].long()
            rows = torch.full((self.pool.total,), B * H, dtype=torch.long, device=self.table.device)
            logical = torch.zeros(self.pool.total, dtype=torch.long, device=self.table.device)
            rows[physical], logical[physical] = b * H + h, w
            self._owners = (rows, logical)
        return self._owners

    def take_rows(self, rows: torch.Tensor) -> None:
        """Keep sequences `rows`, in this order; the blocks of the others go back to the pool. A row named more
        than once (the samples of one prompt) gets its own copy of the blocks, to write into on its own."""
        kept = torch.zeros(self.table.shape[0], dtype=torch.bool, device=self.table.device)
        kept[rows] = True
        gone = self.table[~kept]
        self.pool.release(gone[gone >= 0].tolist())
        self.table = self.table.index_select(0, rows)
        self._unshare()
        self._owners = None
        self.shrink()

    def _unshare(self) -> None:
        """Give every table entry that repeats an earlier one's block a copy of that block."""
        held = self.table >= 0
        ids = self.table[held].long()
        order = ids.argsort(stable=True)
        repeat = torch.zeros_like(held[held])
        repeat[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        n = int(repeat.sum())
        if n:
            new, grow = self.pool.allocate(n)
            self._extend(grow)
            copies = torch.tensor(new, dtype=torch.long, device=ids.device)
            self.keys[copies], self.values[copies] = self.keys[ids[repeat]], self.values[ids[repeat]]
            ids[repeat] = copies
            self.table[held] = ids.to(torch.int32)

    def append_rows(self, other: "PagedKV") -> None:
        """Add `other`'s sequences after ours: their blocks are copied into this pool."""
        width = max(self.table.shape[2], other.table.shape[2])
        self.resize(width * self.block)
        theirs = other.table.new_full((*other.table.shape[:2], width), -1)
        theirs[..., :other.table.shape[2]] = other.table
        where = (theirs >= 0).nonzero(as_tuple=True)
        n = where[0].numel()
        ids, new = self.pool.allocate(n)
        self._extend(new)
        target = torch.tensor(ids, dtype=torch.long, device=self.table.device)
        source = theirs[where].long()
        self.keys.index_copy_(0, target, other.keys.index_select(0, source))
        self.values.index_copy_(0, target, other.values.index_select(0, source))
        theirs[where] = target.to(torch.int32)
        self.table = torch.cat([self.table, theirs], 0)
        self._owners = None


def attend_blocks(kv: PagedKV, q: torch.Tensor, visible: torch.Tensor, scaling: float,
                  weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (B, Hkv, M, D) (a KV head's query heads, times the queries) over the blocks each row
    holds. visible: (B, Hkv, M, S) bool, what each query may see, or (B, Hkv, 1, S) additive (0 / -inf) for all.

    The pool is read in place, block by block: each block is scored by its holder's queries (gathered per
    block: M x D numbers against the block x D keys it meets), and the softmax runs over each row's blocks
    (max and sum reduced per row). A free block is scored against nothing and weighs 0. Returns the output
    (B, Hkv, M, Dv) and, if `weights`, the attention weights per block of the storage (n, M, block), for
    policies that score tokens by them (`PagedKV.per_slot` lays them out per slot)."""
    B, H, M, D = q.shape
    rows, logical = kv.owners()
    n, block, width = rows.numel(), kv.block, kv.table.shape[2]
    keys, values = kv.keys[:n], kv.values[:n]
    queries = torch.cat([q.reshape(B * H, M, D), q.new_zeros(1, M, D)]).index_select(0, rows)
    if visible.dtype != torch.bool:  # decode: an additive (B, Hkv, 1, S) bias, picked per block; one fused product
        padded = torch.cat([visible.reshape(B * H * width, block), visible.new_full((1, block), float("-inf"))])
        bias = padded.index_select(0, rows * width + logical)[:, None, :]  # a free block: rows * width is the -inf row
        scores = torch.baddbmm(bias.to(queries.dtype), queries, keys.mT, alpha=scaling).float()  # (n, M, block)
    else:
        padded = torch.cat([visible.reshape(B * H, M, width, block), visible.new_zeros(1, M, width, block)])
        scores = ((queries @ keys.mT).float() * scaling).masked_fill(~padded[rows, :, logical], float("-inf"))
    top = torch.full((B * H + 1, M), float("-inf"), device=q.device)
    top.scatter_reduce_(0, rows[:, None].expand(n, M), scores.amax(-1), "amax")
    top = top.masked_fill(torch.isinf(top), 0.0)  # a row that sees nothing (padding, free blocks) gets zeros, not NaN
    probs = scores.sub_(top.index_select(0, rows)[..., None]).exp_()  # (n, M, block), unnormalised
    total = torch.zeros(B * H + 1, M, device=q.device).index_add_(0, rows, probs.sum(-1)).clamp_(min=1e-30)
    out = torch.zeros(B * H + 1, M, values.shape[-1], dtype=torch.float32, device=q.device)
    out.index_add_(0, rows, (probs.to(values.dtype) @ values).float())
    out = (out[:-1] / total[:-1, :, None]).to(q.dtype).view(B, H, M, -1)
    return out, (probs / total.index_select(0, rows)[..., None] if weights else None)
