"""The paged decode kernels against a dense masked attention in plain torch: the Triton kernel under
TRITON_INTERPRET=1 (on the CPU; skipped without Triton) and the torch op the CPU step runs."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined: run the Triton kernels on the CPU

import pytest
import torch

from kvshrink.kernels.paged import paged_decode_torch


def dense_reference(q, keys, values, live, scale):
    """q (B, H, G, D) against dense keys/values (B, H, S, D) where live (B, H, S): softmax in float64; zeros
    for a row that sees nothing."""
    scores = torch.einsum("bhgd,bhsd->bhgs", q.double(), keys.double()) * scale
    scores = scores.masked_fill(~live[:, :, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ values.double()


def paged_case(B=2, H=3, G=4, D=64, S=160, page=16, dtype=torch.float32, seed=0):
    """A dense case and the same keys/values scattered into a shuffled block pool. Some logical blocks are
    not held (-1), held blocks are partially live, unused pool blocks and dead slots hold large garbage, each
    row reads only its leading `nblocks` blocks; row (0, 0) holds nothing and row (0, 1) holds blocks with no
    live slot: both must give zeros."""
    g = torch.Generator().manual_seed(seed)
    W = S // page
    keys = torch.randn(B, H, S, D, generator=g)
    values = torch.randn(B, H, S, D, generator=g)
    nblocks = torch.randint(1, W + 1, (B, H), generator=g, dtype=torch.int32)
    nblocks[0, 0] = 0
    held = (torch.rand(B, H, W, generator=g) < 0.8) & (torch.arange(W) < nblocks[..., None])
    live = (torch.rand(B, H, S, generator=g) < 0.6) & held.repeat_interleave(page, -1)
    live[0, 1] = False
    n_held = int(held.sum())
    blocks = n_held + 5  # spare blocks the table never names
    ids = torch.randperm(blocks, generator=g)[:n_held].to(torch.int32)
    table = torch.full((B, H, W), -1, dtype=torch.int32)
    table[held] = ids
    pool_k = torch.full((blocks, page, D), 50.0)
    pool_v = torch.full((blocks, page, D), 50.0)
    valid = torch.rand(blocks, page, generator=g) < 0.5  # garbage validity where the table points nowhere
    b, h, w = held.nonzero(as_tuple=True)
    pool_k[table[b, h, w].long()] = keys.view(B, H, W, page, D)[b, h, w]
    pool_v[table[b, h, w].long()] = values.view(B, H, W, page, D)[b, h, w]
    valid[table[b, h, w].long()] = live.view(B, H, W, page)[b, h, w]
    pool_k = torch.where(valid[..., None], pool_k, torch.full_like(pool_k, 50.0))  # dead slots hold garbage
    q = torch.randn(B, H, G, D, generator=g)
    scale = D ** -0.5
    expected = dense_reference(q, keys, values, live, scale)
    paged = (q.to(dtype), pool_k.to(dtype), pool_v.to(dtype), valid, table, nblocks, scale)
    return paged, expected


@pytest.mark.parametrize("G", [1, 4, 5])
def test_torch_op_equals_dense(G, one_thread):
    paged, expected = paged_case(G=G)
    got = paged_decode_torch(*paged)
    assert not got.isnan().any()
    assert (got.double() - expected).abs().max() < 1e-5
    assert got[0, 0].abs().max() == 0 and got[0, 1].abs().max() == 0


@pytest.mark.parametrize("G,D,page,splits", [(4, 64, 16, 1), (4, 64, 16, 3), (5, 32, 8, 2), (1, 128, 16, 4)])
def test_triton_kernel_equals_dense(G, D, page, splits, one_thread):
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'kvshrink[gpu]')")
    from kvshrink.kernels.decode_triton import paged_decode_triton

    paged, expected = paged_case(G=G, D=D, page=page, S=20 * page)
    got = paged_decode_triton(*paged, splits=splits)
    assert got.shape == expected.shape and not got.isnan().any()
    assert (got.double() - expected).abs().max() < 1e-5
    assert got[0, 0].abs().max() == 0 and got[0, 1].abs().max() == 0


def test_triton_kernel_in_half_precision(one_thread):
    """float16 here: the interpreter's tl.dot misreads bfloat16 (Triton 3.9); the GPU benchmark checks bfloat16."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'kvshrink[gpu]')")
    from kvshrink.kernels.decode_triton import paged_decode_triton

    paged, expected = paged_case(G=4, D=64, dtype=torch.float16, seed=1)
    got = paged_decode_triton(*paged, splits=2)
    assert got.dtype == torch.float16
    assert (got.double() - expected).abs().max() < 5e-3
