"""The fixed-shape decode step against the slot cache it replaces on GPUs: same logits step by step, same
live tokens per (layer, sequence, KV head), same generated tokens and stats through `generate_ids`; a row's
blocks follow its live tokens; the layer step compiles whole, one graph for every layer."""

from __future__ import annotations

import pytest
import torch

from conftest import left_pad, tiny_model, with_random_dms
from kvshrink.attach import attach_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.dms.config import DMSConfig
from kvshrink.errors import KVShrinkError
from kvshrink.fast_decode import DecodeState, FixedDecoder
from kvshrink.generation import decode_step, generate_ids, prefill
from kvshrink.policies import CachePolicy, DMSPolicy, for_model

PROMPTS = [[5, 9, 14, 3, 77, 21, 8, 40, 41, 42, 90, 12, 13, 60, 61, 62, 63, 9, 9, 11, 30, 31],
           [17, 4, 88, 23, 5, 6],
           [3] * 13]


def case(kind: str):
    """A tiny model and a policy for it."""
    if kind == "none":
        return install(tiny_model("llama")), CachePolicy()
    if kind == "forced":
        model = attach_dms(install(tiny_model("llama")), DMSConfig(window=3, forced_keep_every=4))
        return model, for_model(model, "dms")
    if kind == "neuron-qwen3":
        model = with_random_dms(tiny_model("qwen3"), window=4, decision="neuron", evict_bias=8.0)
        return model, for_model(model, "dms")
    model = with_random_dms(tiny_model("llama"), window=4, evict_bias=8.0)
    return model, {"dms": for_model(model, "dms"), "immediate": for_model(model, "dms-immediate"),
                   "sinks": DMSPolicy(4, sinks=3)}[kind]


def prefilled(model, policy):
    ids, attn = left_pad(PROMPTS)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model, policy)
    logits, _ = prefill(model, cache, ids, attn, positions)
    return cache, logits, attn, positions[:, -1]


@pytest.mark.parametrize("kind", ["dms", "immediate", "sinks", "none", "forced", "neuron-qwen3"])
def test_fixed_step_equals_slot_cache(kind, one_thread):
    model, policy = case(kind)
    steps = 24
    slot, logits, attn, pos = prefilled(model, policy)
    fixed_cache, _, _, _ = prefilled(model, policy)
    decoder = FixedDecoder(model, DecodeState.from_cache(model, fixed_cache, steps, page=4))
    token = logits.argmax(-1)
    for _ in range(steps):
        pos = pos + 1
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        expected = decode_step(model, slot, token, attn, pos)
        got = decoder.step(token, pos)
        assert (got - expected).abs().max() < 1e-4
        live = torch.stack([layer.live.sum(-1) for layer in slot.layers])
        assert torch.equal(decoder.state.live_tokens(), live.int())
        token = expected.argmax(-1)
    decoder.check()
    for buf in decoder.state.layers:  # written slots are live ones, packed: each row holds ceil(live / page) blocks
        assert torch.equal(buf.top, buf.live)
        assert int(buf.used) == int(((buf.live + 3) // 4).sum()) == int((buf.table >= 0).sum())


@pytest.mark.parametrize("kind", ["dms", "none"])
def test_generate_fixed_equals_slot_cache(kind, one_thread):
    """Greedy and sampled, rows finishing at different steps (their later tokens are padding)."""
    model, policy = case(kind)
    greedy = generate_ids(model, PROMPTS, policy, max_new_tokens=20, fixed=False)[0]
    eos = [greedy[0][4], greedy[1][9]]  # rows end early, at different steps
    for temperature in (0.0, 1.0):
        runs = [generate_ids(model, PROMPTS, policy, max_new_tokens=20, eos_token_id=eos, temperature=temperature,
                             fixed=fixed) for fixed in (False, True)]
        (tokens, stats, per_seq), (tokens_fixed, stats_fixed, per_seq_fixed) = runs
        assert tokens_fixed == tokens
        assert temperature or len({len(t) for t in tokens}) > 1
        for key in ("kv_reads", "peak_kv_tokens", "compression_ratio"):
            assert stats_fixed[key] == pytest.approx(stats[key])
        assert torch.allclose(per_seq_fixed["kv_reads"], per_seq["kv_reads"])


def test_compiled_layer_step_is_one_graph(one_thread):
    """fullgraph=True: no graph break, no data-dependent shape; every layer reuses it; same logits as eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, policy = case("dms")
    cache, logits, _, pos = prefilled(model, policy)
    other, _, _, _ = prefilled(model, policy)
    eager = FixedDecoder(model, DecodeState.from_cache(model, cache, 8, page=4), compile=False)
    compiled = FixedDecoder(model, DecodeState.from_cache(model, other, 8, page=4), compile=True, backend="eager")
    token = logits.argmax(-1)
    for _ in range(4):
        pos = pos + 1
        expected = eager.step(token, pos)
        assert (compiled.step(token, pos) - expected).abs().max() < 1e-5
        token = expected.argmax(-1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the other layer and later steps reuse it


def test_a_small_pool_overflows_loudly(one_thread):
    model, policy = case("none")
    cache, logits, _, pos = prefilled(model, policy)
    held = int(((cache.layers[0].live.sum(-1) + 3) // 4).sum())  # what the prompts fill: no room to grow
    decoder = FixedDecoder(model, DecodeState.from_cache(model, cache, 8, page=4, blocks=held))
    for _ in range(8):
        pos = pos + 1
        decoder.step(logits.argmax(-1), pos)
    with pytest.raises(KVShrinkError, match="overflowed"):
        decoder.check()
