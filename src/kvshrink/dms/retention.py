"""DMS eviction decisions: one logit per (token, KV head), flag 1 = evict.

Two predictors (docs/conventions.md):
- neuron (the paper): the last channel of the first query head of each KV group, read after q-norm and
  before RoPE, logit = 100 * q - 5. The channel is zeroed so it takes no part in q.k.
- adapter (the authors' release): logit = 100 * Linear(RMSNorm(h)) - 5 on the residual stream h before
  the layer's input norm, Linear zero-initialised so that P(evict) starts at sigmoid(-5).
Training uses a Gumbel-sigmoid (logistic noise, temperature tau) with a straight-through hard flag;
inference evicts iff logit > 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DMSConfig


def neuron_logits(q: torch.Tensor, n_kv_heads: int, cfg: DMSConfig) -> torch.Tensor:
    """q: (B, H, T, D) after q-norm, before RoPE -> logits (B, Hkv, T) from the last channel of the
    first query head of every KV group. The caller removes that channel from q (`borrowed_channel_keep`)
    before RoPE and again after it."""
    group = q.shape[1] // n_kv_heads
    return q[:, ::group, :, -1] * cfg.alpha_scale - cfg.alpha_offset


def borrowed_channel_keep(n_heads: int, n_kv_heads: int, head_dim: int, dtype, device) -> torch.Tensor:
    """A (1, H, 1, D) multiplier that is 0 on the borrowed channel and 1 elsewhere (no in-place edits, so autograd is happy)."""
    keep = torch.ones(1, n_heads, 1, head_dim, dtype=dtype, device=device)
    keep[:, :: n_heads // n_kv_heads, :, -1] = 0
    return keep


def adapter_logits(norm: nn.Module, proj: nn.Linear, residual: torch.Tensor, cfg: DMSConfig) -> torch.Tensor:
    """residual: (B, T, hidden) before the input norm -> logits (B, Hkv, T)."""
    return (proj(norm(residual)) * cfg.alpha_scale - cfg.alpha_offset).transpose(1, 2)


def forced_logits(position_ids: torch.Tensor, n_kv_heads: int, keep_every: int) -> torch.Tensor:
    """Mechanics only: evict all but one token in `keep_every`, staggered across KV heads.

    position_ids: (B, T). The decision at position t marks token t-1, so token p is kept iff
    (p + 1 + 3*head) % keep_every == 0. Returns +/-1 logits (B, Hkv, T).
    """
    heads = torch.arange(n_kv_heads, device=position_ids.device)[None, :, None]
    kept = (position_ids[:, None, :] + 3 * heads) % keep_every == 0
    return torch.where(kept, -1.0, 1.0)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training gate. Returns (z, hard): z = (logit + logistic noise) / tau, p = sigmoid(z), and the
    straight-through hard flag 1[p > 0.5] whose gradient is that of p.

    uniform: U(0,1) samples of logits' shape; pass seeded ones to make the noise reproducible.
    """
    if uniform is None:
        uniform = torch.rand_like(logits, dtype=torch.float32)
    u = uniform.clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # logistic = Gumbel - Gumbel
    z = (logits.float() + noise) / tau
    p = torch.sigmoid(z)
    hard = (p > 0.5).to(p.dtype) - p.detach() + p
    return z, hard
