"""What every task shares: the problem record, filler text and answer extraction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MARKER = "Answer:"

# Neutral filler (as RULER's): carries no facts, so it can never make a problem ambiguous.
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@dataclass
class Problem:
    task: str
    difficulty: int
    prompt: str  # the user's message
    solution: str  # the worked answer: chain of thought, then "Answer: ..."
    answer: object  # int, or frozenset / tuple of strings (see `kind`)
    kind: str  # how to read the answer: "int" | "set" | "list"
    facts: dict = field(repr=False, default_factory=dict)  # what the brute-force solver reads


def filler(n_sentences: int) -> list[str]:
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    return [sentences[i % len(sentences)] for i in range(n_sentences)]


def scatter(facts: list[str], n_filler: int, rng, keep_order: bool = True) -> str:
    """Facts placed at random positions among `n_filler` filler sentences (in their order if keep_order)."""
    body = filler(n_filler)
    slots = sorted(rng.sample(range(n_filler + len(facts)), len(facts)))
    order = facts if keep_order else rng.sample(facts, len(facts))
    for slot, fact in zip(slots, order):
        body.insert(slot, fact)
    return " ".join(body)


def extract_answer(output: str, kind: str):
    """The answer after the last marker; None if there is none or it does not parse."""
    at = output.rfind(MARKER)
    if at < 0:
        return None
    text = output[at + len(MARKER):].strip().splitlines()[0] if output[at + len(MARKER):].strip() else ""
    if kind == "int":
        m = re.fullmatch(r"\s*(-?\d+)\s*\.?\s*", text)
        return int(m.group(1)) if m else None
    items = [t for t in re.split(r"[,\s]+", text.strip().rstrip(".")) if t]
    if not items:
        return None
    return frozenset(items) if kind == "set" else tuple(items)
