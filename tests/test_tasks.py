"""Task generators, brute-force solvers and graders (kvshrink.tasks)."""

from __future__ import annotations

import collections
import re
import subprocess
import sys

import pytest

from kvshrink.errors import KVShrinkError
from kvshrink.tasks import TASKS, Problem, extract_answer, grade, make_problems
from kvshrink.tasks import arith, hops, niah, vt


def problem(kind, answer) -> Problem:
    return Problem("x", 1, "", "", answer, kind)


def test_arith_solver_and_grader_on_a_hand_written_case():
    assert arith.solve({"start": 7, "steps": [("+", 5), ("*", 3), ("-", 4)]}) == 32
    p = problem("int", 32)
    assert grade(p, "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nAnswer: 32")
    assert grade(p, "Answer: 30\nwait, Answer: 32.")  # the last marker counts
    assert not grade(p, "Answer: 31") and not grade(p, "the result is 32") and not grade(p, "Answer: 32 or 33")


def test_vt_solver_and_grader_on_a_hand_written_case():
    statements = ["VAR AAAAA = 12345.", "VAR CCCCC = 55555.", "VAR BBBBB = AAAAA.", "VAR DDDDD = CCCCC.", "VAR EEEEE = BBBBB."]
    assert vt.solve({"statements": statements, "value": 12345}) == {"AAAAA", "BBBBB", "EEEEE"}
    p = problem("set", frozenset({"AAAAA", "BBBBB", "EEEEE"}))
    assert grade(p, "Answer: EEEEE, AAAAA BBBBB") and not grade(p, "Answer: AAAAA BBBBB")
    assert not grade(p, "Answer: AAAAA BBBBB EEEEE DDDDD")


def test_niah_solver_and_grader_on_hand_written_cases():
    sentences = ["The special magic number for red-fox is 11111.", "The special magic number for blue-owl is 22222.",
                 "The special magic number for red-fox is 33333.", "The special magic number for tan-cat is 44444."]
    assert niah.solve({"sentences": sentences, "asked": ["tan-cat", "blue-owl"]}) == ("44444", "22222")
    assert niah.solve({"sentences": sentences, "asked": ["red-fox"]}) == ("11111", "33333")  # multi-value
    p = problem("list", ("44444", "22222"))
    assert grade(p, "tan-cat: 44444\nblue-owl: 22222\nAnswer: 44444 22222")
    assert not grade(p, "Answer: 22222 44444") and not grade(p, "Answer: 44444")


def test_hops_solver_and_grader_on_a_hand_written_case():
    links = ["box 1 points to box 5.", "box 5 points to box 9.", "box 9 points to box 1.", "box 7 points to box 5."]
    assert hops.solve({"links": links, "start": 7, "hops": 2}) == 9
    assert hops.solve({"links": links, "start": 1, "hops": 3}) == 1
    assert grade(problem("int", 9), "box 7 -> box 5\nbox 5 -> box 9\nAnswer: 9") and not grade(problem("int", 9), "Answer: box 9")


def test_extract_answer_edge_cases():
    assert extract_answer("no marker", "int") is None
    assert extract_answer("Answer:", "set") is None
    assert extract_answer("Answer: 12\nmore text", "int") == 12


@pytest.mark.parametrize("task", list(TASKS))
def test_generated_problems_are_solvable_unambiguous_and_deterministic(task):
    problems = make_problems(task, 60, seed=3)
    assert [p.prompt for p in make_problems(task, 5, seed=3)] == [p.prompt for p in problems[:5]]  # i-th independent of n
    assert make_problems(task, 5, seed=4)[0].prompt != problems[0].prompt
    for p in problems:
        assert TASKS[task].solve(p.facts) == p.answer  # the brute-force solver agrees with the construction
        assert grade(p, p.solution)  # the worked solution grades as correct
        assert all(str(f) in p.prompt for f in p.facts.get("statements", p.facts.get("sentences", p.facts.get("links", []))))
        _assert_unambiguous(task, p)


def _assert_unambiguous(task, p):
    if task == "vt":
        targets = [s[len("VAR "):].split(" = ")[0] for s in p.facts["statements"]]
        assert len(targets) == len(set(targets)), "a variable assigned twice"
        assert len(p.answer) == p.difficulty and p.prompt.count(f"= {p.facts['value']}.") == 1
    elif task == "niah":
        keys = collections.Counter(re.findall(r"magic number for (\S+) is", p.prompt))
        asked = p.facts["asked"]
        assert len(p.answer) == p.difficulty
        assert all(keys[k] == (p.difficulty if len(asked) == 1 else 1) for k in asked)
        assert all(n == 1 for k, n in keys.items() if k not in asked)
    elif task == "hops":
        sources = [int(s.split()[1]) for s in p.facts["links"]]
        assert len(sources) == len(set(sources)), "a box with two outgoing links"
        path = [int(x) for x in re.findall(r"box (\d+) ->", p.solution)] + [p.answer]
        assert len(path) == len(set(path)) == p.difficulty + 1
    elif task == "arith":
        assert len(p.facts["steps"]) == p.difficulty and p.solution.count("=") == p.difficulty
        values = [int(line.split("=")[1]) for line in p.solution.splitlines() if "=" in line]
        assert all(0 <= v <= arith.MAX_VALUE for v in values) and all(x <= 9 for _, x in p.facts["steps"])


def test_default_difficulty_is_long_enough():
    """The study's rule: vt and niah use >= 512 tokens of context, arith >= 4 steps."""
    from transformers import AutoTokenizer

    from kvshrink.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    for task in ("vt", "niah"):
        assert min(len(tok(p.prompt)["input_ids"]) for p in make_problems(task, 20)) >= 512
    assert all(len(p.facts["steps"]) >= 4 for p in make_problems("arith", 20))


def test_bad_task_arguments_are_clear_errors():
    with pytest.raises(KVShrinkError, match="unknown task 'chess'"):
        make_problems("chess", 1)
    with pytest.raises(KVShrinkError, match="--difficulty must be >= 1"):
        make_problems("arith", 1, difficulty=0)
    for name, mod in TASKS.items():  # the hardest setting still generates solvable problems; one more is refused
        problem = make_problems(name, 1, difficulty=mod.MAX_DIFFICULTY)[0]
        assert mod.solve(problem.facts) == problem.answer
        with pytest.raises(KVShrinkError, match=f"at most {mod.MAX_DIFFICULTY} for {name}"):
            make_problems(name, 1, difficulty=mod.MAX_DIFFICULTY + 1)


def test_problems_do_not_depend_on_hash_seed():
    code = ("import hashlib; from kvshrink.tasks import make_problems; "
            "print(hashlib.sha256(''.join(p.prompt for p in make_problems('vt', 3)).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": s}).stdout
            for s in ("1", "2")}
    assert len(outs) == 1
