"""`hops`: follow a pointer chain for `difficulty` hops, writing each hop.

    Links: box 17 points to box 42. box 3 points to box 8. ...
    Question: start at box 17 and follow 3 links. Which box do you reach?
    box 17 -> box 42 / box 42 -> box 5 / box 5 -> box 61 / Answer: 61

Every box has exactly one outgoing link (a random function on the boxes, no cycle on the asked path),
so the answer is unambiguous; links are listed in random order among light filler.
"""

from __future__ import annotations

import re

from .common import MARKER, Problem, scatter

DEFAULT_DIFFICULTY = 3
MAX_DIFFICULTY = 9  # 24 + 8 d boxes, labelled 1-99
ANSWER_KIND = "int"
SENTENCE_TOKENS = 6
LINK = re.compile(r"box (\d+) points to box (\d+)\.")
FACTS = LINK.pattern  # the links


def n_boxes(difficulty: int) -> int:
    return 24 + 8 * difficulty


def generate(rng, difficulty: int) -> Problem:
    n = n_boxes(difficulty)
    labels = rng.sample(range(1, 100), n)
    path = labels[:difficulty + 1]  # distinct boxes: no cycle on the asked path
    link = {a: b for a, b in zip(path, path[1:])}
    for box in labels:
        if box not in link:
            link[box] = rng.choice([b for b in labels if b != box])
    sentences = [f"box {a} points to box {b}." for a, b in link.items()]
    text = scatter(sentences, (256 + 32 * difficulty) // SENTENCE_TOKENS, rng, keep_order=False)
    prompt = f"Links:\n{text}\n\nQuestion: start at box {path[0]} and follow {difficulty} links. Which box do you reach?"
    facts = {"links": sentences, "start": path[0], "hops": difficulty}
    lines = [f"box {a} -> box {b}" for a, b in zip(path, path[1:])]
    return Problem("hops", difficulty, prompt, "\n".join(lines) + f"\n{MARKER} {path[-1]}", solve(facts), ANSWER_KIND, facts)


def solve(facts: dict) -> int:
    links = {int(a): int(b) for s in facts["links"] for a, b in [LINK.fullmatch(s).groups()]}
    box = facts["start"]
    for _ in range(facts["hops"]):
        box = links[box]
    return box
