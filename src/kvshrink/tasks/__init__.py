"""Synthetic reasoning tasks with exact answers: generators (seed, difficulty), brute-force solvers and
graders that read the final answer after the `Answer:` marker of free-form output.

Every task module defines `DEFAULT_DIFFICULTY`, `MAX_DIFFICULTY`, `generate(rng, difficulty) -> Problem` and
`solve(facts) -> answer` (the brute-force solver, from the problem's stated facts alone), and `FACTS`, a
regex matching the prompt's fact sentences, those the answer depends on (`fact_spans`). A problem's
`solution` is the worked answer (the chain of thought, then the marker line) that fine-tuning
teaches; `grade` compares the extracted answer with `answer` exactly.
"""

from __future__ import annotations

import random
import re

from ..errors import KVShrinkError
from . import arith, hops, niah, vt
from .common import Problem, extract_answer

TASKS = {"arith": arith, "vt": vt, "niah": niah, "hops": hops}


def task_module(name: str):
    if name not in TASKS:
        raise KVShrinkError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def make_problems(name: str, n: int, seed: int = 0, difficulty: int | None = None, first: int = 0) -> list[Problem]:
    """Problems `first` .. `first + n - 1` of task `name`; the same (name, seed, difficulty) always gives
    the same problems, and problem i does not depend on n or on how the range is split."""
    mod = task_module(name)
    d = mod.DEFAULT_DIFFICULTY if difficulty is None else difficulty
    if not 1 <= d <= mod.MAX_DIFFICULTY:
        raise KVShrinkError(f"--difficulty must be >= 1 and at most {mod.MAX_DIFFICULTY} for {name} (got {d})")
    if n < 1:
        raise KVShrinkError(f"--problems must be >= 1 (got {n})")
    if first < 0:
        raise KVShrinkError(f"--first must be >= 0 (got {first})")
    return [mod.generate(random.Random(f"{name}/{seed}/{d}/{i}"), d) for i in range(first, first + n)]


def fact_spans(problem: Problem) -> list[tuple[int, int]]:
    """Character spans [start, end) of `problem.prompt` that state facts the answer depends on (`vt`'s
    assignments, `niah`'s key-value sentences, `hops`' links, `arith`'s start value and operations);
    the rest of the prompt is filler, instructions and the question. Used to judge whether an eviction
    policy keeps what matters (`kvshrink inspect --task`)."""
    return [m.span() for m in re.finditer(task_module(problem.task).FACTS, problem.prompt)]


def answer_budget(tokenizer, problems: list[Problem]) -> int:
    """Default generation length for a set of problems: room for twice the longest worked solution."""
    return 16 + 2 * max(len(tokenizer(p.solution)["input_ids"]) for p in problems)


def grade(problem: Problem, output: str) -> bool:
    """True when the answer after the last `Answer:` in `output` equals the problem's answer."""
    return extract_answer(output, problem.kind) == problem.answer


__all__ = ["TASKS", "Problem", "answer_budget", "fact_spans", "make_problems", "grade", "task_module", "extract_answer"]
