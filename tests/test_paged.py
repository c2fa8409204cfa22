"""The paged key/value layout against the contiguous one: every policy gives the same tokens and logits on
both, through chunked prompts, decoding and a second turn; and blocks of rows that leave are reused."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, with_random_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.generation import prefill_row
from kvshrink.policies import POLICY_NAMES, for_model
from kvshrink.shims import cache_arg

W = 4  # the DMS window


def model_and_policy(kind: str):
    if kind.startswith("dms"):
        model = with_random_dms(tiny_model("llama"), window=W, evict_bias=8.0)
        return model, for_model(model, kind)
    model = install(tiny_model("llama"))
    return model, for_model(model, kind, cr=None if kind == "none" else 3)


def turns(model, cache, prompts, chunk):
    """Logits of every step: each prompt in `chunk`-token pieces, then 6 greedy tokens, then the next prompt."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logits = prefill_row(model, cache, prompt, chunk)
            out.append(logits)
            for _ in range(6):
                seen = cache.get_seq_length()
                token = torch.tensor([[int(out[-1].argmax())]])
                logits = model(token, position_ids=torch.tensor([[seen]]), **cache_arg(cache), use_cache=True).logits[0, -1]
                out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("kind", POLICY_NAMES)
def test_paged_equals_contiguous(kind, chunk):
    model, policy = model_and_policy(kind)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (70, 23)]  # a second user turn
    contiguous = KVCache(model, policy, paged=False)
    paged = KVCache(model, policy, paged=True, block=8)
    expected, got = turns(model, contiguous, prompts, chunk), turns(model, paged, prompts, chunk)
    assert (got - expected).abs().max() < 1e-4
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert torch.equal(paged.live_tokens(), contiguous.live_tokens())
    if policy.frees_memory:  # every block held holds a live token; a row holds about its live tokens' blocks
        for layer in paged.layers:
            B, H, S = layer.live.shape
            occupied = layer.live.view(B, H, S // 8, 8).any(-1)
            assert torch.equal(layer.kv.table >= 0, occupied)
            assert layer.kv.held_blocks <= int(((layer.live.sum(-1) + 7) // 8 + 1).sum())


def test_a_thousand_joins_leave_no_blocks_behind():
    """Sequences prefilled alone join a running batch and the oldest leave, 1,000 times: the blocks held are
    always the remaining rows' own, and the storage stops growing."""
    model, policy = model_and_policy("dms")
    g = torch.Generator().manual_seed(1)
    batch, sizes, lengths = KVCache(model, policy, block=8), [], []
    with torch.no_grad():
        for i in range(1000):
            single = KVCache(model, policy, block=8)
            n = int(torch.randint(1, 40, (1,), generator=g))
            prefill_row(model, single, torch.randint(3, 128, (n,), generator=g).tolist())
            batch.append_rows(single)
            lengths.append(n)
            if batch.batch_size > 4:
                batch.take_rows(list(range(1, batch.batch_size)))
                lengths.pop(0)
            layer = batch.layers[0]
            B, H, S = layer.live.shape
            assert torch.equal(layer.kv.table >= 0, layer.live.view(B, H, S // 8, 8).any(-1))  # held = holding a live token
            sizes.append(batch.allocated_bytes())
    assert batch.batch_size == 4 and max(sizes[500:]) <= max(sizes[:500])
