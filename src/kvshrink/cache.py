"""KVCache: a slot store in which every (sequence, KV head) keeps its own set of live tokens.

Layout per layer (nothing is ever masked-and-kept: an evicted token's slot is free and reused):
    keys, values  (B, Hkv, S, D)   post-RoPE keys at absolute positions, so attention is order-free
    live          (B, Hkv, S) bool  slot holds a token that may still be attended
    bias          (B, Hkv, S)       0 where live, -inf where free: decode's attention mask, kept current
    pos           (B, Hkv, S) int32 position of the token in the slot (step index, padding included)
    flag          (B, Hkv, S) bool  marked for delayed eviction (DMS)
    last_slot     (B, Hkv) long     the slot of the last token written (a later DMS decision may flag it)
    real          (B,) long         real tokens written per sequence; first_pos (B,) int32 the first one's position
and the policy's own tensors (`layer.state`). All are declared by kind (`kvshrink.policies.state`), so rows are
taken, appended, grown, compacted and counted in bytes the same way whatever the policy keeps.
S, the capacity, grows by `chunk` slots only when some row has every slot taken, and shrinks back
(live slots moved to the front) after a multi-token forward, whose tokens are all stored before the
window thins them.

Attention is read here too, next to the layout (gpt-fast/nano-vllm style): queries are grouped per KV
head, (B, H, Q, D) -> (B, Hkv, G*Q, D), so one SDPA call reads each KV row once, with no repeat_kv.
Decode (Q = 1) passes a (B, Hkv, 1, S) additive mask (0 live, -inf free) that broadcasts over the
group; a multi-token forward (prefill chunk, new user turn) passes a (B, Hkv, G*Q, S) boolean mask.

The cache also drives the one accounting layer (`kvshrink.accounting`) that every policy is measured with,
and keeps its `Ledger` of what each layer allocates, in host-side integers.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .accounting import Accounting, Footprint, Ledger
from .blocks import DEFAULT_BLOCK, PagedKV, attend_blocks
from .errors import KVShrinkError
from .policies import state as declared
from .policies.base import CachePolicy, sink_slots
from .policies.state import ROW, SLOT, Kind, PolicyState
from .shapes import kv_head_dim

DEFAULT_CHUNK = 64


class SlotLayer(CacheLayerMixin):
    """One layer of a `KVCache` (see the module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    # its own tensors (see the module docstring), declared as a policy declares its state
    LAYOUT: ClassVar[dict[str, Kind]] = {
        "keys": Kind(SLOT), "values": Kind(SLOT), "bias": Kind(SLOT, float("-inf")), "live": Kind(SLOT), "flag": Kind(SLOT),
        "pos": Kind(SLOT), "last_slot": Kind(ROW, slot_index=True), "real": Kind(ROW), "first_pos": Kind(ROW, -1)}
    # a paged layer keeps keys and values in blocks (`kv`), the rest in the layout above
    PAGED_LAYOUT: ClassVar[dict[str, Kind]] = {k: v for k, v in LAYOUT.items() if k not in ("keys", "values")}

    @property
    def cache(self) -> "KVCache":
        return self._owner()

    @cache.setter
    def cache(self, owner: "KVCache") -> None:
        """A weak reference: a strong one would make every cache a reference cycle, whose gigabytes of tensors wait
        for the garbage collector instead of going when the last batch using them ends."""
        self._owner = weakref.ref(owner)

    def __init__(self, cache: "KVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.state = PolicyState()  # the policy's tensors, made with the layer's first keys
        self.seen = 0  # tokens written so far, padding included: the position of the next token
        self.live_upper = 0  # host-side upper bound on the fullest row, so capacity checks rarely sync
        self.compact_pending = False  # the last write was multi-token: shrink once its evictions are known
        self.kv: PagedKV | None = None  # keys and values in blocks, when the cache is paged

    # -- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        device = key_states.device
        if self.cache.paged:
            self.kv = PagedKV(B, H, D, value_states.shape[-1], key_states.dtype, device, block=self.cache.block)
        else:
            self.keys = key_states.new_zeros(B, H, 0, D)
            self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.bias = key_states.new_zeros(B, H, 0)  # additive attention bias: 0 live, -inf free
        self.live = torch.zeros(B, H, 0, dtype=torch.bool, device=device)
        self.flag = torch.zeros_like(self.live)
        self.pos = torch.zeros(B, H, 0, dtype=torch.int32, device=device)
        self.last_slot = torch.zeros(B, H, dtype=torch.long, device=device)
        self.real = torch.zeros(B, dtype=torch.long, device=device)
        self.first_pos = torch.full((B,), -1, dtype=torch.int32, device=device)
        self.state = self.cache.policy.new_state(key_states)
        self.is_initialized = True
        self._grow(self.cache.reserve)  # the slots preallocated, if any; and the ledger learns of the layer

    def _declared(self):
        """(holder, {name: Kind}) of everything the layer allocates: its own layout, then the policy's state."""
        return (self, self.LAYOUT if self.kv is None else self.PAGED_LAYOUT), (self.state, self.state.kinds)

    @property
    def capacity(self) -> int:
        return self.live.shape[2]

    @property
    def rows(self) -> int:
        return self.live.shape[0]

    @property
    def nbytes(self) -> int:
        """What the layer allocates: keys, values, slot and row metadata, the policy's state."""
        if not self.is_initialized:
            return 0
        return sum(declared.nbytes(holder, kinds) for holder, kinds in self._declared()) + (self.kv.nbytes if self.kv else 0)

    @property
    def slot_bytes(self) -> int:
        """Bytes each slot of capacity costs one sequence, over its KV heads (layout and policy state)."""
        return sum(declared.slot_bytes(holder, kinds) for holder, kinds in self._declared())

    def _note(self) -> None:
        """Tell the cache's ledger (and the accounting's peak) this layer's allocation: after every change of shape."""
        kv_slots = self.kv.pool.total * self.kv.block if self.kv is not None else None  # None: rows x heads x capacity
        self.cache.ledger.note(self.layer_idx, self.rows, self.capacity, self.live_upper, self.nbytes, kv_slots)
        self.cache.accounting.note_bytes(self.cache.allocated_bytes())

    def _grow(self, need: int) -> None:
        extra = self._round(need) - self.capacity
        for holder, kinds in self._declared():
            declared.grow(holder, kinds, extra)
        if self.kv is not None:
            self.kv.resize(self.capacity)
        self._note()

    def grow_state(self, names: tuple[str, ...], dim: int, n: int) -> None:
        """Add n entries of their fill along `dim` to the policy's per-row tensors `names` (Quest's pages, as
        positions reach a new page)."""
        if n <= 0:
            return
        for name in names:
            setattr(self.state, name, declared.pad(getattr(self.state, name), dim, n, self.state.kinds[name].fill))
        self._note()

    def _round(self, n: int) -> int:
        return -(-n // self.cache.chunk) * self.cache.chunk

    def _compact(self, need: int) -> None:
        """Move live slots (and the last token's, which a later decision may still flag) to the front and
        shrink the capacity to `need` rounded up to a chunk. Runs after multi-token writes, whose
        tokens are all stored before the window thins them, and when rows leave."""
        keep = self.live.clone()
        keep.scatter_(2, self.last_slot[..., None], True)
        new_cap = self._round(max(need, int(keep.sum(-1).max())))
        if new_cap >= self.capacity:
            if self.kv is None:
                return
            new_cap = self.capacity  # the capacity stays, but each row's live slots pack into as few blocks as they fill
        order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices
        inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        if self.kv is not None:
            self.kv.compact(order[..., :new_cap], keep.gather(2, order[..., :new_cap]))
        for holder, kinds in self._declared():
            declared.compact(holder, kinds, order[..., :new_cap], inverse)
        self.live_upper = int(self.live.sum(-1).max())
        self._note()

    def _allocate(self, n: int) -> torch.Tensor:
        """n free slots per row, lowest index first -> (B, Hkv, n)."""
        if self.live_upper + n > self.capacity:
            self.live_upper = int(self.live.sum(-1).max()) if self.capacity else 0
            if self.live_upper + n > self.capacity:
                self._grow(self.live_upper + n)
        self.live_upper += n
        self.cache.ledger.live_upper[self.layer_idx] = self.live_upper
        if n == 1:
            return self.bias.argmin(-1, keepdim=True)  # the first free slot (-inf)
        return torch.sort(self.live.to(torch.uint8), dim=-1, stable=True).indices[..., :n]

    def _unflag_sinks(self) -> None:
        """A sequence's first `policy.sinks` real tokens are never evicted: their flags read "keep". Runs
        only where decisions were written (DMS), not for every policy that has sinks."""
        if self.cache.policy.sinks:
            self.flag &= ~sink_slots(self, self.cache.policy.sinks)

    def _free(self, gone: torch.Tensor) -> None:
        self.live.masked_fill_(gone, False)
        self.bias.masked_fill_(gone, float("-inf"))
        if self.kv is not None:
            self.kv.release_empty(self.live)  # a block whose last token went is free for any row

    def _store(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values of new tokens into their slots (B, Hkv, Q)."""
        if self.kv is None:
            self.keys.scatter_(2, slots[..., None].expand(-1, -1, -1, k.shape[-1]), k)
            self.values.scatter_(2, slots[..., None].expand(-1, -1, -1, v.shape[-1]), v)
            return
        blocks = self.kv.pool.total
        self.kv.write(slots, k, v)
        if self.kv.pool.total != blocks:  # the storage grew: the ledger and the peak learn of it
            self._note()

    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as flat (rows, D) tensors, whose rows `rows_of` names (read kernels index them)."""
        if self.kv is not None:
            return self.kv.storage()
        return self.keys.view(-1, self.keys.shape[-1]), self.values.view(-1, self.values.shape[-1])

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of `storage()` holding the slots (B, Hkv, n) of each (sequence, KV head)."""
        if self.kv is not None:
            return self.kv.rows_of(slots)
        B, H, S = self.live.shape
        return torch.arange(B * H, device=slots.device).view(B, H, 1) * S + slots

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, S, D) keys and values in slot order (a copy when paged; zeros where no block is held)."""
        return self.kv.dense() if self.kv is not None else (self.keys, self.values)

    def free_expired(self) -> None:
        """Free the slots the policy says are gone for the next query. Runs before each write; tokens that
        expire inside a multi-token forward are only hidden until then."""
        gone = self.cache.policy.expired(self, self.seen)
        if gone is not None:
            self._free(gone)

    def enforce_budget(self, budget: torch.Tensor, scores: torch.Tensor, added: int) -> None:
        """Free the lowest-scoring live slots of each row until it holds at most budget[b] tokens. Rows
        were within budget before this forward's `added` tokens and budgets never shrink, so at most
        `added` go per row: a bound known on the host, so the device is never waited for."""
        excess = (self.live.sum(-1) - budget[:, None]).clamp(min=0)  # (B, Hkv)
        k = min(added, self.capacity)
        lowest = scores.masked_fill(~self.live, float("inf")).topk(k, dim=-1, largest=False).indices
        drop = torch.arange(k, device=lowest.device) < excess[..., None]
        self._free(torch.zeros_like(self.live).scatter_(-1, lowest, drop))

    # -- the write + visibility rule ----------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, decisions: torch.Tensor | None) -> torch.Tensor:
        """Store Q new tokens and return the attention mask for their queries.

        k, v: (B, Hkv, Q, D); valid: (B, Q) bool (False = padding, never live);
        decisions: (B, Hkv, Q) bool, decision at each new position (marks the token before it), or None.
        Only real tokens decide: a padding token never flags its predecessor.
        """
        policy = self.cache.policy
        B, H, Q, _ = k.shape
        t0 = self.seen
        if decisions is not None:
            decisions = decisions & valid[:, None, :]
            if t0 > 0:  # the first new decision marks the previous forward's last token
                self.flag.scatter_(2, self.last_slot[..., None], decisions[..., :1])
                self._unflag_sinks()

        self.free_expired()
        if self.compact_pending:
            self._compact(int(self.live.sum(-1).max()) + Q)
        self.compact_pending = Q > 1

        slots = self._allocate(Q)
        declared.clear(self.state, self.state.kinds, slots)
        starts = valid.any(-1) & (self.first_pos < 0)
        self.first_pos = torch.where(starts, t0 + valid.int().argmax(-1).int(), self.first_pos)
        self.real += valid.sum(-1)
        self._store(slots, k, v)
        live_new = valid[:, None, :].expand(B, H, Q)
        self.live.scatter_(2, slots, live_new)
        self.bias.scatter_(2, slots, torch.zeros((), dtype=self.bias.dtype, device=k.device).masked_fill(~live_new, float("-inf")))
        self.last_slot = slots[..., -1]
        self.seen += Q

        if Q == 1:  # every live slot is visible: expiry already ran for this query
            self.pos.scatter_(2, slots, torch.full_like(slots, t0, dtype=torch.int32))
            self.flag.scatter_(2, slots, torch.zeros_like(slots, dtype=torch.bool))  # the new token's flag is pending
            policy.on_write(self, k, slots, valid)
            return self.bias[:, :, None, :]

        qpos = torch.arange(t0, t0 + Q, device=k.device, dtype=torch.int32)
        self.pos.scatter_(2, slots, qpos.expand(B, H, Q))
        new_flags = torch.zeros(B, H, Q, dtype=torch.bool, device=k.device)
        if decisions is not None:
            new_flags[..., :-1] = decisions[..., 1:]
        self.flag.scatter_(2, slots, new_flags)
        if decisions is not None:
            self._unflag_sinks()
        visible = self.live[:, :, None, :] & (self.pos[:, :, None, :] <= qpos[None, None, :, None])
        hidden = policy.hidden(self, qpos)
        if hidden is not None:
            visible &= ~hidden
        policy.on_write(self, k, slots, valid)
        # a query always sees its own slot, so padded rows stay finite (their output is discarded;
        # a NaN there would poison every later read of its slot through 0 * NaN)
        return visible.scatter_(3, slots[..., None], True)

    # -- rows joining and leaving (continuous batching), tokens loaded from elsewhere ----------------------
    def take_rows(self, rows: torch.Tensor) -> None:
        """Keep only sequences `rows` (a finished sequence leaves; its slots go with it, and the capacity
        follows the longest row left)."""
        for holder, kinds in self._declared():
            declared.take(holder, kinds, rows)
        if self.kv is not None:
            self.kv.take_rows(rows)
        self.live_upper = int(self.live.sum(-1).max()) if self.live.numel() else 0
        if self.live.numel():
            self._compact(0)
        self._note()

    def append_rows(self, other: "SlotLayer") -> None:
        """Add `other`'s sequences after ours. Positions in `pos` only matter relative to `seen` (expiry,
        sinks), so the side that has seen fewer tokens is shifted forward to a common `seen`."""
        if other.cache.policy.describe() != self.cache.policy.describe():
            raise KVShrinkError("these sequences cannot share a batch: their caches run different policies; give them the same one")
        if (other.cache.paged, other.cache.block) != (self.cache.paged, self.cache.block):
            raise KVShrinkError("these sequences cannot share a batch: one cache is paged, the other not (or their blocks "
                                "differ); make both with the same paged= and block=")
        seen = max(self.seen, other.seen)
        for layer in (self, other):
            shift = seen - layer.seen
            layer.pos += shift
            layer.first_pos = torch.where(layer.first_pos >= 0, layer.first_pos + shift, layer.first_pos)
        for (mine, kinds), (theirs, _) in zip(self._declared(), other._declared()):
            declared.append(mine, theirs, kinds)  # the smaller capacity grows to the larger, with free slots
        if self.kv is not None:
            self.kv.append_rows(other.kv)
        self.seen = seen
        self.live_upper = max(self.live_upper, other.live_upper)
        self.compact_pending = self.compact_pending or other.compact_pending
        self._note()

    def load_tokens(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, live: torch.Tensor | None = None,
                    flags: torch.Tensor | None = None) -> None:
        """Hold these tokens as a prefill of them would leave this (empty) layer. keys, values: (B, Hkv, T, D),
        post-RoPE; positions: (T,) increasing, the next token's is positions[-1] + 1; live: (Hkv, T) slots kept
        (None: all); flags: (Hkv, T) DMS flags still pending. Every row alike. A policy whose state cannot be
        rebuilt from keys and values is refused."""
        self.lazy_initialization(keys[:, :, :0], values[:, :, :0])
        if self.state:
            raise KVShrinkError(f"policy {self.cache.policy.name!r} keeps per-token state ({', '.join(self.state.kinds)}) that "
                                "stored keys and values do not hold; restore with policy 'none', 'dms' or 'window'")
        (B, H, T, _), device = keys.shape, self.live.device
        live = torch.ones(H, T, dtype=torch.bool, device=device) if live is None else live.to(device, torch.bool)
        self._grow(T)
        self._store(torch.arange(T, device=device).expand(B, H, T), keys, values)
        self.live[:, :, :T] = live
        self.bias[:, :, :T] = torch.zeros_like(self.bias[0, :, :T]).masked_fill(~live, float("-inf"))
        self.pos[:, :, :T] = positions.to(self.pos)
        if flags is not None:
            self.flag[:, :, :T] = flags.to(device, torch.bool) & live
        self.last_slot.fill_(T - 1)  # the next token's DMS decision flags the last one
        self.seen = int(positions[-1]) + 1
        self.real.fill_(self.seen)
        self.first_pos.fill_(0)
        self.live_upper = int(live.sum(-1).max())
        self.compact_pending = True  # as after a prefill: the next write moves live slots to the front
        if self.kv is not None:
            self.kv.release_empty(self.live)
        self._note()

    # -- transformers Cache API --------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        raise KVShrinkError(
            "KVCache is read by kvshrink's attention; load the model with kvshrink.load() or call "
            "kvshrink.install(model) first"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # transformers < 5.15

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)

    def reorder_cache(self, beam_idx):
        raise KVShrinkError("beam search is not supported with KVCache; use greedy or sampling")

    def crop(self, *args, **kwargs):
        raise KVShrinkError("KVCache cannot be cropped (assisted decoding is not supported)")


class KVCache(Cache):
    """A transformers `Cache` whose memory follows the policy: evicted tokens free their slots.

    Works with `model.generate(..., past_key_values=KVCache(model, policy))` and with a plain forward
    loop, on models prepared by `kvshrink.install` (done by `kvshrink.load`).
    reserve: slots preallocated per row (a dense preallocated cache when the policy keeps everything).
    paged: keys and values in blocks of `block` tokens held per (sequence, KV head) (`kvshrink.blocks`), so memory
    follows each row's own live tokens; None: paged when the policy frees memory, contiguous otherwise.
    """

    def __init__(self, model, policy: CachePolicy | None = None, reserve: int = 0, chunk: int = DEFAULT_CHUNK,
                 paged: bool | None = None, block: int = DEFAULT_BLOCK):
        config = text_config(model)
        self.policy = policy or CachePolicy()
        self.reserve, self.chunk = reserve, chunk
        self.paged = self.policy.frees_memory if paged is None else paged
        self.block = block
        if self.paged and (block < 1 or chunk % block):
            raise KVShrinkError(f"block={block} must divide the cache's growth chunk {chunk}; e.g. block=16")
        self._scratch: torch.Tensor | None = None  # a per-layer temporary reused across layers and steps
        self.accounting = Accounting(config.num_hidden_layers, config.num_key_value_heads)
        self.ledger = Ledger(config.num_hidden_layers, config.num_key_value_heads)
        super().__init__(layers=[SlotLayer(self, i) for i in range(config.num_hidden_layers)])

    def reset(self) -> None:
        super().reset()
        self.accounting = self.accounting.fresh(self.accounting.groups)
        self.ledger = Ledger(len(self.layers), self.ledger.kv_heads)

    def scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat reusable buffer with at least `numel` elements of `like`'s dtype and device."""
        have = self._scratch
        if have is None or have.numel() < numel or have.dtype != like.dtype or have.device != like.device:
            have = self._scratch = like.new_empty(numel)
            self.accounting.note_bytes(self.allocated_bytes())
        return have[:numel]

    @property
    def scratch_bytes(self) -> int:
        return self._scratch.nbytes if self._scratch is not None else 0

    def allocated_bytes(self) -> int:
        """What the cache holds: every layer's tensors (blocks and their tables when paged) and the scratch buffer."""
        return self.ledger.allocated_bytes + self.scratch_bytes

    def attend(self, layer_idx: int, q, k, v, scaling: float, valid: torch.Tensor, decisions=None) -> torch.Tensor:
        """Write this forward's keys/values for one layer and attend over the layer's live slots.

        q: (B, H, Q, D) post-RoPE; k, v: (B, Hkv, Q, D). Returns (B, H, Q, Dv).
        """
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        mask = layer.write(k, v, valid, decisions)
        B, H, Q, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        qg = q.reshape(B, Hkv, G * Q, D)  # heads h = kv * G + g share KV head kv
        policy = self.policy
        picked = policy.attend(layer, qg, scaling) if Q == 1 else None
        if picked is not None:  # a read-selection policy (Quest) read only the slots it chose
            out, reads = picked
        elif Q == 1:
            reads = layer.live.sum(-1).sum(1, keepdim=True)  # (B, 1): every live slot is read
        else:
            reads = mask.sum(-1).sum(1)  # (B, Q) visible slots per query, over KV heads
        self.accounting.record(layer_idx, reads * valid, layer.live.sum((1, 2)))
        if picked is None:  # attend over every visible slot
            if Q > 1:
                mask = mask[:, :, None].expand(B, Hkv, G, Q, mask.shape[-1]).reshape(B, Hkv, G * Q, -1)
            if layer.kv is not None:  # read each row's own blocks, no row padded to the longest
                out, weights = attend_blocks(layer.kv, qg, mask, scaling, weights=policy.needs_attention)
                if policy.needs_attention:
                    probs = layer.kv.per_slot(weights, G * Q)
                    policy.observe(layer, probs.view(B, Hkv, G, Q, -1).mean(2), valid)
            elif policy.needs_attention:  # the weights are the policy's evidence: compute them, then reuse them
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
                probs = torch.softmax(((qg @ layer.keys.transpose(-1, -2)) * scaling + mask).float(), dim=-1)
                out = probs.to(layer.values.dtype) @ layer.values
                policy.observe(layer, probs.view(B, Hkv, G, Q, -1).mean(2), valid)
            else:
                out = F.scaled_dot_product_attention(qg, layer.keys, layer.values, attn_mask=mask, scale=scaling)
        scores = policy.keep_scores(layer)
        if scores is not None:
            layer.enforce_budget(policy.budget(layer), scores, Q)
        return out.reshape(B, H, Q, -1)  # some GPU kernels return a non-contiguous output

    def free_expired(self) -> None:
        """Free now what the next write would free, and shrink to what is left: a prompt read in long chunks
        holds the tokens that expired inside its last chunk until then (e.g. before its row is copied for n
        samples, or joins a batch whose every row would be sized to it)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.free_expired()
                layer._compact(0)

    def live_tokens(self) -> torch.Tensor:
        """(L, B, Hkv) live tokens per layer, sequence and KV head."""
        return torch.stack([layer.live.sum(-1) for layer in self.layers])

    def row_live_tokens(self) -> list[float]:
        """Live tokens of each sequence (row order), averaged over (layer, KV head); [] when empty."""
        return self.live_tokens().float().mean((0, 2)).tolist() if self.batch_size else []

    @property
    def batch_size(self) -> int:
        layer = self.layers[0]
        return layer.rows if layer.is_initialized else 0

    def take_rows(self, rows: list[int]) -> None:
        """Keep only these sequences, in this order (the others leave and free their memory)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.layers[0].live.device)
        for layer in self.layers:
            layer.take_rows(index)
        self._scratch = None  # the read buffer is made again at the size the rows left need
        self.accounting = self.accounting.fresh()  # rows changed: per-row counters start over

    def repeat_rows(self, times: int) -> None:
        """Each sequence becomes `times` consecutive ones holding what it has read (the W samples of a prompt, read
        once); the peaks counted so far become the samples' together (`Accounting.repeated`)."""
        before = self.accounting
        self.take_rows([row for row in range(self.batch_size) for _ in range(times)])
        self.accounting = before.repeated(times)

    def append_rows(self, other: "KVCache") -> None:
        """Add the sequences of `other` (e.g. a request prefilled alone) to this batch."""
        if not self.layers[0].is_initialized:
            self.layers = other.layers
            for layer in self.layers:
                layer.cache = self
                layer._note()
        else:
            for mine, theirs in zip(self.layers, other.layers):
                mine.append_rows(theirs)
        self.accounting = self.accounting.fresh()  # rows changed: per-row counters start over


def footprint(model, policy: CachePolicy | None = None, paged: bool | None = None, block: int = DEFAULT_BLOCK) -> Footprint:
    """What a sequence of a `KVCache(model, policy, paged=paged, block=block)` costs, over every layer and KV head,
    read off an empty one-row cache's tensors: bytes per slot of capacity, per row, and (paged) per key/value
    token held in a block, per block of capacity (its table entries) and, for a policy that gathers what it reads
    (Quest), per held token of the read buffer."""
    cache, config = KVCache(model, policy, paged=paged, block=block), text_config(model)
    empty = next(model.parameters()).new_zeros(1, config.num_key_value_heads, 0, kv_head_dim(config))
    slot = row = token = table = gather = 0
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        slot += layer.slot_bytes
        row += sum(getattr(holder, name).nbytes for holder, kinds in layer._declared() for name, kind in kinds.items() if kind.per == ROW)
        if layer.kv is not None:
            keys, values, heads = layer.kv.keys, layer.kv.values, layer.kv.table.shape[1]
            token += heads * (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size())
            table += heads * layer.kv.table.element_size()
            if type(cache.policy).attend is not CachePolicy.attend:  # a read-selection policy gathers what it reads (Quest)
                gather = max(gather, heads * max(keys.shape[-1] * keys.element_size(), values.shape[-1] * values.element_size()))
    return Footprint(slot, row, token, block if cache.paged else 1, table, gather)


def slot_bytes(model, policy: CachePolicy | None = None) -> int:
    """What one more slot of capacity costs a sequence of a `KVCache` for `model`, over every layer and KV head:
    slot metadata, the policy's per-slot state, and keys and values in the model's dtype when the cache is
    contiguous (a paged cache holds them in blocks: `footprint`)."""
    return footprint(model, policy).slot


def text_config(model):
    """The config of a model's text decoder (a model or its config)."""
    config = getattr(model, "config", model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config
