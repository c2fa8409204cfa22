"""`vt`: variable tracking (RULER). Chains of assignments hide among filler; which variables end up
holding the asked value?

    VAR QPWEN = 51231. ... VAR BKRTS = QPWEN. ... VAR ZLMOA = BKRTS. ...
    Find all variables that hold the value 51231.
    QPWEN = 51231 / BKRTS = QPWEN / ZLMOA = BKRTS / Answer: QPWEN BKRTS ZLMOA

difficulty = assignments per chain (the asked chain and one distractor chain with another value);
the filler brings the context to about `context_tokens(difficulty)` tokens (>= 512 by default).
"""

from __future__ import annotations

import string

from .common import MARKER, Problem, scatter

DEFAULT_DIFFICULTY = 4  # assignments per chain
MAX_DIFFICULTY = 100  # ~7K tokens of context
ANSWER_KIND = "set"
SENTENCE_TOKENS = 6  # filler sentences are ~6 tokens each with common BPE tokenizers
FACTS = r"VAR [A-Z]+ = \w+\."  # the assignments


def context_tokens(difficulty: int) -> int:
    return 512 + 64 * difficulty


def _names(rng, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def generate(rng, difficulty: int) -> Problem:
    names = _names(rng, 2 * difficulty)
    value, other = rng.sample(range(10_000, 100_000), 2)
    chains = [names[:difficulty], names[difficulty:]]
    statements = []
    for chain, v in zip(chains, (value, other)):
        statements.append([f"VAR {chain[0]} = {v}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])])
    # interleave the two chains, each in its own order
    merged, queues = [], [list(s) for s in statements]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop(0))
    text = scatter(merged, context_tokens(difficulty) // SENTENCE_TOKENS, rng)
    prompt = (f"Memorize the variable assignments in the text below.\n\n{text}\n\n"
              f"Question: find all variables that hold the value {value}.")
    chain = chains[0]
    lines = [f"{chain[0]} = {value}"] + [f"{b} = {a}" for a, b in zip(chain, chain[1:])]
    facts = {"statements": merged, "value": value}
    return Problem("vt", difficulty, prompt, "\n".join(lines) + f"\n{MARKER} {' '.join(chain)}", solve(facts), ANSWER_KIND, facts)


def solve(facts: dict) -> frozenset:
    """Propagate every assignment in order; keep the variables whose value is the asked one."""
    values: dict[str, int] = {}
    for s in facts["statements"]:
        name, rhs = s[len("VAR "):].rstrip(".").split(" = ")
        values[name] = int(rhs) if rhs.isdigit() else values[rhs]
    return frozenset(n for n, v in values.items() if v == facts["value"])
