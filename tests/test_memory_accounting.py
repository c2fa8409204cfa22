"""Memory really freed, the accounting on a hand-worked example, and gradients through the DMS mask."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from kvshrink.blocks import DEFAULT_BLOCK
from kvshrink.cache import DEFAULT_CHUNK
from kvshrink.shims import cache_arg
from kvshrink.attach import attach_dms
from kvshrink.dms.config import DMSConfig
from kvshrink.generation import generate_ids
from kvshrink.policies import CachePolicy, DMSPolicy


def forced_dms(model, window: int, keep_every: int):
    return attach_dms(copy.deepcopy(model), DMSConfig(window=window, forced_keep_every=keep_every))


def brute_force_live(t0: int, n_new: int, window: int, keep_every: int, head: int) -> int:
    """Live tokens of one KV head while a forward of tokens t0..t0+n_new-1 attends: older tokens
    survive unless flagged (token p is kept iff (p + 1 + 3*head) % keep_every == 0; its flag is
    known once token p+1 arrives) and older than the window for query t0; new tokens are all stored."""
    old = sum(1 for p in range(t0) if (p + 1 + 3 * head) % keep_every == 0 or t0 - p <= window)
    return old + n_new


@pytest.mark.exactness
@pytest.mark.parametrize("paged", [False, True])
def test_memory_follows_forced_eviction_and_peak_equals_brute_force(paged):
    w, keep_every, prefill, decode = 32, 8, 1900, 101  # 2,000 tokens cached in all (the last one is never written)
    model = forced_dms(tiny_model("llama", layers=2), window=w, keep_every=keep_every)
    prompt = torch.randint(3, 128, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    chunk = 16  # the prefill chunk adds its tokens before the window thins them: keep it below one growth chunk
    _, stats, per_seq = generate_ids(model, [prompt], DMSPolicy(w), max_new_tokens=decode, prefill_chunk=chunk, paged=paged)
    tokens_cached = prefill + decode - 1
    assert tokens_cached == 2000
    L, H, D = 2, 2, 16
    forwards = [(s, min(chunk, prefill - s)) for s in range(0, prefill, chunk)] + [(t, 1) for t in range(prefill, prefill + decode - 1)]
    peak = max(sum(brute_force_live(t0, n, w, keep_every, h) for h in range(H)) / H for t0, n in forwards)
    assert stats["peak_kv_tokens"] == pytest.approx(peak)

    kv_per_slot, meta_per_slot = 2 * D * 4, 4 + 1 + 1 + 4  # fp32 key + value; fp32 bias, live + flag bools, int32 position
    vanilla_bytes = tokens_cached * (kv_per_slot + meta_per_slot) * L * H
    assert stats["cache_bytes"] < vanilla_bytes / 4
    row_peak = max(brute_force_live(t0, n, w, keep_every, h) for t0, n in forwards for h in range(H))
    capacity = row_peak + DEFAULT_CHUNK  # every row of a layer gets the fullest row's slots, rounded to a chunk
    if not paged:
        assert stats["cache_bytes"] <= capacity * (kv_per_slot + meta_per_slot) * L * H
    else:  # keys and values follow each row's live tokens, in blocks; the slot metadata and one layer's read buffer beside
        block = DEFAULT_BLOCK
        blocks = L * H * (-(-row_peak // block) + 1)
        scratch = H * (-(-row_peak // block) + 1) * block * D * 4  # one layer's keys (then values), gathered for a read
        tables = L * H * (capacity // block + 1) * 4  # an int32 block id per logical block
        assert stats["cache_bytes"] <= blocks * block * kv_per_slot + capacity * meta_per_slot * L * H + scratch + tables


def test_accounting_hand_worked_example():
    """10 tokens (4 prompt + 6 generated), w = 2, one KV head, forced decisions: even tokens flagged.

    Query i sees key j <= i unless j is even (flagged by the decision at j+1) and i - j > 2.
      prompt queries 0, 1, 2 see {0}, {0,1}, {0,1,2}              -> prefill_kv_reads = 1+2+3 = 6
      query 3 (-> 1st generated) sees {1,2,3}                       -> 3
      queries 4..8 see {1,2,3,4}, {1,3,4,5}, {1,3,4,5,6},
                       {1,3,5,6,7}, {1,3,5,6,7,8}                   -> 4+4+5+5+6
      kv_reads = 3+4+4+5+5+6 = 27; vanilla = 4+5+6+7+8+9 = 39; CR = 39/27
    Live tokens while each forward attends: prefill stores 0..3 (4); then 4, 4, 5, 5, 6 -> peak 6
    (token 9, the last generated, is never written).
    """
    model = forced_dms(tiny_model("llama", layers=1, heads=2, kv_heads=1), window=2, keep_every=2)
    _, stats, _ = generate_ids(model, [[5, 6, 7, 8]], DMSPolicy(2), max_new_tokens=6)
    assert stats["generated_tokens"] == 6
    assert stats["prefill_kv_reads"] == 6
    assert stats["kv_reads"] == 27
    assert stats["peak_kv_tokens"] == 6
    assert stats["compression_ratio"] == pytest.approx(39 / 27)
    _, vanilla, _ = generate_ids(model, [[5, 6, 7, 8]], CachePolicy(), max_new_tokens=6)
    assert vanilla["kv_reads"] == 39 and vanilla["peak_kv_tokens"] == 9 and vanilla["prefill_kv_reads"] == 6


@pytest.mark.parametrize("decision", ["neuron", "adapter"])
def test_gradient_reaches_retention_predictor(decision):
    """From the retrofit's starting point (adapter zero-initialised, logit -5), through the Gumbel-sigmoid mask."""
    model = attach_dms(tiny_model("llama"), DMSConfig(window=4, decision=decision))
    model.train()
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(ids, use_cache=False).logits
    out.float().pow(2).mean().backward()
    attn = model.model.layers[0].self_attn
    if decision == "neuron":
        group, D = attn.n_heads // attn.n_kv_heads, attn.head_dim
        rows = [(kv * group) * D + D - 1 for kv in range(attn.n_kv_heads)]  # last channel of each group's first head
        grad = attn.q_proj.weight.grad[rows]
    else:
        grad = attn.dms_proj_alpha.weight.grad
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_cache_reset_clears_accounting():
    from kvshrink.cache import KVCache

    model = forced_dms(tiny_model("llama", layers=1, heads=2, kv_heads=1), window=2, keep_every=2)
    cache = KVCache(model, DMSPolicy(2))
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]), **cache_arg(cache))
    assert float(cache.accounting.peak_tokens_total) == 6
    cache.reset()
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), **cache_arg(cache))
    assert float(cache.accounting.peak_tokens_total) == 2 and cache.get_seq_length() == 2


@pytest.mark.parametrize("paged", [False, True])
def test_a_dropped_cache_frees_its_tensors_without_the_garbage_collector(paged):
    """A sweep runs batch after batch: each batch's cache must go when its last reference does. A reference cycle
    (cache -> layer -> cache) would keep every finished batch's gigabytes until the collector happened to run."""
    import gc
    import weakref

    from kvshrink.cache import KVCache

    model = forced_dms(tiny_model("llama", layers=2), window=2, keep_every=2)
    cache = KVCache(model, DMSPolicy(2), paged=paged)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]), **cache_arg(cache))
    cache.repeat_rows(2)  # what a sweep does to share a prompt's prefill
    keys = weakref.ref(cache.layers[0].kv.keys if paged else cache.layers[0].keys)
    gc.disable()
    try:
        del cache
        assert keys() is None
    finally:
        gc.enable()
