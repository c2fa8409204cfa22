"""The retrofit's losses: KL(student || teacher) and the compression term, with their weights and noise.

The paper's objective: loss = KL(student || teacher) averaged over tokens + mean over sequences of
clamp(target flag rate - mean hard flag, 0), the flag rate aimed at being 1 - 1/CR (`flag_rate_for` keeps
the older reads-based aim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CR_LOSSES = ("one-sided", "two-sided", "squared")


def flag_rate_for(cr: float, window: int, context: int) -> float:
    """Eviction-flag rate that makes a query at `context` read context / cr tokens (window included)."""
    if context <= window:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (context / cr - window) / (context - window)))


def compression_loss(flag_rate: torch.Tensor, target: float, kind: str = "one-sided", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over sequences of max(0, target - rate) (the paper: only too little eviction is penalized), or
    of |target - rate|: with a frozen base and a small window the KL barely resists extra eviction, so the
    one-sided loss lets the rate drift past the target; the two-sided one holds it there. But |gap| pushes
    every flag of a sequence up or down with the same unit force even at the target, which drowns the KL's
    token-by-token signal of what to keep; "squared", (target - rate)^2 scaled so that a gap of 0.1 pulls
    as hard as |gap|, holds the rate near the target and fades there.

    weights (B,) scale each sequence's term (`length_weights`): a short problem holds little memory, and
    the target rate, aimed at long contexts, would make it evict the few tokens it needs."""
    gap = target - flag_rate
    term = {"one-sided": gap.clamp(min=0), "two-sided": gap.abs(), "squared": 5.0 * gap.square()}[kind]
    return (term if weights is None else term * weights).mean()


def length_weights(live: torch.Tensor, aim_context: int) -> torch.Tensor:
    """(B,) min(1, real tokens / aim_context): a sequence's share of a full context's memory."""
    return (live.sum(-1).float() / aim_context).clamp(max=1.0)


def kl_student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens (weighted by `weights` (B, T), if given: 0 for padding) of
    KL(student || teacher) = sum_v p_s (log p_s - log p_t)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (s.exp() * (s - t)).sum(-1)
    return kl.mean() if weights is None else (kl * weights).sum() / weights.sum()


def token_weights(live: torch.Tensor, answer_start: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """(B, T) KL weights: 0 for padding, `answer_weight` from each block's answer start on, 1 before.
    With a frozen base, evicting a prompt's facts barely moves the KL of the filler around them; only the
    answer's tokens depend on them, so weighting the answer up makes keeping them worth its budget."""
    answer = torch.arange(live.shape[1], device=live.device)[None] >= answer_start[:, None].to(live.device)
    return live * torch.where(answer, answer_weight, 1.0)


def noise_for(seed: int, step: int, global_indices: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """U(0,1) draws (L, B, Hkv, T) for the Gumbel-sigmoid, one generator per (step, global sample)."""
    draws = []
    for g in global_indices:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + g)
        draws.append(torch.rand(shape, generator=gen))
    return torch.stack(draws, dim=1)
