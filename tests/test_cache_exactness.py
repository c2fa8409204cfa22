"""The cache against independent references: HF generation, and a dense masked-attention forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import FAMILIES, left_pad, tiny_model, with_random_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.shims import cache_arg
from kvshrink.attach import DMSCache
from kvshrink.dms import TrainSignals
from kvshrink.dms.mask import delayed_eviction_bias, hard_log_keep
from kvshrink.generation import decode_step, generate_ids, prefill, prefill_row
from kvshrink.policies import CachePolicy, DMSPolicy

pytestmark = pytest.mark.exactness

PROMPTS = [[5, 17, 33, 9, 41, 7, 60, 12, 3, 88, 21], [44, 8, 19, 100, 27, 6]]  # different lengths: left padding


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_none_equals_hf_generate(family):
    """Greedy output through KVCache (policy none) == model.generate with HF's default cache."""
    hf_model = tiny_model(family)
    ours = install(copy.deepcopy(hf_model))
    ids, mask = left_pad(PROMPTS)
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    tokens, stats, _ = generate_ids(ours, PROMPTS, CachePolicy(), max_new_tokens=12, prefill_chunk=4)
    assert tokens == expected.tolist()
    # the same cache also works as a drop-in for model.generate
    via_generate = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                 **cache_arg(KVCache(ours)))[:, ids.shape[1]:]
    assert via_generate.tolist() == expected.tolist()
    assert stats["compression_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_step_equal_hf_forward_with_its_cache(family):
    """The one prefill (in chunks) and decode step through KVCache (policy none) give the logits of HF's own
    forward with a DynamicCache: a left-padded batch, then teacher-forced tokens one per row."""
    hf_model = tiny_model(family)
    ours = install(copy.deepcopy(hf_model))
    ids, mask = left_pad(PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, hf_cache = KVCache(ours), DynamicCache(config=hf_model.config)
    with torch.no_grad():
        got, _ = prefill(ours, cache, ids, mask, positions, chunk=4)
        expected = hf_model(ids, attention_mask=mask, position_ids=positions, **cache_arg(hf_cache)).logits[:, -1]
        assert (got - expected).abs().max() < 1e-4
        pos = positions[:, -1]
        for token in torch.randint(3, 128, (6, 2), generator=torch.Generator().manual_seed(11)):
            mask, pos = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1), pos + 1
            got = decode_step(ours, cache, token, mask, pos)
            expected = hf_model(token[:, None], attention_mask=mask, position_ids=pos[:, None], **cache_arg(hf_cache)).logits[:, -1]
            assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("decision", ["adapter", "neuron"])
def test_dms_window_covering_everything_equals_eviction_disabled(decision):
    """With w >= total length nothing can expire: DMS == the same DMS model with eviction off."""
    model = with_random_dms(tiny_model("qwen3"), window=10_000, decision=decision, evict_bias=5.0)
    dms_tokens, dms_stats, _ = generate_ids(model, PROMPTS, DMSPolicy(window=10_000), max_new_tokens=16, prefill_chunk=5)
    off_tokens, _, _ = generate_ids(model, PROMPTS, CachePolicy(), max_new_tokens=16, prefill_chunk=5)
    assert dms_tokens == off_tokens
    assert dms_stats["compression_ratio"] == pytest.approx(1.0)


def test_delayed_eviction_bias_matches_brute_force():
    torch.manual_seed(0)
    B, H, T, w = 2, 3, 12, 2
    evict = torch.rand(B, H, T) > 0.4
    bias = delayed_eviction_bias(hard_log_keep(evict), w)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    # the decision at j+1 marks key j; a marked key is visible while i - j <= w
                    visible = j <= i and not (j + 1 < T and j + 1 <= i and evict[b, h, j + 1] and i - j > w)
                    assert (bias[b, h, i, j] == 0) == visible, (b, h, i, j)
                    assert (bias[b, h, i, j] == float("-inf")) == (not visible)


@pytest.mark.parametrize("family,decision,sinks", [("llama", "adapter", 0), ("qwen3", "neuron", 0), ("mistral", "adapter", 0),
                                                    ("llama", "adapter", 3)])
def test_dms_cache_matches_dense_reference_multi_turn(family, decision, sinks):
    """Teacher-forced logits through DMSCache (prefill -> decode -> second prefill -> decode, batch 2,
    left padding) equal one full-sequence forward with the hard delayed-eviction mask. With sinks, the
    first real tokens of each row stay whatever their flags (the cache reads `first_pos`, the mask the
    padding mask: two separate paths)."""
    w = 3
    model = with_random_dms(tiny_model(family), window=w, decision=decision, evict_bias=8.0 if decision == "adapter" else 0.0)
    for layer in model.model.layers:
        layer.self_attn.dms.sinks = sinks
    if decision == "neuron":  # a random query channel * 100 gives random decisions; push it towards eviction
        for cfg_layer in model.model.layers:
            cfg_layer.self_attn.dms.alpha_offset = -5.0
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (40,), generator=g).tolist(), torch.randint(3, 128, (33,), generator=g).tolist()]
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        collected = []
        reference = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, dms_signals=TrainSignals(collect=collected)).logits
        flags = torch.stack([c["flags"] for c in collected])  # (L, B, Hkv, T)
        real = mask[None, :, None, 1:].bool().expand_as(flags[..., 1:])
        assert flags[..., 1:][real].float().mean() >= 0.45, "the test needs real evictions"

        cache = DMSCache(model)
        schedule = [(0, 17), *[(t, t + 1) for t in range(17, 22)], (22, 31), *[(t, t + 1) for t in range(31, T)]]
        pieces = []
        for s, e in schedule:
            out = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], **cache_arg(cache), use_cache=True)
            pieces.append(out.logits)
        cached = torch.cat(pieces, dim=1)
    real_rows = mask.bool()
    assert (cached - reference)[real_rows].abs().max() < 1e-4
    # memory follows the evictions: fewer live tokens than tokens seen
    assert cache.live_tokens().float().mean() < 0.6 * T
    # the first real tokens: flagged somewhere (so the check can fail), kept iff they are sinks
    first_real = [int((~row.bool()).sum()) for row in mask]
    for layer_cache, layer_flags in zip(cache.layers, flags):
        for b, start in enumerate(first_real):
            stored = layer_cache.live[b] & (layer_cache.pos[b] >= start) & (layer_cache.pos[b] < start + 3)
            if sinks:
                assert (stored.sum(-1) == 3).all()
                assert not layer_flags[b, :, start + 1:start + 4].any()  # their decisions read "keep"
                assert not (layer_cache.flag[b] & stored).any()  # nor are they flagged in the cache (KVTC stores flags)
            else:
                marked = layer_flags[b, :, start + 1:start + 4].bool()  # the decision at t+1 marks token t
                assert (stored.sum(-1) == 3 - marked.sum(-1)).all()


def test_generation_cache_matches_dense_reference_greedy():
    """kvshrink.generate's own loop (chunked prefill + decode) gives the tokens the dense reference picks."""
    w = 4
    model = with_random_dms(tiny_model("llama"), window=w, evict_bias=8.0)
    prompt = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    tokens, stats, _ = generate_ids(model, [prompt], DMSPolicy(w), max_new_tokens=10, prefill_chunk=8)
    seq = torch.tensor([prompt + tokens[0][:-1]])
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == tokens[0]
    assert stats["compression_ratio"] > 1.2


def test_dms_output_does_not_depend_on_the_prompt_chunk():
    """A server reads DMS prompts in long chunks: tokens that expire inside a chunk are hidden, so the
    tokens, the reads and the cache once decoding starts equal reading the prompt in 16-token chunks;
    only the peak (one chunk held whole) may differ."""
    w = 4
    model = with_random_dms(tiny_model("llama"), window=w, evict_bias=8.0)
    prompt = torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(7)).tolist()
    runs = [generate_ids(model, [prompt], DMSPolicy(w, prefill_chunk=chunk), max_new_tokens=12)[:2] for chunk in (16, 64)]
    (short_tokens, short_stats), (long_tokens, long_stats) = runs
    assert short_tokens == long_tokens
    assert long_stats["kv_reads"] == pytest.approx(short_stats["kv_reads"])
    assert long_stats["compression_ratio"] == pytest.approx(short_stats["compression_ratio"])
    assert short_stats["compression_ratio"] > 1.5
    assert long_stats["peak_kv_tokens"] >= short_stats["peak_kv_tokens"]
    # read alone: once `free_expired` runs, the long-chunk row holds exactly the short-chunk row's tokens
    rows = []
    for chunk in (16, 64):
        cache = KVCache(model, DMSPolicy(w, prefill_chunk=chunk))
        prefill_row(model, cache, prompt)
        held_before = cache.live_tokens().sum()
        cache.free_expired()
        rows.append((held_before, cache.live_tokens()))
    assert rows[1][0] > rows[1][1].sum()  # the 64-token chunk held expired tokens until freed
    assert torch.equal(rows[0][1], rows[1][1])
