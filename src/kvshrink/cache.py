"""KVCache: a slot store in which every (sequence, KV head) keeps its own set of live tokens.

Layout per layer (nothing is ever masked-and-kept: an evicted token's slot is free and reused):
    keys, values  (B, Hkv, S, D)   post-RoPE keys at absolute positions, so attention is order-free
    live          (B, Hkv, S) bool  slot holds a token that may still be attended
    bias          (B, Hkv, S)       0 where live, -inf where free: decode's attention mask, kept current
    pos           (B, Hkv, S) int32 position of the token in the slot (step index, padding included)
    flag          (B, Hkv, S) bool  marked for delayed eviction (DMS)
S, the capacity, grows by `chunk` slots only when some row has every slot taken, and shrinks back
(live slots moved to the front) after a multi-token forward, whose tokens are all stored before the
window thins them.

Attention is read here too, next to the layout (gpt-fast/nano-vllm style): queries are grouped per KV
head, (B, H, Q, D) -> (B, Hkv, G*Q, D), so one SDPA call reads each KV row once, with no repeat_kv.
Decode (Q = 1) passes a (B, Hkv, 1, S) additive mask (0 live, -inf free) that broadcasts over the
group; a multi-token forward (prefill chunk, new user turn) passes a (B, Hkv, G*Q, S) boolean mask.

The cache also drives the one accounting layer (`kvshrink.accounting`) that every policy is measured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .accounting import Accounting
from .errors import KVShrinkError
from .policies.base import CachePolicy, sink_slots

DEFAULT_CHUNK = 64


class SlotLayer(CacheLayerMixin):
    """One layer of a `KVCache` (see the module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "KVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.seen = 0  # tokens written so far, padding included: the position of the next token
        self.live_upper = 0  # host-side upper bound on the fullest row, so capacity checks rarely sync
        self.compact_pending = False  # the last write was multi-token: shrink once its evictions are known

    # -- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.bias = key_states.new_zeros(B, H, 0)  # additive attention bias: 0 live, -inf free
        self.live = torch.zeros(B, H, 0, dtype=torch.bool, device=key_states.device)
        self.flag = torch.zeros_like(self.live)
        self.pos = torch.zeros(B, H, 0, dtype=torch.int32, device=key_states.device)
        self.last_slot = torch.zeros(B, H, dtype=torch.long, device=key_states.device)
        for name in self.cache.policy.slot_fields:  # policy state per slot (e.g. attention scores)
            setattr(self, name, torch.zeros(B, H, 0, dtype=torch.float32, device=key_states.device))
        self.real = torch.zeros(B, dtype=torch.long, device=key_states.device)  # real tokens written per sequence
        self.first_pos = torch.full((B,), -1, dtype=torch.int32, device=key_states.device)  # first real token
        self.cache.policy.init_layer(self, key_states)
        self.is_initialized = True
        if self.cache.reserve:
            self._grow(self.cache.reserve)

    def _slot_tensors(self) -> tuple[str, ...]:
        return ("keys", "values", "bias", "live", "flag", "pos", *self.cache.policy.slot_fields)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name).nbytes for name in (*self._slot_tensors(), *self.cache.policy.layer_fields))

    def _grow(self, need: int) -> None:
        extra = self._round(need) - self.capacity
        for name in self._slot_tensors():
            t = getattr(self, name)
            fill = float("-inf") if name == "bias" else 0
            setattr(self, name, torch.cat([t, t.new_full((*t.shape[:2], extra, *t.shape[3:]), fill)], dim=2))
        self.cache.accounting.note_bytes(self.cache.allocated_bytes())

    def _round(self, n: int) -> int:
        return -(-n // self.cache.chunk) * self.cache.chunk

    def _compact(self, need: int) -> None:
        """Move live slots (and the last token's, which a later decision may still flag) to the front and
        shrink the capacity to `need` rounded up to a chunk. Runs after multi-token writes, whose
        tokens are all stored before the window thins them."""
        keep = self.live.clone()
        keep.scatter_(2, self.last_slot[..., None], True)
        new_cap = self._round(max(need, int(keep.sum(-1).max())))
        if new_cap >= self.capacity:
            return
        order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices
        inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        self.last_slot = inverse.gather(-1, self.last_slot[..., None]).squeeze(-1)
        idx = order[..., :new_cap]
        for name in self._slot_tensors():
            t = getattr(self, name)
            i = idx if t.dim() == 3 else idx[..., None].expand(-1, -1, -1, t.shape[-1])
            setattr(self, name, t.gather(2, i))
        self.cache.policy.on_compact(self, inverse)
        self.live_upper = int(self.live.sum(-1).max())

    def _allocate(self, n: int) -> torch.Tensor:
        """n free slots per row, lowest index first -> (B, Hkv, n)."""
        if self.live_upper + n > self.capacity:
            self.live_upper = int(self.live.sum(-1).max()) if self.capacity else 0
            if self.live_upper + n > self.capacity:
                self._grow(self.live_upper + n)
        self.live_upper += n
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

    def attend_rows(self, q: torch.Tensor, slots: torch.Tensor, readable: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of q (B, Hkv, G, D) over just the (B, Hkv, n) `slots` (entries not `readable` masked),
        so that a step reads n slots instead of S. The keys are copied out (one row copy per slot) for
        one batched product; the values are never copied: `embedding_bag` sums each query head's chosen
        rows in place with its attention weights (on CPUs the copy cost about as much as the read;
        benchmarks/quest_kernels.py)."""
        B, H, S, _ = self.keys.shape
        G, n = q.shape[2], slots.shape[-1]
        rows = torch.arange(B * H, device=slots.device).view(B, H, 1) * S + slots  # rows of the flat (B*H*S, D) storage
        keys = self._pick_rows(self.keys, rows.flatten()).view(B, H, n, -1)
        bias = torch.zeros(slots.shape, dtype=q.dtype, device=q.device).masked_fill(~readable, float("-inf"))
        probs = torch.softmax(((q @ keys.mT) * scaling + bias[:, :, None, :]).float(), dim=-1)  # (B, Hkv, G, n)
        per_head = rows[:, :, None, :].expand(B, H, G, n).reshape(-1)
        values = self.values.reshape(B * H * S, -1)
        out = F.embedding_bag(per_head, values, torch.arange(0, per_head.numel(), n, device=q.device), mode="sum",
                              per_sample_weights=probs.reshape(-1).to(values.dtype))
        return out.view(B, H, G, -1)

    def _pick_rows(self, storage: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the flattened (B * Hkv * S, D) storage: one row copy per slot, far faster than an
        element-wise gather. Outside autograd they land in the cache's reusable buffer (layers run one
        at a time), so that decode does not allocate and fault in fresh pages every step."""
        flat = storage.reshape(-1, storage.shape[-1])
        if torch.is_grad_enabled():
            return flat.index_select(0, rows)
        out = self.cache.scratch(rows.numel() * flat.shape[1], flat).view(rows.numel(), flat.shape[1])
        return torch.index_select(flat, 0, rows, out=out)

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
        for name in policy.slot_fields:
            getattr(self, name).scatter_(2, slots, 0.0)
        starts = valid.any(-1) & (self.first_pos < 0)
        self.first_pos = torch.where(starts, t0 + valid.int().argmax(-1).int(), self.first_pos)
        self.real += valid.sum(-1)
        self.keys.scatter_(2, slots[..., None].expand(-1, -1, -1, k.shape[-1]), k)
        self.values.scatter_(2, slots[..., None].expand(-1, -1, -1, v.shape[-1]), v)
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

    # -- rows joining and leaving (continuous batching) ---------------------------------------------
    ROW_FIELDS = ("last_slot", "real", "first_pos")  # per-sequence state besides the slot tensors

    def take_rows(self, rows: torch.Tensor) -> None:
        """Keep only sequences `rows` (a finished sequence leaves; its slots go with it)."""
        for name in (*self._slot_tensors(), *self.ROW_FIELDS, *self.cache.policy.layer_fields):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.live_upper = int(self.live.sum(-1).max()) if self.live.numel() else 0

    def append_rows(self, other: "SlotLayer") -> None:
        """Add `other`'s sequences after ours. Positions in `pos` only matter relative to `seen` (expiry,
        sinks), so the side that has seen fewer tokens is shifted forward to a common `seen`."""
        if other.cache.policy.slot_fields != self.cache.policy.slot_fields or self.cache.policy.layer_fields:
            raise KVShrinkError("these sequences cannot share a batch: their cache policies keep different state")
        seen = max(self.seen, other.seen)
        for layer in (self, other):
            shift = seen - layer.seen
            layer.pos += shift
            layer.first_pos = torch.where(layer.first_pos >= 0, layer.first_pos + shift, layer.first_pos)
        cap = max(self.capacity, other.capacity)
        for layer in (self, other):
            if layer.capacity < cap:
                layer._grow(cap)
        for name in (*self._slot_tensors(), *self.ROW_FIELDS):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)], 0))
        self.seen = seen
        self.live_upper = max(self.live_upper, other.live_upper)
        self.compact_pending = self.compact_pending or other.compact_pending
        self.cache.accounting.note_bytes(self.cache.allocated_bytes())

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
    """

    def __init__(self, model, policy: CachePolicy | None = None, reserve: int = 0, chunk: int = DEFAULT_CHUNK):
        config = getattr(model, "config", model)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.policy = policy or CachePolicy()
        self.reserve, self.chunk = reserve, chunk
        self._scratch: torch.Tensor | None = None  # a per-layer temporary reused across layers and steps
        self.accounting = Accounting(config.num_hidden_layers, config.num_key_value_heads)
        super().__init__(layers=[SlotLayer(self, i) for i in range(config.num_hidden_layers)])

    def reset(self) -> None:
        super().reset()
        self.accounting = self.accounting.fresh(self.accounting.groups)

    def scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat reusable buffer with at least `numel` elements of `like`'s dtype and device."""
        have = self._scratch
        if have is None or have.numel() < numel or have.dtype != like.dtype or have.device != like.device:
            have = self._scratch = like.new_empty(numel)
        return have[:numel]

    def allocated_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

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
        selected = policy.select(layer, qg, valid) if Q == 1 else None
        if selected is not None:  # a read-selection policy (Quest): read only the chosen slots
            slots, readable, extra_reads = selected
            reads = readable.sum(-1).sum(1, keepdim=True) + extra_reads[:, None]
        elif Q == 1:
            reads = layer.live.sum(-1).sum(1, keepdim=True)  # (B, 1): every live slot is read
        else:
            reads = mask.sum(-1).sum(1)  # (B, Q) visible slots per query, over KV heads
        self.accounting.record(layer_idx, reads * valid, layer.live.sum((1, 2)))
        if Q > 1:
            mask = mask[:, :, None].expand(B, Hkv, G, Q, mask.shape[-1]).reshape(B, Hkv, G * Q, -1)
        if selected is not None:
            out = layer.attend_rows(qg, slots, readable, scaling)
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
        """Free now what the next write would free: a prompt read in long chunks holds the tokens that
        expired inside its last chunk until then (e.g. before its row is copied for n samples)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.free_expired()

    def live_tokens(self) -> torch.Tensor:
        """(L, B, Hkv) live tokens per layer, sequence and KV head."""
        return torch.stack([layer.live.sum(-1) for layer in self.layers])

    def row_live_tokens(self) -> list[float]:
        """Live tokens of each sequence (row order), averaged over (layer, KV head); [] when empty."""
        return self.live_tokens().float().mean((0, 2)).tolist() if self.batch_size else []

    @property
    def batch_size(self) -> int:
        layer = self.layers[0]
        return layer.keys.shape[0] if layer.is_initialized else 0

    def take_rows(self, rows: list[int]) -> None:
        """Keep only these sequences, in this order (the others leave and free their memory)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.layers[0].keys.device)
        for layer in self.layers:
            layer.take_rows(index)
        self.accounting = self.accounting.fresh()  # rows changed: per-row counters start over

    def append_rows(self, other: "KVCache") -> None:
        """Add the sequences of `other` (e.g. a request prefilled alone) to this batch."""
        if not self.layers[0].is_initialized:
            self.layers = other.layers
            for layer in self.layers:
                layer.cache = self
        else:
            for mine, theirs in zip(self.layers, other.layers):
                mine.append_rows(theirs)
        self.accounting = self.accounting.fresh()  # rows changed: per-row counters start over
