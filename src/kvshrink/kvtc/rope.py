"""Undo and redo RoPE on keys, so KVTC stores (and its PCA sees) keys free of their positions.

RoPE rotates each half-split pair (x1, x2) = (x[:D/2], x[D/2:]) by a position angle, and the model's
`rotary_emb` may scale cos and sin by a common attention factor a (YaRN, LongRoPE):

    apply:  y = x·cos + rotate_half(x)·sin       i.e.  y1 = a(x1 c − x2 s),  y2 = a(x2 c + x1 s)
    undo:   x = (y·cos − rotate_half(y)·sin) / (cos² + sin²)

since y·cos − rotate_half(y)·sin = a²·x (rotation by −θ after rotation by +θ) and cos² + sin² = a².
The inverse is therefore exact for any scaling; only fp32 rounding remains (~1e-7 relative).
"""

from __future__ import annotations

import torch

from ..attention import apply_rope, rotate_half

redo_rope = apply_rope  # the model's own rotation, so undo/redo match it bit for bit


def undo_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """y: (B, H, T, D) post-RoPE keys; cos, sin: (B, T, D) as from the model's rotary embedding."""
    cos, sin = cos[:, None], sin[:, None]
    return (y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)


def rope_tables(rotary_emb: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, T, D) in fp32 for absolute `positions` (T,), e.g. from `model.model.rotary_emb`."""
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)  # only its dtype/device are read
    return rotary_emb(probe, positions.reshape(1, -1))
