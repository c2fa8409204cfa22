"""Delayed-eviction attention mask for full-sequence forwards (training, and the dense reference).

Query i sees key j <= i with additive bias 0 when i - j <= w, otherwise log(1 - p_{j+1}), where p_{j+1} is
the eviction probability predicted at token j+1 (the decision at t+1 marks token t). With hard decisions,
log(1 - p) is 0 or -inf. The mask is per KV head and shared by the query heads of its group.

Cost: it materialises a (B, Hkv, T, T) float mask, so SDPA runs its masked kernel and memory grows as T^2;
fine for training windows (T <= a few thousand), not for long prefill, which goes through the cache.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def delayed_eviction_bias(log_keep: torch.Tensor, window: int) -> torch.Tensor:
    """log_keep: (B, Hkv, T), log(1 - p) for the decision that marks each key (0 = keep).
    Returns the additive mask (B, Hkv, T, T)."""
    T = log_keep.shape[-1]
    idx = torch.arange(T, device=log_keep.device)
    dist = idx[:, None] - idx[None, :]  # (T, T): i - j
    bias = torch.where(dist > window, log_keep[:, :, None, :], torch.zeros((), dtype=log_keep.dtype, device=log_keep.device))
    return bias.masked_fill(dist < 0, float("-inf"))


def soft_log_keep(z: torch.Tensor) -> torch.Tensor:
    """Training: z (B, Hkv, T) noisy tempered logits at each position -> log(1 - p) for the key each one marks."""
    return shift_to_marked_token(F.logsigmoid(-z), fill=0.0)


def hard_log_keep(evict: torch.Tensor) -> torch.Tensor:
    """Inference: evict (B, Hkv, T) bool decisions at each position -> 0 / -inf for the key each one marks."""
    log_keep = torch.zeros(evict.shape, dtype=torch.float32, device=evict.device).masked_fill(evict, float("-inf"))
    return shift_to_marked_token(log_keep, fill=0.0)


def shift_to_marked_token(x: torch.Tensor, fill: float) -> torch.Tensor:
    """The value computed at position t+1 belongs to token t; the last token has no decision yet."""
    return F.pad(x[..., 1:], (0, 1), value=fill)


def sink_tokens(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """(B, T) bool: each row's first `sinks` real tokens, which are never evicted. valid: (B, T) real
    (non-padding) tokens."""
    return valid & (valid.cumsum(-1) <= sinks)


def flex_delayed_eviction_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_keep: torch.Tensor, window: int,
                                    scale: float) -> torch.Tensor:
    """The same attention as `delayed_eviction_bias` + SDPA, without materialising any T x T tensor: a
    flex_attention score_mod adds log_keep[key] to the scores of keys more than `window` behind the query,
    and a causal block mask skips the blocks above the diagonal (as the authors' release trains).
    The gradient reaches log_keep through the score_mod. q: (B, H, T, D); k, v: (B, Hkv, T, D);
    log_keep: (B, Hkv, T). Compiled on CUDA (the fused kernel); eager elsewhere (a reference for tests).
    """
    from torch.nn.attention.flex_attention import flex_attention

    group = q.shape[1] // k.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.where(q_idx - kv_idx > window, log_keep[b, h // group, kv_idx], 0.0)

    block_mask = _causal_block_mask(q.shape[2], q.device)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)
    with warnings.catch_warnings():  # eager on purpose: it warns that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


_FLEX: dict = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _causal_block_mask(length: int, device):
    key = (length, str(device))
    if key not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        _FLEX[key] = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, length, length, device=device)
    return _FLEX[key]
