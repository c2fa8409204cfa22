"""The one accounting layer every policy is measured with (docs/conventions.md): KV reads, live tokens and
their peaks, allocated bytes, and vanilla's reads for the same tokens, which the reads-based CR divides by.
The cache records into it; generation, evaluation and the server read it. Beside it, each cache's `Ledger`
of what it allocates now, and the `Footprint` of one sequence (what each slot, row and held token costs),
which the server budgets by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def vanilla_reads(prompt_tokens, generated):
    """KV reads of a vanilla cache for `generated` tokens after a `prompt_tokens`-token prompt: the k-th
    generated token's query attends the prompt and the k - 1 tokens before it, itself included,
    sum_k (P + k - 1) = N P + N (N - 1) / 2. Numbers or tensors, elementwise."""
    return generated * prompt_tokens + generated * (generated - 1) / 2


class Accounting:
    """KV reads and live tokens per sequence, averaged over (layer, KV head) pairs (docs/conventions.md).

    After every full forward (all layers), `last_reads` (B, Q) holds each query's number of attended
    cached tokens (itself included; 0 for padding) and the peaks are updated. Counts stay on the device.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, groups: torch.Tensor | None = None):
        """groups: (B,) problem index of each sequence (W samples of one problem share one), so that a
        problem's peak is the max over time of its samples' live tokens summed."""
        self.n_layers = n_layers
        self.groups = groups
        self.n_groups = int(groups.max()) + 1 if groups is not None and groups.numel() else 0  # once, not per forward
        self.peak_tokens_per_group: torch.Tensor | None = None
        self.pairs = n_layers * n_kv_heads
        self.last_reads: torch.Tensor | None = None
        self.peak_tokens_per_seq: torch.Tensor | None = None  # (B,) max over time of live tokens
        self.peak_tokens_total: torch.Tensor | None = None  # max over time of live tokens summed over sequences
        self.peak_bytes = 0
        self._reads = None
        self._live = None
        self.trace = False  # keep every forward's reads and live tokens per sequence (a sweep's shorter L, fewer W)
        self.read_trace: list[torch.Tensor] = []  # (B, Q) per forward
        self.live_trace: list[torch.Tensor] = []  # (B,) per forward

    def record(self, layer_idx: int, reads: torch.Tensor, live: torch.Tensor) -> None:
        """reads: (B, Q) integer counts summed over this layer's KV heads; live: (B,) live slots summed over heads."""
        if layer_idx == 0:
            self._reads, self._live = reads, live
        else:
            self._reads = self._reads + reads
            self._live = self._live + live
        if layer_idx == self.n_layers - 1:
            self.last_reads = self._reads.to(torch.float64) / self.pairs
            self.note_live(self._live.to(torch.float64) / self.pairs, self.last_reads)

    def note_live(self, live_now: torch.Tensor, reads: torch.Tensor) -> None:
        """live_now: (B,) live tokens per sequence, averaged over (layer, KV head): the peaks follow it; reads:
        (B, Q) the forward's reads, kept with it when tracing."""
        if self.trace:
            self.read_trace.append(reads)
            self.live_trace.append(live_now)
        if self.peak_tokens_per_seq is None:
            self.peak_tokens_per_seq, self.peak_tokens_total = live_now, live_now.sum()
        else:
            self.peak_tokens_per_seq = torch.maximum(self.peak_tokens_per_seq, live_now)
            self.peak_tokens_total = torch.maximum(self.peak_tokens_total, live_now.sum())
        if self.groups is not None:
            per_group = torch.zeros(self.n_groups, dtype=live_now.dtype, device=live_now.device)
            per_group.index_add_(0, self.groups.to(live_now.device), live_now)
            self.peak_tokens_per_group = per_group if self.peak_tokens_per_group is None else torch.maximum(self.peak_tokens_per_group, per_group)

    def fresh(self, groups: torch.Tensor | None = None) -> "Accounting":
        """Empty counters for the same model (a reset cache, or a batch whose rows changed)."""
        return Accounting(self.n_layers, self.pairs // self.n_layers, groups)

    def repeated(self, times: int) -> "Accounting":
        """These counters after each sequence became `times` consecutive ones (one problem each: its samples);
        the peaks so far are the samples' together, the reads so far stay with the first."""
        rows = self.peak_tokens_per_seq.shape[0]
        out = Accounting(self.n_layers, self.pairs // self.n_layers, torch.arange(rows * times, device=self.peak_tokens_per_seq.device) // times)
        out.peak_tokens_per_seq = self.peak_tokens_per_seq.repeat_interleave(times)
        out.peak_tokens_total = self.peak_tokens_total * times
        out.peak_tokens_per_group = self.peak_tokens_per_seq * times
        out.peak_bytes = self.peak_bytes
        out.last_reads = self.last_reads.repeat_interleave(times, 0)
        return out

    def note_bytes(self, allocated: int) -> None:
        self.peak_bytes = max(self.peak_bytes, allocated)


class Ledger:
    """What a cache allocates, per layer, in integers the cache keeps on the host as it grows, compacts,
    takes and appends rows: read at any time without waiting for the device.

    A layer gives every (sequence, KV head) row the same capacity, that of its fullest row, so its slot
    metadata (and its keys and values when contiguous) take rows x capacity slots whatever each row holds;
    `live_upper` bounds the fullest row's live slots. A paged layer's keys and values take `kv_slots`: the
    blocks of its storage, which follow each row's own live tokens.
    """

    def __init__(self, n_layers: int, kv_heads: int = 1):
        self.kv_heads = kv_heads
        self.rows = [0] * n_layers  # sequences
        self.capacity = [0] * n_layers  # slots per (sequence, KV head)
        self.live_upper = [0] * n_layers
        self.bytes = [0] * n_layers  # keys, values, slot and row metadata, the policy's state
        self.kv_slots = [0] * n_layers  # key/value token slots allocated, over sequences and KV heads

    def note(self, layer_idx: int, rows: int, capacity: int, live_upper: int, nbytes: int, kv_slots: int | None = None) -> None:
        """kv_slots: the layer's key/value slots (None: contiguous, rows x KV heads x capacity)."""
        self.rows[layer_idx], self.capacity[layer_idx] = rows, capacity
        self.live_upper[layer_idx], self.bytes[layer_idx] = live_upper, nbytes
        self.kv_slots[layer_idx] = rows * self.kv_heads * capacity if kv_slots is None else kv_slots

    @property
    def allocated_bytes(self) -> int:
        return sum(self.bytes)

    @property
    def allocated_slots(self) -> float:
        """Key/value slots allocated per (layer, KV head), summed over sequences: the unit of live tokens, so that
        1 - live / allocated is the share allocated for no live token (contiguous: each row as long as its layer's
        longest; paged: the blocks in storage, each holding `block` tokens)."""
        return sum(self.kv_slots) / (len(self.kv_slots) * self.kv_heads)


@dataclass(frozen=True)
class Footprint:
    """What one sequence of a cache costs, in bytes over every layer and KV head: the prices a memory budget
    is counted in (`kvshrink.cache.footprint` reads them off a cache's tensors). A contiguous cache keeps keys
    and values in its slots (`token` 0); a paged one keeps them in blocks of `block` tokens held per
    (sequence, KV head), beside a block table (and one reused read buffer, for a policy that gathers what it reads)."""

    slot: int  # a slot of capacity: slot metadata and the policy's per-slot state (keys and values too, contiguous)
    row: int = 0  # the sequence itself: row metadata and the policy's per-row state
    token: int = 0  # a key/value token held in a block (paged): its keys and values in every layer
    block: int = 1  # tokens per block (paged)
    table: int = 0  # a block of capacity: its block table entries (paged)
    gather: int = 0  # a held token's share of the read buffer a read-selection policy gathers into (Quest)

    def capacity_bytes(self, slots: int) -> int:
        """Bytes `slots` slots of capacity (a multiple of the block) cost one sequence."""
        return slots * self.slot + slots // self.block * self.table

    def held_bytes(self, tokens: int) -> int:
        """Bytes a sequence's `tokens` kept key/value tokens cost, rounded up to whole blocks (paged; 0 contiguous)."""
        return -(-tokens // self.block) * self.block * (self.token + self.gather)

    @property
    def live_token(self) -> int:
        """Bytes a live token needs: its slot, and its keys and values wherever they are."""
        return self.slot + self.token
