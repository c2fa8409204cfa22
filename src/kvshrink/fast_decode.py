"""The fixed-shape decode step (gpt-fast style) for the policies that score no tokens: none and DMS.

Why: the slot cache (`kvshrink.cache`) grows, compacts and gathers with shapes that follow the data and asks
the host between ops, so on a GPU a decode step is bound by launches, not by the bytes it reads (H100, 6-layer
model: DMS at 0.64-1.04x of dense, docs/results/decode-cuda.md). Here every tensor keeps its shape for the whole
decode: per layer a pool of blocks preallocated to a budget, a block table (B, Hkv, W) and per-row counts, and
bookkeeping by fixed-shape tensor ops, so a step (every layer) runs with no host sync: compiled on CUDA
(`torch.compile`, one graph reused by every layer) and replayed as one CUDA graph; eager on CPU.

Why the shapes can stay fixed: at decode a DMS token flagged at step s + 1 expires at step s + window + 1, so
each (sequence, KV head) loses at most one token per step, and which one is known: the token written
window + 1 steps ago, kept in a ring of the last window + 1 slots with their flags. The new token takes that
slot when its token expired, else the row's next fresh slot (a new block, from a bump allocator, when it starts
one). A row's written slots are then always [0, top), all live but padding (whose slots are taken again
window + 1 steps later): blocks never empty during decode, memory follows each row's live tokens to within one
block, and attention reads the leading ceil(top / page) blocks (`kernels.paged`), skipping dead slots by the
validity map. A pool too small for what the rows keep sets `overflow` (checked by the caller after the run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache, text_config
from .errors import KVShrinkError
from .kernels.paged import paged_decode
from .policies import CachePolicy, DMSPolicy
from .shapes import decoder_layers

DEFAULT_PAGE = 16


def supports(policy: CachePolicy) -> bool:
    """Whether the fixed-shape step runs `policy`: keep everything, or DMS (no policy state, no token scores)."""
    return type(policy) is CachePolicy or isinstance(policy, DMSPolicy)


@dataclass
class LayerBuffers:
    """One layer's fixed-shape cache."""

    keys: torch.Tensor  # (blocks, page, D) the pool
    values: torch.Tensor  # (blocks, page, Dv)
    valid: torch.Tensor  # (blocks, page) bool: the slot holds a live token
    table: torch.Tensor  # (B, Hkv, W) int32 physical block of each logical block, -1: none
    top: torch.Tensor  # (B, Hkv) int32 slots written: [0, top)
    live: torch.Tensor  # (B, Hkv) int32 live tokens
    used: torch.Tensor  # () int64 blocks handed out; the rest of the pool is free
    ring_slot: torch.Tensor  # (B, Hkv, R) int32 slot of the token of step s at s % R (-1: none), R = window + 1
    ring_flag: torch.Tensor  # (B, Hkv, R) bool that token is flagged (padding is, so its slot comes back)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in vars(self).values())


@dataclass(frozen=True)
class Layout:
    """What every layer's step shares, as Python values (torch.compile specialises on them)."""

    page: int
    sinks: int
    decide: bool  # the policy applies DMS decisions
    splits: int  # split-K programs per (sequence, KV head) in the CUDA kernel


class DecodeState:
    """The fixed-shape cache of a batch: one `LayerBuffers` per layer, the step index of the next token and each
    row's first real position (sinks), and `overflow`, set when a row ran out of table or pool."""

    def __init__(self, model, batch: int, width: int, blocks: list[int], policy: CachePolicy, dtype, device,
                 page: int = DEFAULT_PAGE):
        """width: logical blocks per row; blocks: the pool of each layer, in blocks of `page` tokens."""
        if not supports(policy):
            raise KVShrinkError(f"the fixed-shape decode step runs policies 'none' and DMS, not {policy.name!r}")
        config = text_config(model)
        heads = config.num_key_value_heads
        dim = decoder_layers(model)[0].self_attn.head_dim
        self.policy, self.page = policy, page
        self.window = policy.window if isinstance(policy, DMSPolicy) else 0
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.first_pos = torch.full((batch,), -1, dtype=torch.int32, device=device)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)
        self.layers = [LayerBuffers(
            keys=torch.zeros(n, page, dim, dtype=dtype, device=device),
            values=torch.zeros(n, page, dim, dtype=dtype, device=device),
            valid=torch.zeros(n, page, dtype=torch.bool, device=device),
            table=torch.full((batch, heads, width), -1, dtype=torch.int32, device=device),
            top=torch.zeros(batch, heads, dtype=torch.int32, device=device),
            live=torch.zeros(batch, heads, dtype=torch.int32, device=device),
            used=torch.zeros((), dtype=torch.long, device=device),
            ring_slot=torch.full((batch, heads, self.window + 1), -1, dtype=torch.int32, device=device),
            ring_flag=torch.zeros(batch, heads, self.window + 1, dtype=torch.bool, device=device),
        ) for n in blocks]

    @property
    def nbytes(self) -> int:
        """What the state allocates: pools, tables, counts and rings of every layer."""
        return sum(layer.nbytes for layer in self.layers) + self.first_pos.nbytes

    def live_tokens(self) -> torch.Tensor:
        """(L, B, Hkv) live tokens per layer, sequence and KV head."""
        return torch.stack([layer.live for layer in self.layers])

    def load(self, index: int, keys: torch.Tensor, values: torch.Tensor, live: torch.Tensor, pos: torch.Tensor,
             flag: torch.Tensor) -> None:
        """Hold layer `index`'s tokens: keys, values (B, Hkv, T, D) post-RoPE, in any slot order; live (B, Hkv, T)
        the ones kept; pos (B, Hkv, T) their step indices; flag (B, Hkv, T) flagged, not yet expired at
        `step`. Live tokens are packed to each row's front and given blocks in row order; the last
        window + 1 steps' tokens go into the ring."""
        buf, page = self.layers[index], self.page
        B, H, _ = live.shape
        n = live.sum(-1)
        order = torch.sort(live.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :int(n.max())]
        kept = torch.arange(order.shape[-1], device=live.device) < n[..., None]  # (B, H, T'): slot j holds a token
        held = (n + page - 1) // page
        if int(held.max()) > buf.table.shape[-1] or int(held.sum()) > buf.keys.shape[0]:
            raise KVShrinkError(f"layer {index} keeps more tokens than its table or pool holds")
        first = (held.flatten().cumsum(0) - held.flatten()).view(B, H)  # each row's first block, rows in order
        w = torch.arange(buf.table.shape[-1], device=live.device)
        buf.table.copy_(torch.where(w < held[..., None], first[..., None] + w, -1))
        buf.used.fill_(int(held.sum()))
        b, h, j = kept.nonzero(as_tuple=True)
        rows = buf.table[b, h, j // page].long() * page + j % page
        source = order[b, h, j]
        buf.keys.view(-1, buf.keys.shape[-1])[rows] = keys[b, h, source].to(buf.keys.dtype)
        buf.values.view(-1, buf.values.shape[-1])[rows] = values[b, h, source].to(buf.values.dtype)
        buf.valid.view(-1)[rows] = True
        buf.top.copy_(n)
        buf.live.copy_(n)
        R = buf.ring_slot.shape[-1]
        recent = pos[b, h, source] >= int(self.step) - R
        b, h, j, source = b[recent], h[recent], j[recent], source[recent]
        ring = pos[b, h, source].long() % R
        buf.ring_slot[b, h, ring] = j.to(torch.int32)
        buf.ring_flag[b, h, ring] = flag[b, h, source]

    @classmethod
    def from_cache(cls, model, cache: KVCache, new_tokens: int, page: int = DEFAULT_PAGE, blocks: int | None = None) -> "DecodeState":
        """The state of a `KVCache` after its prefill, with room for `new_tokens` more per row: the table covers
        a row that keeps every one; the pool (per layer) too, unless `blocks` gives a budget."""
        policy = cache.policy
        layers = cache.layers
        first = layers[0]
        seen = cache.get_seq_length()
        sliding = getattr(text_config(model), "sliding_window", None) if text_config(model).model_type == "mistral" else None
        if sliding and seen + new_tokens > sliding:
            raise KVShrinkError(f"this model uses sliding-window attention ({sliding} tokens), which kvshrink's cache "
                                f"does not implement; keep prompt + generation within {sliding} tokens")
        kept = [layer.live & ~_expired(policy, layer, seen) for layer in layers]
        most = max(int(k.sum(-1).max()) for k in kept)
        per_row = [((k.sum(-1) + new_tokens + page - 1) // page).sum() for k in kept]
        keys, _ = first.keys_values()
        state = cls(model, first.rows, -(-(most + new_tokens) // page), [blocks or int(n) for n in per_row], policy,
                    keys.dtype, keys.device, page)
        state.step.fill_(seen)
        state.first_pos.copy_(first.first_pos)
        for i, (layer, live) in enumerate(zip(layers, kept)):
            keys, values = layer.keys_values()
            state.load(i, keys, values, live, layer.pos, layer.flag)
        return state


def _expired(policy: CachePolicy, layer, seen: int) -> torch.Tensor:
    """Live slots the next write would free first (DMS's flagged tokens past the window)."""
    gone = policy.expired(layer, seen)
    return torch.zeros_like(layer.live) if gone is None else gone


def write(buf: LayerBuffers, k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor | None, valid: torch.Tensor,
          step: torch.Tensor, first_pos: torch.Tensor, overflow: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Store one new token per row, k, v (B, Hkv, D), applying this step's decisions (B, Hkv) bool (or None),
    which flag the previous token; valid (B,) False for padding. Returns (B, Hkv) blocks to read."""
    B, H = buf.top.shape
    R, page, W = buf.ring_slot.shape[-1], layout.page, buf.table.shape[-1]
    now = (step % R).view(1, 1, 1).expand(B, H, 1)  # ring entry of the token of step - R, and of the new one
    if decisions is not None:
        flag = decisions & (valid[:, None] & (step > 0))
        if layout.sinks:  # a sequence's first `sinks` real tokens are never flagged
            flag = flag & ((step - 1) >= first_pos + layout.sinks)[:, None]
        prev = ((step - 1) % R).view(1, 1, 1).expand(B, H, 1)
        buf.ring_flag.scatter_(2, prev, buf.ring_flag.gather(2, prev) | flag[..., None])
    old = buf.ring_slot.gather(2, now)[..., 0]
    gone = buf.ring_flag.gather(2, now)[..., 0] & (old >= 0)  # expired now: its slot takes the new token
    slot = torch.where(gone, old, buf.top)
    buf.top.add_((~gone).int())
    logical = (slot // page).clamp(max=W - 1).long()[..., None]
    physical = buf.table.gather(2, logical)[..., 0]
    fresh = physical < 0  # the slot starts a block: take the next one of the pool
    blocks = buf.keys.shape[0]
    taken = (buf.used + fresh.flatten().cumsum(0).view(B, H) - 1).clamp(max=blocks - 1)  # past the pool: overflow
    physical = torch.where(fresh, taken.int(), physical)
    buf.table.scatter_(2, logical, physical[..., None])
    buf.used.add_(fresh.sum())
    overflow.logical_or_((buf.used > blocks) | (slot >= W * page).any())
    rows = (physical.long() * page + slot % page).flatten()
    new = valid[:, None].expand(B, H).flatten()
    flat_valid = buf.valid.view(-1)
    was_live = flat_valid.gather(0, rows) & gone.flatten()
    buf.keys.view(-1, k.shape[-1]).index_copy_(0, rows, k.reshape(B * H, -1).to(buf.keys.dtype))
    buf.values.view(-1, v.shape[-1]).index_copy_(0, rows, v.reshape(B * H, -1).to(buf.values.dtype))
    flat_valid.scatter_(0, rows, new)
    buf.live.add_((new.int() - was_live.int()).view(B, H))
    buf.ring_slot.scatter_(2, now, slot[..., None])
    buf.ring_flag.scatter_(2, now, ~new.view(B, H, 1))
    return (buf.top + page - 1) // page


def layer_step(layer, buf: LayerBuffers, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor,
               step: torch.Tensor, first_pos: torch.Tensor, overflow: torch.Tensor, rates: torch.Tensor | None,
               layout: Layout) -> torch.Tensor:
    """One decoder layer on one new token per row, h (B, 1, d): the HF layer's own modules around kvshrink's
    projection (`KVAttention.project`), the fixed-shape write and the paged read. rates (Hkv,): draw DMS
    decisions at these per-head rates instead of the model's (a benchmark's stand-in for a trained model)."""
    attn = layer.self_attn
    B = h.shape[0]
    q, k, v, logits = attn.project(layer.input_layernorm(h), (cos, sin), h, attn.dms, step.view(1, 1).expand(B, 1))
    decisions = None
    if layout.decide:
        decisions = torch.rand(B, rates.shape[0], device=h.device) < rates if rates is not None else logits[..., 0] > 0
    blocks = write(buf, k[:, :, 0], v[:, :, 0], decisions, valid, step, first_pos, overflow, layout)
    group = attn.n_heads // attn.n_kv_heads
    out = paged_decode(q.reshape(B, attn.n_kv_heads, group, -1), buf.keys, buf.values, buf.valid, buf.table, blocks,
                       attn.scaling, layout.splits)
    h = h + attn.o_proj(out.reshape(B, 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class FixedDecoder:
    """Runs `model` one token per row at a time over a `DecodeState`.

    compile: the layer step through torch.compile (one graph for every layer; default on CUDA, where it fuses
    the small ops; the first call pays the compile); graph: the whole step captured as one CUDA graph after
    `WARMUP` eager steps, then replayed (default on CUDA). rates (L, Hkv): DMS decisions drawn at these rates.
    `step` returns the next token's logits (B, V), valid until the next step.
    """

    WARMUP = 2

    def __init__(self, model, state: DecodeState, compile: bool | None = None, graph: bool | None = None,
                 rates: torch.Tensor | None = None, backend: str = "inductor"):
        cuda = state.step.is_cuda
        self.model, self.state, self.rates = model, state, rates
        self.layers = decoder_layers(model)
        batch, heads, width = state.layers[0].table.shape
        self.layout = Layout(state.page, state.policy.sinks, state.policy.needs_dms, split_k(batch * heads, width, state.step.device))
        self.layer_step = torch.compile(layer_step, backend=backend, fullgraph=True, dynamic=True) if (cuda if compile is None else compile) else layer_step
        pool = state.layers[0].keys
        for layer in self.layers:  # the neuron variant's lazily made channel mask: made here, not guarded on in a graph
            if layer.self_attn.dms is not None and layer.self_attn.dms.decision == "neuron":
                layer.self_attn._channel_keep(pool[:0])
        self.graph = cuda if graph is None else graph
        self._graph, self._warm, self._inputs, self._out = None, 0, None, None

    @classmethod
    def take(cls, model, cache: KVCache, new_tokens: int, **kwargs) -> "FixedDecoder":
        """A decoder over the tokens of `cache` (after its prefill) for `new_tokens` more per row; the cache's
        layers are emptied (their tokens now live in the state) and its accounting learns the state's bytes."""
        state = DecodeState.from_cache(model, cache, new_tokens)
        for layer in cache.layers:
            layer.reset()
        cache.accounting.note_bytes(state.nbytes)
        return cls(model, state, **kwargs)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One eager (or compiled) step: tokens, positions (B,), valid (B,) bool -> logits (B, V)."""
        s, body = self.state, self.model.model
        h = body.embed_tokens(tokens[:, None])
        cos, sin = body.rotary_emb(h, positions[:, None])
        for i, layer in enumerate(self.layers):
            rates = None if self.rates is None else self.rates[i]
            h = self.layer_step(layer, s.layers[i], h, cos, sin, valid, s.step, s.first_pos, s.overflow, rates, self.layout)
        logits = self.model.lm_head(body.norm(h))[:, 0]
        s.first_pos.copy_(torch.where(valid & (s.first_pos < 0), s.step.int(), s.first_pos))
        s.step.add_(1)
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens (B,) at positions (B,) (valid (B,) bool, None: every row real) and return the logits."""
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        if not self.graph:
            return self.forward(tokens, positions, valid)
        if self._inputs is None:
            self._inputs = (tokens.clone(), positions.clone(), valid.clone())
        for static, given in zip(self._inputs, (tokens, positions, valid)):
            static.copy_(given)
        if self._graph is None and self._warm < self.WARMUP:  # compile and warm up on a side stream, as capture wants
            self._warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.forward(*self._inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # recorded, not run: the replay below runs this step
                self._out = self.forward(*self._inputs)
        self._graph.replay()
        return self._out

    def check(self) -> None:
        """Raise if some row ran out of its table or the pool (one host sync: call it after the run)."""
        if bool(self.state.overflow):
            raise KVShrinkError("the fixed-shape cache overflowed its pool or table: give DecodeState more blocks "
                                "(or a longer width) for this run")


def split_k(rows: int, width: int, device) -> int:
    """Programs per (sequence, KV head) row: enough to give every SM two, each at least 4 tiles of 4 blocks."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while splits * rows < programs and splits * 2 * 16 <= width:
        splits *= 2
    return splits
