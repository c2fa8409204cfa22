"""Continuous batching at the cache level, for every policy and both key/value layouts: sequences prefilled alone, joined into one
batch, decoded together and dropped one by one give the logits each one gets alone, and the tokens a
left-padded batch of them generates together."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, with_random_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.generation import generate_ids, prefill_row
from kvshrink.policies import POLICY_NAMES, for_model
from kvshrink.shims import cache_arg

W = 4  # the DMS window
KINDS = [name for name in POLICY_NAMES if name != "dms-immediate"]


def step(model, cache, token_ids, positions):
    ids = torch.tensor(token_ids)[:, None]
    return model(ids, position_ids=torch.tensor(positions)[:, None], **cache_arg(cache), use_cache=True).logits[:, -1]


def model_and_policy(kind: str):
    if kind == "dms":
        model = with_random_dms(tiny_model("llama"), window=W, evict_bias=8.0)
        return model, for_model(model, "dms")
    model = install(tiny_model("llama"))
    return model, for_model(model, kind, cr=None if kind == "none" else 3)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_join_decode_leave_equals_alone(kind, paged):
    model, policy = model_and_policy(kind)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (30, 19, 41)]
    steps = torch.randint(3, 128, (3, 8), generator=g).tolist()

    def alone(i):
        cache = KVCache(model, policy, paged=paged)
        with torch.no_grad():
            model(torch.tensor([prompts[i]]), **cache_arg(cache), use_cache=True)
            return torch.stack([step(model, cache, [steps[i][t]], [len(prompts[i]) + t])[0] for t in range(8)])

    expected = [alone(i) for i in range(3)]
    batch = KVCache(model, policy, paged=paged)
    got = [[], [], []]
    with torch.no_grad():
        for i in (0, 1):  # 0 and 1 start together (joined after separate prefills)
            single = KVCache(model, policy, paged=paged)
            model(torch.tensor([prompts[i]]), **cache_arg(single), use_cache=True)
            batch.append_rows(single)
        rows = [0, 1]
        for t in range(8):
            if t == 3:  # 2 joins mid-way, after its own prefill
                single = KVCache(model, policy, paged=paged)
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


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_prefilled_one_at_a_time_decode_as_together_and_alone(kind, paged):
    """Rows prefilled one at a time (in the policy's prompt chunks) and appended into one batch: their greedy
    tokens are those of a left-padded batch generating them together and of each generated alone, and
    their logits those alone. Prompt lengths are multiples of 16, so that the padded batch reads each
    prompt in the same chunks as alone (budget policies evict between chunks)."""
    model, policy = model_and_policy(kind)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (64, 16, 48)]
    new = 8
    together, _, _ = generate_ids(model, prompts, policy, max_new_tokens=new, paged=paged)
    alone = [generate_ids(model, [p], policy, max_new_tokens=new, paged=paged)[0][0] for p in prompts]
    assert together == alone

    batch, first = KVCache(model, policy, paged=paged), []
    for p in prompts:
        single = KVCache(model, policy, paged=paged)
        first.append(prefill_row(model, single, p))
        batch.append_rows(single)
    logits = [torch.stack(first)]
    with torch.no_grad():
        for t in range(new - 1):
            tokens = logits[-1].argmax(-1).tolist()
            logits.append(step(model, batch, tokens, [len(p) + t for p in prompts]))
    appended = torch.stack(logits, 1)  # (rows, new, V)
    assert appended.argmax(-1).tolist() == together

    for i, p in enumerate(prompts):  # each row alone, fed the same tokens
        single = KVCache(model, policy, paged=paged)
        expected = [prefill_row(model, single, p)]
        with torch.no_grad():
            for t in range(new - 1):
                expected.append(step(model, single, [together[i][t]], [len(p) + t])[0])
        assert (appended[i] - torch.stack(expected)).abs().max() < 1e-4, i
