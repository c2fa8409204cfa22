"""Decode attention over per-(sequence, KV head) block tables, in Triton (flash-decoding over pages).

One program reads one split of one (sequence, KV head) row's held blocks for the row's whole query group
(the G query heads of a KV head share every key and value load), keeping an online softmax in fp32; a
second pass merges the splits by their log-sum-exp. Only the row's own leading `nblocks` logical blocks are
visited, a block absent from the table (-1) or a slot not live in the validity map is skipped, so a
partially live block costs only its live slots' loads. A row with no live slot gets zeros.
Split-K: the row's blocks are divided among `splits` programs, so a few long rows still fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PAGES_PER_TILE = 4  # blocks gathered per inner step: 64 tokens at block 16


@triton.jit
def _partial(Q, K, V, VALID, TABLE, NBLOCKS, ACC, M, L, scale, W,
             SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
             D: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr, PAGES: tl.constexpr):
    row = tl.program_id(0)  # b * Hkv + h
    split = tl.program_id(1)
    n = tl.load(NBLOCKS + row)
    per = tl.cdiv(n, SPLITS)
    start = split * per
    end = tl.minimum(start + per, n)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(Q + (row * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, DV), tl.float32)

    tok = tl.arange(0, PAGES * PAGE)
    for first in range(start, end, PAGES):
        logical = first + tok // PAGE
        inside = logical < end
        physical = tl.load(TABLE + row * W + logical, mask=inside, other=-1)
        slot = physical.to(tl.int64) * PAGE + tok % PAGE
        live = inside & (physical >= 0)
        live = live & (tl.load(VALID + slot, mask=live, other=0) != 0)
        k = tl.load(K + slot[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_G, tokens), fp32
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing live yet: keep exp() finite
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m - shift)
        v = tl.load(V + slot[:, None] * DV + dv[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, 1)
        m = m_new

    out = (row * SPLITS + split) * G + g
    tl.store(ACC + out[:, None] * DV + dv[None, :], acc, mask=(g < G)[:, None])
    tl.store(M + out, m, mask=g < G)
    tl.store(L + out, l, mask=g < G)


@triton.jit
def _merge(ACC, M, L, OUT, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, G: tl.constexpr, DV: tl.constexpr):
    head = tl.program_id(0)  # (b * Hkv + h) * G + g
    row, g = head // G, head % G
    s = tl.arange(0, SPLITS_P2)
    dv = tl.arange(0, DV)
    at = (row * SPLITS + s) * G + g
    m = tl.load(M + at, mask=s < SPLITS, other=float("-inf"))
    l = tl.load(L + at, mask=s < SPLITS, other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)  # 0 for a split that saw nothing
    acc = tl.load(ACC + at[:, None] * DV + dv[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.maximum(total, 1e-30)  # a row with nothing live: 0 / 1e-30 = 0
    tl.store(OUT + head * DV + dv, out.to(OUT.dtype.element_ty))


def paged_decode_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                        table: torch.Tensor, nblocks: torch.Tensor, scale: float, splits: int = 1) -> torch.Tensor:
    """q (B, Hkv, G, D); keys (blocks, page, D), values (blocks, page, Dv); valid (blocks, page) bool;
    table (B, Hkv, W) int32 physical block of each logical block (-1: none); nblocks (B, Hkv) int32 leading
    logical blocks to read. Returns (B, Hkv, G, Dv) in q's dtype."""
    B, H, G, D = q.shape
    page, DV, W = keys.shape[1], values.shape[-1], table.shape[-1]
    rows = B * H
    acc = torch.empty(rows * splits * G, DV, dtype=torch.float32, device=q.device)
    m = torch.empty(rows * splits * G, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _partial[(rows, splits)](
        q.contiguous(), keys, values, valid.view(torch.uint8), table.contiguous(), nblocks.contiguous(), acc, m, l,
        scale, W, SPLITS=splits, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, DV=DV, PAGE=page,
        PAGES=PAGES_PER_TILE)
    out = torch.empty(B, H, G, DV, dtype=q.dtype, device=q.device)
    _merge[(rows * G,)](acc, m, l, out, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), G=G, DV=DV)
    return out
