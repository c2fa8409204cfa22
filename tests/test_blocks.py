"""The paged key/value store against a dense masked computation: attention over held blocks, block reuse."""

import torch

from kvshrink.blocks import BlockPool, PagedKV, attend_blocks


def dense_attention(q, keys, values, visible, scaling):
    scores = ((q @ keys.mT) * scaling).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ values


def filled(live: torch.Tensor, dim: int = 8, block: int = 4, seed: int = 0):
    """A store holding random keys/values at the live slots of `live` (B, Hkv, S), and the dense tensors."""
    g = torch.Generator().manual_seed(seed)
    B, H, S = live.shape
    keys, values = torch.randn(B, H, S, dim, generator=g), torch.randn(B, H, S, dim, generator=g)
    kv = PagedKV(B, H, dim, dim, torch.float32, "cpu", block=block)
    kv.resize(S)
    kv.write(torch.arange(S).expand(B, H, S).contiguous(), keys, values)
    kv.release_empty(live)
    return kv, keys, values


def test_attention_over_held_blocks_equals_dense_masked_attention():
    g = torch.Generator().manual_seed(1)
    B, H, M, S = 3, 2, 5, 32
    live = torch.rand(B, H, S, generator=g) < 0.3
    live[:, :, 0] = True
    live[1, 0] = False  # a row holding nothing reads nothing (zeros), as a padding row would
    kv, keys, values = filled(live)
    assert kv.held_blocks == int(live.view(B, H, -1, 4).any(-1).sum())  # empty blocks went back
    visible = live[:, :, None, :] & (torch.rand(B, H, M, S, generator=g) < 0.8)
    visible[..., 0] |= live[..., 0, None]
    q = torch.randn(B, H, M, 8, generator=g)
    out, weights = attend_blocks(kv, q, visible, 0.3, weights=True)
    bias = torch.zeros(live.shape).masked_fill(~live, float("-inf"))[:, :, None, :]  # decode's additive mask
    one, _ = attend_blocks(kv, q[:, :, :1], bias, 0.3)  # a decode query reads every live slot
    some = live.any(-1)
    assert torch.allclose(one[some], dense_attention(q[:, :, :1], keys, values, live[:, :, None, :], 0.3)[some], atol=1e-5)
    ref = dense_attention(q, keys, values, visible, 0.3)
    seen = visible.any(-1)
    assert torch.allclose(out[seen], ref[seen], atol=1e-5)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    rows, _ = kv.owners()
    per_row = torch.zeros(B * H + 1, M).index_add_(0, rows, weights.sum(-1))[:-1]
    assert torch.allclose(per_row[seen.view(B * H, M)], torch.ones(int(seen.sum())), atol=1e-5)


def test_rows_join_and_leave_without_leaking_blocks():
    """1,000 sequences join one at a time and the oldest leave: blocks are returned and reused, the
    storage stops growing, and every remaining row still reads back its own tokens."""
    g = torch.Generator().manual_seed(2)
    H, S, D = 2, 16, 4
    batch = PagedKV(0, H, D, D, torch.float32, "cpu", block=4)
    batch.resize(S)
    data, sizes = [], []
    for i in range(1000):
        n = int(torch.randint(1, S + 1, (1,), generator=g))
        one = PagedKV(1, H, D, D, torch.float32, "cpu", block=4)
        one.resize(S)
        keys = torch.randn(1, H, n, D, generator=g)
        one.write(torch.arange(n).expand(1, H, n).contiguous(), keys, -keys)
        batch.append_rows(one)
        data.append(keys)
        if batch.table.shape[0] > 6:
            batch.take_rows(torch.arange(1, batch.table.shape[0]))
            data.pop(0)
        sizes.append(batch.pool.total)
    assert batch.held_blocks == sum(-(-d.shape[2] // 4) * H for d in data)
    assert max(sizes) <= 7 * H * S // 4  # never more than 7 full rows (a join comes before a leave)
    keys, values = batch.dense()
    for row, d in enumerate(data):
        assert torch.equal(keys[row, :, : d.shape[2]], d[0]) and torch.equal(values[row, :, : d.shape[2]], -d[0])


def test_a_budgeted_pool_refuses_with_the_fix():
    pool = BlockPool(limit=2)
    assert pool.allocate(2)[0] == [0, 1] and not pool.can_allocate(1)
    try:
        pool.allocate(1)
    except Exception as e:  # noqa: BLE001
        assert "raise the memory budget" in str(e)
    else:
        raise AssertionError("a full pool allocated")
    pool.release([1])
    assert pool.allocate(1) == ([1], 0)
