"""`kvshrink eval`: batched task evaluation with W samples, majority vote and per-problem accounting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvshrink
from kvshrink.generation import generate_ids
from kvshrink.policies import for_model
from kvshrink.evaluation.voting import majority_vote
from kvshrink.tasks import grade, make_problems
from kvshrink.prompts import chat_prompt
from kvshrink.evaluation.evaluate import evaluate


def test_majority_vote():
    assert majority_vote([3, 5, 5, None]) == 5
    assert majority_vote([3, 5]) == 3  # a tie goes to the first seen
    assert majority_vote([None, None]) is None
    assert majority_vote([frozenset({"A"}), frozenset({"A"}), frozenset({"B"})]) == frozenset({"A"})


@pytest.fixture(scope="module")
def smollm2():
    return kvshrink.load("smollm2")


def test_eval_accounting_matches_generation(smollm2):
    """Per-problem means equal those of the same batch generated directly; W samples of a problem
    peak together (their live tokens summed) and read their prompt once, and greedy samples are identical."""
    model, tok = smollm2
    result = evaluate(model, tok, "arith", "none", problems=3, width=2, max_new_tokens=6, batch_size=2)
    assert result["problems"] == 3 and result["width"] == 2 and result["compression_ratio"] == 1.0
    problems = make_problems("arith", 3)
    ids = [chat_prompt(tok, p.prompt) for p in problems]
    _, _, per_seq = generate_ids(model, ids, for_model(model, "none"), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    assert result["kv_reads"] == pytest.approx(2 * float(per_seq["kv_reads"].sum()) / 3)
    assert result["prefill_kv_reads"] == pytest.approx(float(per_seq["prefill_kv_reads"].sum()) / 3)
    assert result["peak_kv_tokens"] == pytest.approx(2 * float(per_seq["peak_kv_tokens"].sum()) / 3)
    for r, p in zip(result["results"], problems):
        assert r["correct"] == grade(p, r["output"])


def test_eval_cli_json_and_errors(smollm2):
    proc = subprocess.run([sys.executable, "-m", "kvshrink", "eval", "smollm2", "--tasks", "hops", "--problems", "2",
                           "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("accuracy", "accuracy_interval", "problems", "kv_reads", "peak_kv_tokens", "compression_ratio", "seconds", "pass_at_w",
                "prefill_kv_reads", "cache_bytes"):
        assert key in out
    model, tok = smollm2
    reference = evaluate(model, tok, "hops", "none", problems=2, max_new_tokens=4)  # the library, in this process
    assert out["problems"] == 2 and out["accuracy"] == reference["accuracy"] and out["kv_reads"] == pytest.approx(reference["kv_reads"])
    for args, message in [(["--tasks", "chess"], "unknown task 'chess'"), (["--tasks", "vt", "--width", "0"], "--width must be >= 1"),
                          (["--tasks", "vt", "--cr", "0.5"], "--cr must be >= 1")]:
        proc = subprocess.run([sys.executable, "-m", "kvshrink", "eval", "smollm2", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_demo_quick_produces_table_png_and_consistent_costs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvshrink", "demo", "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out problems" in proc.stdout and (tmp_path / "demo.png").stat().st_size > 10_000
    assert "docs/results/zoo.md" in proc.stdout and "the demo took" in proc.stdout
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = result["task_accuracy"]["rows"]
    assert result["seconds"] < 120, result["seconds"]  # --quick is a smoke test
    for r in rows:  # every accuracy with its n and interval
        low, high = r["accuracy_interval"]
        assert r["problems"] == 2 and low <= r["accuracy"] <= high and r["correct"] == round(r["accuracy"] * 2)
    vanilla = next(r for r in rows if "dms" not in r["model"])
    for r in rows:
        if "dms" in r["model"]:
            assert r["kv_reads"] < vanilla["kv_reads"] and r["compression_ratio"] > 1
    budget = result["memory_budget"]  # each model's best within one memory budget, never above it
    assert [r["model"] for r in budget["rows"]] == ["tiny", "tiny-dms8"] and (tmp_path / "budget.png").stat().st_size > 10_000
    for r in budget["rows"]:
        assert r["peak_kv_tokens"] <= budget["budget_peak_kv_tokens"] and r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    assert budget["at_full_chain"]["peak_kv_tokens"] > budget["budget_peak_kv_tokens"]  # a full chain holds more than 32 tokens
