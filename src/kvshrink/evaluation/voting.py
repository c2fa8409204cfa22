"""Majority vote over W samples' extracted answers (self-consistency)."""

from __future__ import annotations

from collections import Counter


def majority_vote(answers: list):
    """The most frequent non-missing answer; ties go to the one seen first. None if all are missing."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
