"""`arith`: a running total through `difficulty` operations, solved by writing one line per step.

    Start with 7. Then add 5, multiply by 3, subtract 4, ... What is the result?
    7 + 5 = 12 / 12 * 3 = 36 / 36 - 4 = 32 / Answer: 32

Values stay in [0, 99] and operands are single digits (operations are drawn among those that keep the
value in range), so every step is a small computation a 135M-parameter model can learn to do reliably,
and a longer chain simply needs more of them: accuracy falls with length, which longer or more
numerous samples can win back. (With values up to 999 and two-digit operands, the tuned 135M model got
most carries wrong: 2 of 20 problems right at 4 steps.)
"""

from __future__ import annotations

from .common import MARKER, Problem

DEFAULT_DIFFICULTY = 4  # steps
MAX_DIFFICULTY = 100
ANSWER_KIND = "int"
MAX_VALUE = 99
WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}
FACTS = r"Start with \d+\. Then [a-z0-9 ,]+\."  # the start value and the operations


def _apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def generate(rng, difficulty: int) -> Problem:
    value = start = rng.randint(1, MAX_VALUE)
    steps = []
    for _ in range(difficulty):
        choices = [("+", rng.randint(1, 9)), ("-", rng.randint(1, 9)), ("*", rng.randint(2, 3))]
        legal = [(op, x) for op, x in choices if 0 <= _apply(value, op, x) <= MAX_VALUE]
        op, x = rng.choice(legal)  # never empty: "+" is legal up to 90, "-" from 9
        steps.append((op, x))
        value = _apply(value, op, x)
    ops = ", ".join(f"{WORDS[op]} {x}" for op, x in steps)
    prompt = f"Start with {start}. Then {ops}. What is the result? Work it out step by step."
    lines, v = [], start
    for op, x in steps:
        lines.append(f"{v} {op} {x} = {_apply(v, op, x)}")
        v = _apply(v, op, x)
    facts = {"start": start, "steps": steps}
    return Problem("arith", difficulty, prompt, "\n".join(lines) + f"\n{MARKER} {v}", solve(facts), ANSWER_KIND, facts)


def solve(facts: dict) -> int:
    value = facts["start"]
    for op, x in facts["steps"]:
        value = _apply(value, op, x)
    return value
