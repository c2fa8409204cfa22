"""`paged_decode`: one decode query group per (sequence, KV head) attending the live slots of the blocks its
block table holds. A registered op, so that torch.compile keeps it whole and CUDA graphs capture its launches:
on CUDA it runs the Triton kernel (`decode_triton`), which reads only live blocks; elsewhere (CPU, or no
Triton) plain torch over every table entry, fixed shapes and no host sync, which is what a CPU step can use.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def paged_decode_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                       table: torch.Tensor, nblocks: torch.Tensor, scale: float) -> torch.Tensor:
    """`paged_decode` in plain torch: every logical block of the table gathered (held or not), then masked."""
    B, H, G, _ = q.shape
    W, page = table.shape[-1], keys.shape[1]
    held = (table >= 0) & (torch.arange(W, device=q.device) < nblocks[..., None])
    physical = table.clamp(min=0).long()
    k = keys[physical].view(B, H, W * page, -1)
    v = values[physical].view(B, H, W * page, -1)
    live = (valid[physical] & held[..., None]).view(B, H, 1, W * page)
    scores = ((q @ k.mT).float() * scale).masked_fill(~live, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = top.masked_fill(torch.isinf(top), 0.0)  # a row with nothing live gets zeros, not NaN
    probs = torch.exp(scores - top)
    total = probs.sum(-1, keepdim=True).clamp(min=1e-30)
    return ((probs.to(v.dtype) @ v).float() / total).to(q.dtype)


@torch.library.custom_op("kvshrink::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, table: torch.Tensor,
                 nblocks: torch.Tensor, scale: float, splits: int) -> torch.Tensor:
    """q (B, Hkv, G, D): each KV head's query group; keys (blocks, page, D), values (blocks, page, Dv), valid
    (blocks, page) bool: the layer's pool; table (B, Hkv, W) int32 physical block per logical block (-1: none);
    nblocks (B, Hkv) int32: leading logical blocks to read; splits: programs per row (split-K, CUDA only).
    Returns (B, Hkv, G, Dv); softmax in fp32; a row with no live slot gives zeros."""
    if q.is_cuda and triton_available():
        from .decode_triton import paged_decode_triton

        return paged_decode_triton(q, keys, values, valid, table, nblocks, scale, splits)
    return paged_decode_torch(q, keys, values, valid, table, nblocks, scale)


@paged_decode.register_fake
def _(q, keys, values, valid, table, nblocks, scale, splits):
    return q.new_empty(*q.shape[:-1], values.shape[-1])
