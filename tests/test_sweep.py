"""`kvshrink sweep`: grid, resume, Pareto frontiers; `none` at CR 1 equals `kvshrink eval`."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
from pathlib import Path

import pytest

import kvshrink
from kvshrink.errors import KVShrinkError
from kvshrink.evaluation.frontiers import budget_ranges, budget_view, frontier, paired_difference, precondition_table, verdicts
from kvshrink.evaluation.sweep import SweepConfig, point_key, run_sweep, write_report
from kvshrink.evaluation.evaluate import evaluate


def test_frontier_equals_brute_force_definition():
    rng = random.Random(0)
    for _ in range(50):
        pts = [{"kv_reads": rng.randint(1, 20), "accuracy": rng.randint(0, 10) / 10} for _ in range(12)]
        front = frontier(pts, "kv_reads")
        best = {}
        for p in pts:  # brute force: the best accuracy reachable at each cost, kept where it improves
            best[p["kv_reads"]] = max(q["accuracy"] for q in pts if q["kv_reads"] <= p["kv_reads"])
        steps = [(c, a) for c, a in sorted(best.items()) if all(a > best[d] for d in best if d < c)]
        assert [(p["kv_reads"], p["accuracy"]) for p in front] == steps
        assert not any(q["kv_reads"] <= p["kv_reads"] and q["accuracy"] > p["accuracy"] for p, q in itertools.product(front, pts))


def pt(policy, cr, L, W, correct, reads, peak, achieved=1.0, cache_bytes=100):
    return {"task": "vt", "policy": policy, "cr": cr, "L": L, "W": W, "problems": len(correct), "correct": correct,
            "accuracy": sum(correct) / len(correct), "kv_reads": reads, "peak_kv_tokens": peak, "compression_ratio": achieved,
            "cache_bytes": cache_bytes}


def test_paired_difference_by_hand():
    a, b = pt("dms", 8, 64, 1, [1, 1, 0, 1], 10, 10), pt("none", 1, 64, 1, [1, 0, 0, 0], 10, 10)
    diff, low, high = paired_difference(a, b)
    # per-problem differences 0, 1, 0, 1: mean 0.5, sample sd sqrt(1/3), half-width 1.96 * sqrt(1/3) / 2
    assert diff == 0.5 and high - diff == pytest.approx(1.96 * (1 / 3) ** 0.5 / 2) and diff - low == pytest.approx(high - diff)
    with pytest.raises(ValueError):  # not the same problems
        paired_difference(a, pt("none", 1, 64, 1, [1, 0], 10, 10))


def test_verdicts_and_budget_view_on_hand_computed_points():
    ten = lambda k: [1] * k + [0] * (10 - k)  # noqa: E731  (k of 10 problems right, the first k)
    rows = [pt("none", 1, 32, 1, ten(0), 100, 50), pt("none", 1, 64, 1, ten(6), 200, 100), pt("none", 1, 64, 4, ten(8), 800, 400),
            pt("dms", 8, 64, 1, ten(5), 40, 20), pt("dms", 8, 64, 4, ten(9), 150, 60),
            pt("tova", 8, 64, 1, ten(1), 40, 20), pt("tova", 8, 64, 4, ten(3), 150, 60),
            pt("dms-immediate", 8, 64, 1, ten(2), 40, 20),
            pt("quest", 8, 64, 1, ten(6), 50, 110, achieved=4.0, cache_bytes=110)]
    text = "\n".join(verdicts(rows))
    # within 60 peak tokens vanilla's best is L 32 (0 right), DMS-8's is (64, 4), 9 right: +0.9; the differences are nine
    # 1s and one 0, sample variance (9 * 0.1 ** 2 + 0.9 ** 2) / 9 = 0.1
    half = 1.96 * 0.1 ** 0.5 / 10 ** 0.5
    assert "DMS-8 0.90 (L 64, W 4) against vanilla's best 0.00 (L 32, W 1): +0.900 (95% paired " in text
    assert f"+{0.9 - half:.3f} to +{0.9 + half:.3f}); meets the bar" in text
    # at 100 vanilla's best is (64, 1), 6 right, against DMS-8's 9: +0.3 (low +0.0006); at 400, 8 against 9: +0.1 (low < 0)
    assert "Budgets where it holds: DMS-8: from 50 up to 400 (vanilla's cheapest point: 50)." in text
    assert "DMS-8's frontier matches or beats 2 of 2 TOVA-8 points" in text
    assert "the delayed model matches or beats 1 of 1 w = 0 points within their cost, strictly 1" in text
    assert "Quest-8 against vanilla at the same (L, W): 4.00x fewer reads (achieved CR), 1.10x vanilla's cache bytes" in text
    steps = [{"budget": b, "ok": ok} for b, ok in [(1, False), (2, True), (3, True), (5, False), (8, True)]]
    assert budget_ranges(steps, lambda s: s["ok"]) == "from 2 up to 5; from 8 on"
    assert budget_ranges(steps[:1], lambda s: s["ok"]) == "none"
    table = budget_view(rows, "peak_kv_tokens", [20, 100])
    assert table[0].startswith("| peak KV tokens per problem at most | vanilla | DMS-8 | TOVA-8 | DMS-8 w=0 | Quest-8 |")
    assert table[2] == "| 20 | - | 0.50 (L 64, W 1) | 0.10 (L 64, W 1) | 0.20 (L 64, W 1) | - | - |"
    assert table[3].startswith("| 100 | 0.60 (L 64, W 1) | 0.90 (L 64, W 4) | 0.30 (L 64, W 4) | 0.20 (L 64, W 1) | - | +0.300 (")
    pre = "\n".join(precondition_table(rows))
    assert "| 32 | 0.00 | - |" in pre and "| 64 | 0.60 | 0.80 |" in pre
    assert "longer chains: L 64 minus L 32 at W 1: +0.600" in pre and "more votes: W 4 minus W 1 at L 64: +0.200" in pre


def test_each_dms_model_is_read_against_the_training_free_policies_at_its_own_cr():
    ten = lambda k: [1] * k + [0] * (10 - k)  # noqa: E731
    rows = [pt("dms", 4, 64, 1, ten(3), 60, 30), pt("tova", 4, 64, 1, ten(5), 60, 30),
            pt("dms", 8, 64, 1, ten(2), 30, 15), pt("tova", 8, 64, 1, ten(0), 30, 15)]
    text = "\n".join(verdicts(rows))
    assert "DMS-4 vs TOVA-4, peak KV tokens per problem: DMS-4's frontier matches or beats 0 of 1 TOVA-4 points" in text
    assert "(below at some)" in text and "DMS-8's frontier matches or beats 1 of 1 TOVA-8 points" in text
    assert "DMS-4 vs TOVA-8" not in text and "DMS-8 vs TOVA-4" not in text


def test_sweep_none_equals_eval_and_resumes(tmp_path):
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none", "window"], crs=[1, 4], lengths=[6], widths=[1],
                      problems=2)
    assert [(p["policy"], p["cr"]) for p in cfg.points()] == [("none", 1), ("window", 4)]
    points = tmp_path / "h.points.jsonl"
    assert run_sweep(cfg, points, progress=False, policies=[]) == []  # --report-only: nothing finished, nothing run
    first = run_sweep(cfg, points, progress=False, policies=["none"])  # a staged sweep: vanilla first
    assert [r["policy"] for r in first] == ["none"]
    rows = run_sweep(cfg, points, progress=False)
    assert rows[0] == first[0]
    model, tok = kvshrink.load("smollm2")
    direct = evaluate(model, tok, "arith", "none", problems=2, max_new_tokens=6)
    for key in ("accuracy", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "compression_ratio"):
        assert rows[0][key] == direct[key]
    assert rows[1]["compression_ratio"] > 1
    before = points.read_text()
    assert run_sweep(cfg, points, progress=False) == rows and points.read_text() == before  # nothing rerun
    pngs = write_report(rows, tmp_path / "h.md", "test")
    assert all(p.stat().st_size > 10_000 for p in pngs) and "| Window-4 | smollm2 | 6 | 1 |" in (tmp_path / "h.md").read_text()


def test_a_finished_point_is_reused_only_under_the_same_settings():
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none"], crs=[1], lengths=[6], widths=[1, 2], problems=2)
    greedy, sampled = cfg.points()
    assert (greedy["temperature"], sampled["temperature"], sampled["top_p"]) == (0.0, cfg.temperature, cfg.top_p)
    for change in ({"problems": 3}, {"seed": 1}, {"temperature": 0.9}):
        other = dataclasses.replace(cfg, **change).points()
        assert point_key(other[1]) != point_key(sampled)
    assert point_key(dataclasses.replace(cfg, temperature=0.9).points()[0]) == point_key(greedy)  # greedy ignores it
    harder = dataclasses.replace(cfg, difficulties={"arith": 9}).points()
    assert harder[0]["difficulty"] == 9 and "difficulty" not in greedy and point_key(harder[0]) != point_key(greedy)
    two = dataclasses.replace(cfg, difficulties={"arith": [9, 10]}).points()
    assert [p["difficulty"] for p in two] == [9, 9, 10, 10] and len({point_key(p) for p in two}) == 4


def test_a_sweep_at_a_set_difficulty_equals_eval_at_it(tmp_path):
    """`difficulties` reaches the problems: the point is what `evaluate(..., difficulty=)` gives."""
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none"], crs=[1], lengths=[6], widths=[1], problems=2,
                      difficulties={"arith": 9})
    row, = run_sweep(cfg, tmp_path / "d.points.jsonl", progress=False)
    model, tok = kvshrink.load("smollm2")
    direct = evaluate(model, tok, "arith", "none", problems=2, max_new_tokens=6, difficulty=9)
    plain = evaluate(model, tok, "arith", "none", problems=2, max_new_tokens=6)
    assert row["difficulty"] == 9 and row["prefill_kv_reads"] == direct["prefill_kv_reads"] > plain["prefill_kv_reads"]
    write_report([row], tmp_path / "d.md", "test")
    assert "## arith (difficulty 9)" in (tmp_path / "d.md").read_text()


def test_report_time_sums_every_run_once_across_difficulties(tmp_path):
    """Two nested runs that differ only in difficulty are two runs: 30 + 30 minutes, each counted once over its points."""
    rows = [{**pt("none", 1, L, 1, [1, 0], 10 * L, L), "model": "tiny", "pass_at_w": 0.5, "difficulty": d, "seconds": 1800.0,
             "run": "L 64, W 1"} for d in (8, 12) for L in (32, 64)]
    write_report(rows, tmp_path / "t.md", "test")
    text = (tmp_path / "t.md").read_text()
    assert "Time: 1.00 h of evaluation" in text and "## vt (difficulty 8)" in text and "## vt (difficulty 12)" in text
    assert (tmp_path / "t-vt-8.png").exists() and (tmp_path / "t-vt-12.png").exists()


def test_cuts_leave_exactly_their_points_out_and_the_report_names_them(tmp_path):
    """A cut matches on every key it gives (a task cut takes all its levels); the grid is the brute-force product minus them."""
    cut_hops = {"task": "hops", "why": "too dear"}
    cut_w0 = {"task": "arith", "difficulty": 12, "policy": "dms-immediate", "why": "nothing to lose"}
    cfg = SweepConfig(base="tiny", tasks=["arith", "hops"], policies=["none", "dms-immediate", "tova"], crs=[1, 8], lengths=[8],
                      widths=[1], difficulties={"arith": [8, 12], "hops": 4}, immediate_models={"8": "tiny-dms8-w0"},
                      cuts=[cut_hops, cut_w0])
    kept = {(p["task"], p.get("difficulty"), p["policy"]) for p in cfg.points()}
    every = {(t, d, pol) for t, d in [("arith", 8), ("arith", 12), ("hops", 4)] for pol in ("none", "dms-immediate", "tova")}
    assert kept == every - {("hops", 4, pol) for pol in ("none", "dms-immediate", "tova")} - {("arith", 12, "dms-immediate")}
    rows = [{**pt("none", 1, 8, 1, [1, 0], 80, 8), "model": "tiny", "pass_at_w": 0.5, "seconds": 1.0}]
    write_report(rows, tmp_path / "c.md", "test", cuts=cfg.cuts)
    text = (tmp_path / "c.md").read_text()
    assert "- task hops: too dear" in text and "- task arith, difficulty 12, policy dms-immediate: nothing to lose" in text
    for bad in ({"task": "hops"}, {"why": "no matcher"}, {"tasks": "hops", "why": "typo"}, "hops"):
        with pytest.raises(KVShrinkError, match="sweep cut"):
            dataclasses.replace(cfg, cuts=[bad])
    for missed in ({"task": "vt", "why": "not in the grid"}, {"task": "arith", "cr": "8", "why": "cr as a string"}):
        with pytest.raises(KVShrinkError, match="matches no point"):
            dataclasses.replace(cfg, cuts=[missed]).points()


def test_points_of_other_weights_are_not_reused(tmp_path):
    """A cached point is reused only under the weights that made it: a re-shipped model under the same name reruns."""
    from kvshrink.jsonl import append_jsonl
    from kvshrink.zoo import weights_id

    cfg = SweepConfig(base="tiny", tasks=["arith"], policies=["none"], crs=[1], lengths=[6], widths=[1], problems=2)
    point, = cfg.points()
    made = {**point, "accuracy": 0.5, "correct": [1, 0]}
    append_jsonl(tmp_path / "p.points.jsonl", {**made, "weights": "0123456789ab"})
    assert run_sweep(cfg, tmp_path / "p.points.jsonl", progress=False, policies=[]) == []
    append_jsonl(tmp_path / "p.points.jsonl", {**made, "weights": weights_id("tiny")})
    row, = run_sweep(cfg, tmp_path / "p.points.jsonl", progress=False, policies=[])
    assert row["weights"] == weights_id("tiny") != weights_id("tiny-dms8")


def test_weights_id_follows_weights_not_cards(tmp_path):
    from kvshrink.zoo import weights_id

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(bytes(3 << 20))
    (tmp_path / "README.md").write_text("card")
    first = weights_id(str(tmp_path))
    (tmp_path / "README.md").write_text("another card")
    assert weights_id(str(tmp_path)) == first
    weights = bytearray(3 << 20)
    weights[len(weights) // 2] = 1  # one byte in the middle: a retrain in place changes the tensors, not the size
    (tmp_path / "model.safetensors").write_bytes(bytes(weights))
    assert weights_id(str(tmp_path)) != first
    with pytest.raises(KVShrinkError, match="neither a shipped model"):
        weights_id(str(tmp_path / "absent"))


def test_bad_sweep_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nx = 1\n")
    with pytest.raises(KVShrinkError, match="needs a \\[sweep\\] table"):
        SweepConfig.from_file(bad)
    bad.write_text('[sweep]\nbase = "smollm2"\ntasks = ["arith"]\npolicies = ["magic"]\ncrs = [4]\nlengths = [8]\nwidths = [1]\n')
    with pytest.raises(KVShrinkError, match="unknown policy 'magic'"):
        SweepConfig.from_file(bad).points()


def test_results_file_cut_mid_write_keeps_finished_rows(tmp_path):
    """A run killed while appending leaves a torn last line: it is dropped (and cut from the file), the
    complete rows stay, and later appends land on a clean line."""
    from kvshrink.jsonl import append_jsonl, read_jsonl

    path = tmp_path / "points.jsonl"
    for i in range(3):
        append_jsonl(path, {"i": i})
    path.write_text(path.read_text() + '{"i": 3, "accur')
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    append_jsonl(path, {"i": 3})
    assert read_jsonl(path) == [{"i": i} for i in range(4)]


def test_precondition_pools_disjoint_problem_ranges_and_refuses_overlaps():
    """benchmarks/precondition.py adds a second sweep's problems to the grid's: the pooled accuracy and the paired
    interval are those of the concatenated per-problem results; overlapping ranges would count problems twice."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import precondition

    def pt(seed, w, correct):
        return {"task": "vt", "policy": "none", "model": "tiny", "L": 160, "W": w, "temperature": 0.7, "top_p": 0.95,
                "seed": seed, "problems": len(correct), "correct": correct, "accuracy": sum(correct) / len(correct)}

    first = {1: [1, 0, 1, 0], 8: [1, 1, 1, 0]}
    second = {1: [0, 0, 1], 8: [1, 0, 1]}
    rows = precondition.pooled([pt(0, w, c) for w, c in first.items()] + [pt(4, w, c) for w, c in second.items()])
    by_w = {r["W"]: r for r in rows}
    assert by_w[8]["correct"] == [1, 1, 1, 0, 1, 0, 1] and by_w[8]["problems"] == 7
    assert by_w[1]["accuracy"] == pytest.approx(3 / 7) and by_w[1]["seeds"] == [(0, 3), (4, 6)]
    d = [0, 1, 0, 0, 1, 0, 0]  # W 8 minus W 1, problem by problem
    mean = sum(d) / 7
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in d) / 6) / math.sqrt(7)
    assert paired_difference(by_w[8], by_w[1]) == pytest.approx((mean, mean - half, mean + half))
    with pytest.raises(SystemExit, match="overlap"):
        precondition.pooled([pt(0, 1, first[1]), pt(2, 1, second[1])])
