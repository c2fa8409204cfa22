"""Continuous batching at the cache level: sequences prefilled alone, joined into one batch, decoded
together and dropped one by one give the logits each one gets alone."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, with_random_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.shims import cache_arg
from kvshrink.policies import CachePolicy, DMSPolicy, for_model


def step(model, cache, token_ids, positions):
    ids = torch.tensor(token_ids)[:, None]
    return model(ids, position_ids=torch.tensor(positions)[:, None], **cache_arg(cache), use_cache=True).logits[:, -1]


@pytest.mark.parametrize("kind", ["none", "dms", "tova"])
def test_join_decode_leave_equals_alone(kind):
    w = 4
    model = with_random_dms(tiny_model("llama"), window=w, evict_bias=8.0) if kind == "dms" else install(tiny_model("llama"))
    policy = {"none": CachePolicy(), "dms": DMSPolicy(w), "tova": for_model(model, "tova", cr=3)}[kind]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (30, 19, 41)]
    steps = torch.randint(3, 128, (3, 8), generator=g).tolist()

    def alone(i):
        cache = KVCache(model, policy)
        with torch.no_grad():
            model(torch.tensor([prompts[i]]), **cache_arg(cache), use_cache=True)
            return torch.stack([step(model, cache, [steps[i][t]], [len(prompts[i]) + t])[0] for t in range(8)])

    expected = [alone(i) for i in range(3)]
    batch = KVCache(model, policy)
    got = [[], [], []]
    with torch.no_grad():
        for i in (0, 1):  # 0 and 1 start together (joined after separate prefills)
            single = KVCache(model, policy)
            model(torch.tensor([prompts[i]]), **cache_arg(single), use_cache=True)
            batch.append_rows(single)
        rows = [0, 1]
        for t in range(8):
            if t == 3:  # 2 joins mid-way, after its own prefill
                single = KVCache(model, policy)
                model(torch.tensor([prompts[2]]), **cache_arg(single), use_cache=True)
                batch.append_rows(single)
                rows.append(2)
            if t == 5:  # 0 leaves
                batch.take_rows([1, 2] if 2 in rows else [1])
                rows.remove(0)
            done = {r: sum(1 for _ in got[r]) for r in rows}
            logits = step(model, batch, [steps[r][done[r]] for r in rows], [len(prompts[r]) + done[r] for r in rows])
            for j, r in enumerate(rows):
                got[r].append(logits[j])
    for r in range(3):
        n = len(got[r])
        assert n > 0 and (torch.stack(got[r]) - expected[r][:n]).abs().max() < 1e-4, r
    assert batch.batch_size == 2
