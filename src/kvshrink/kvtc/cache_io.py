"""One sequence's cache between a `KVCache` and the per-layer, position-ordered layout KVTC stores.

A `KVCache` keeps each (sequence, KV head) row's tokens in reusable slots, in any order. KVTC wants,
per layer, (1, Hkv, T, D) keys and values in position order and, where a DMS cache evicted some
(layer, head, token) slots, a (Hkv, T) live mask (docs/conventions.md). `export_cache` flattens one row into that
layout; `restore_cache` builds a one-row cache in the state a prefill of the same tokens leaves, so
generation goes on from it as if it had prefilled them.

DMS also has pending evictions: a flagged token stays visible until it leaves the window. Their flags
travel beside the live mask (`CacheState.flags`); a restored cache without them would keep those
tokens for good. `pack_cache` / `unpack_cache` turn a state into bytes: a KVTC blob plus those flags,
under one checksum (the blob's own does not cover the flags or the head that places them).
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

import numpy as np
import torch

from ..cache import KVCache
from ..errors import KVShrinkError
from ..policies.base import CachePolicy
from .calibration import Calibration
from .codec import blob_stats, checksum, compress, decompress
from .errors import KVTCFormatError
from .rope import rope_tables


class CacheState(NamedTuple):
    """One sequence's cache; keys and values on the cache's device, the rest (small) on the CPU."""

    keys: list[torch.Tensor]  # per layer (1, Hkv, T, D), post-RoPE; zeros where not live
    values: list[torch.Tensor]
    live: list[torch.Tensor] | None  # per layer (Hkv, T) bool; None when every slot is live
    positions: torch.Tensor  # (T,) int64 RoPE positions of the tokens
    flags: list[torch.Tensor] | None = None  # per layer (Hkv, T) bool: live, flagged by DMS, still in its window


def cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary tables for `positions` (T,): fp32 (1, T, D) on the CPU, where the codec runs."""
    rotary = model.model.rotary_emb
    cos, sin = rope_tables(rotary, positions.to(next(rotary.buffers()).device))
    return cos.cpu(), sin.cpu()


def export_cache(cache: KVCache, row: int = 0) -> CacheState:
    """Row `row`'s tokens, from its first real token to its last live one, at positions 0..T-1 (a padded
    row's offset removed; a finished row's padding steps left out).

    Slots the next forward would free anyway (DMS tokens past their window) count as evicted.
    Per-slot policy state (TOVA/H2O scores, Quest pages) is not exported."""
    first = cache.layers[0]
    if not first.is_initialized or not 0 <= row < cache.batch_size:
        raise KVShrinkError(f"cache has no row {row} to export (batch size {cache.batch_size})")
    start = int(first.first_pos[row])
    if start < 0:
        raise KVShrinkError(f"row {row} of the cache holds no tokens yet")
    alive = []
    for layer in cache.layers:
        gone = cache.policy.expired(layer, layer.seen)
        alive.append(layer.live[row] if gone is None else layer.live[row] & ~gone[row])  # (Hkv, S)
    T = max(int(layer.pos[row].masked_fill(~a, start - 1).max()) for layer, a in zip(cache.layers, alive)) - start + 1
    if T < 1:
        raise KVShrinkError(f"row {row} of the cache holds no live tokens")
    keys, values, live, flags = [], [], [], []
    for layer, a in zip(cache.layers, alive):
        where = torch.where(a, layer.pos[row].long() - start, T)  # slot -> position; T: dropped
        layer_keys, layer_values = layer.keys_values()
        keys.append(_by_position(layer_keys[row], where, T))
        values.append(_by_position(layer_values[row], where, T))
        live.append(_by_position(a, where, T)[0].cpu())
        flags.append(_by_position(a & layer.flag[row], where, T)[0].cpu())
    return CacheState(keys, values, None if all(m.all() for m in live) else live, torch.arange(T),
                      flags if any(m.any() for m in flags) else None)


def _by_position(x: torch.Tensor, where: torch.Tensor, T: int) -> torch.Tensor:
    """x: (Hkv, S, ...) per slot, where: (Hkv, S) position of each slot (T = drop) -> (1, Hkv, T, ...)."""
    index = where.reshape(*where.shape, *[1] * (x.dim() - 2)).expand_as(x)
    out = x.new_zeros(x.shape[0], T + 1, *x.shape[2:]).scatter_(1, index, x)
    return out[None, :, :T]


def restore_cache(model, policy: CachePolicy | None, keys, values, live=None, positions=None, flags=None) -> KVCache:
    """A `KVCache` holding these tokens as a prefill of them would leave it (see `CacheState`;
    `restore_cache(model, policy, *export_cache(cache))` round-trips). positions default to 0..T-1;
    the next token goes at position positions[-1] + 1. keys and values may hold B > 1 rows that share
    positions, live slots and flags (one cache through several codecs): a B-row cache, decoded together.
    A policy that keeps state of its own (TOVA's and H2O's scores, Quest's pages) is refused: the stored cache
    holds keys and values only."""
    T = keys[0].shape[2]
    positions = torch.arange(T) if positions is None else positions.long().cpu()
    if T == 0 or positions.shape != (T,) or (positions.diff() <= 0).any() or positions[0] < 0:
        raise KVShrinkError(f"restore needs T >= 1 tokens at increasing positions, got {T} and {positions.tolist()[:8]}")
    cache = KVCache(model, policy)
    if not len(keys) == len(values) == len(cache.layers):
        raise KVShrinkError(f"the model has {len(cache.layers)} layers, the stored cache {len(keys)}")
    weight = next(model.parameters())
    for i, layer in enumerate(cache.layers):
        layer.load_tokens(keys[i].to(weight.device, weight.dtype), values[i].to(weight.device, weight.dtype), positions,
                          None if live is None else live[i], None if flags is None else flags[i])
    return cache


# -- a state as bytes: KVTC blob + DMS flags ------------------------------------------------------------------
# version 2: magic, version, blake2b-128 of the rest, then head, policy tag, blob, flag bits. Version 1 (no
# magic, starting at the head) left the head and the flags unchecked: a flipped bit moved or changed flags.
_MAGIC, _VERSION = b"KVPC", 2
_FRAME = struct.Struct("<4sB16s")
_HEAD = struct.Struct("<IIH")  # first flagged position, blob bytes, policy tag bytes


def pack_cache(state: CacheState, model, calib: Calibration, cr: float, policy: CachePolicy | None = None) -> bytes:
    """Compress a state at positions 0..T-1. Pending DMS flags (all in the last DMS window) are kept
    exactly from the first flagged position on; the policy is named so that a restore under another one
    (a DMS model's cache read back as vanilla, or the reverse) is refused."""
    T = len(state.positions)
    if not torch.equal(state.positions, torch.arange(T)):
        raise KVShrinkError("pack_cache stores caches at positions 0..T-1 (as export_cache gives them)")
    blob = compress(state.keys, state.values, calib, cr, *cos_sin(model, state.positions), live=state.live)
    start, bits = T, b""
    if state.flags is not None:
        flags = torch.stack(state.flags)  # (L, Hkv, T)
        start = int(flags.any(0).any(0).int().argmax())
        bits = np.packbits(flags[:, :, start:].numpy().reshape(-1)).tobytes()
    tag = _policy_tag(policy)
    body = _HEAD.pack(start, len(blob), len(tag)) + tag + blob + bits
    return _FRAME.pack(_MAGIC, _VERSION, checksum(body)) + body


def unpack_cache(data: bytes, model, calib: Calibration, policy: CachePolicy | None = None) -> CacheState:
    """Inverse of `pack_cache`; KVTCFormatError for bytes that are damaged, of another format version, or
    were packed with another calibration or policy."""
    if data[_HEAD.size:_HEAD.size + 1] == b"{" and not data.startswith(_MAGIC):  # version 1: the head, then its tag
        raise KVTCFormatError(f"stored cache is in packed-cache format version 1 (an older kvshrink's, its DMS flags unchecked); "
                              f"this kvshrink reads version {_VERSION}: re-pack it with pack_cache (a PrefixStore "
                              "recomputes such entries by itself)")
    if len(data) < _FRAME.size + _HEAD.size or not data.startswith(_MAGIC):
        raise KVTCFormatError("not a packed KVTC cache (too short or wrong magic bytes)")
    _, version, digest = _FRAME.unpack_from(data)
    if version != _VERSION:
        raise KVTCFormatError(f"stored cache has packed-cache format version {version}; this kvshrink reads version "
                              f"{_VERSION}: re-pack it with this kvshrink's pack_cache")
    body = data[_FRAME.size:]
    if checksum(body) != digest:
        raise KVTCFormatError("stored cache is corrupted or truncated (checksum mismatch)")
    start, n_blob, n_tag = _HEAD.unpack_from(body)
    tag_end = _HEAD.size + n_tag
    if body[_HEAD.size:tag_end] != _policy_tag(policy):
        raise KVTCFormatError(f"stored cache was written under another cache policy ({body[_HEAD.size:tag_end]!r})")
    blob, bits = body[tag_end:tag_end + n_blob], body[tag_end + n_blob:]
    T = blob_stats(blob)["tokens"]
    L, H = calib.identity.layers, calib.identity.kv_heads
    tail = L * H * (T - start)
    if start > T or len(bits) != -(-tail // 8):
        raise KVTCFormatError("stored cache's DMS flags do not match its blob")
    positions = torch.arange(T)
    keys, values, live = decompress(blob, calib, *cos_sin(model, positions))
    flags = None
    if start < T:
        pending = torch.from_numpy(np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=tail).astype(bool))
        flags = list(torch.cat([torch.zeros(L, H, start, dtype=torch.bool), pending.reshape(L, H, T - start)], 2))
    return CacheState(keys, values, live, positions, flags)


def _policy_tag(policy: CachePolicy | None) -> bytes:
    return json.dumps((policy or CachePolicy()).describe(), sort_keys=True).encode()
