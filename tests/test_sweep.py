"""`kvshrink sweep`: grid, resume, Pareto frontiers; `none` at CR 1 equals `kvshrink eval`."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

import kvshrink
from kvshrink.errors import KVShrinkError
from kvshrink.evaluation.sweep import SweepConfig, findings, matched_budgets, pareto, point_key, run_sweep, write_report
from kvshrink.evaluation.evaluate import evaluate


def test_pareto_equals_brute_force_definition():
    rng = random.Random(0)
    for _ in range(50):
        pts = [{"kv_reads": rng.randint(1, 20), "accuracy": rng.randint(0, 10) / 10} for _ in range(12)]
        front = pareto(pts, "kv_reads")
        best = {}
        for p in pts:  # brute force: the best accuracy reachable at each cost, kept where it improves
            best[p["kv_reads"]] = max(q["accuracy"] for q in pts if q["kv_reads"] <= p["kv_reads"])
        steps = [(c, a) for c, a in sorted(best.items()) if all(a > best[d] for d in best if d < c)]
        assert [(p["kv_reads"], p["accuracy"]) for p in front] == steps
        assert not any(q["kv_reads"] <= p["kv_reads"] and q["accuracy"] > p["accuracy"] for p, q in itertools.product(front, pts))


def test_findings_on_hand_computed_points():
    def pt(policy, cr, L, acc, reads, peak, achieved=1.0, cache_bytes=100):
        return {"task": "vt", "policy": policy, "cr": cr, "L": L, "W": 1, "problems": 16, "accuracy": acc, "kv_reads": reads,
                "peak_kv_tokens": peak, "compression_ratio": achieved, "cache_bytes": cache_bytes}

    rows = [pt("none", 1, 96, 0.5, 100, 50), pt("none", 1, 192, 0.6, 200, 100), pt("none", 1, 384, 0.55, 400, 200),
            pt("dms", 8, 96, 0.55, 20, 10), pt("dms", 8, 192, 0.4, 40, 20),
            pt("tova", 8, 96, 0.3, 20, 10), pt("tova", 8, 192, 0.2, 40, 20),
            pt("dms-immediate", 8, 96, 0.5, 20, 10),
            pt("quest", 8, 96, 0.5, 50, 52, achieved=2.5, cache_bytes=110), pt("quest", 4, 96, 0.4, 60, 52, achieved=1.5)]
    text = "\n".join(findings(rows))
    # vanilla's frontier is (100, 0.5), (200, 0.6): its L = 384 point is dominated. DMS's best within 100
    # reads (0.55) beats 0.5; within 200 it is still 0.55 < 0.6
    assert ("at equal kv_reads: vanilla's frontier has 2 points; within each one's cost DMS reaches at least its accuracy "
            "at 1 (mean DMS - vanilla +0.000); 0 cost less than any DMS point") in text
    # 95% half-width by hand: 1.96 * sqrt(.55 * .45 / 16 + .3 * .7 / 16) = 0.3314...; 1.96 * sqrt(.4 * .6 / 16 + .2 * .8 / 16) = 0.3099...
    assert ("DMS minus tova: +0.225 accuracy (mean over 2 (L, W) pairs; L 96, W 1: +0.250 \u00b1 0.331; "
            "L 192, W 1: +0.200 \u00b1 0.310; 95% CI, 16 problems)") in text
    assert "DMS minus dms-immediate: +0.050 accuracy (mean over 1 (L, W) pairs; L 96, W 1: +0.050 \u00b1 0.346" in text
    assert "Quest at CR 8 vs vanilla (same L, W): 2.50x fewer reads (achieved CR), 1.10x vanilla's cache bytes, accuracy +0.000" in text
    assert "Quest at CR 4 vs vanilla (same L, W): 1.50x fewer reads (achieved CR), 1.00x vanilla's cache bytes, accuracy -0.100" in text
    assert "h2o" not in text  # no points, no claim
    # at DMS-8's (96, 1) reads of 20: vanilla has nothing that cheap, TOVA-8 0.3, Quest-8 costs 50: nothing
    table = matched_budgets(rows)
    assert table[0] == "| task | cost | DMS 8x point (L, W) | its cost | DMS | vanilla | tova 8x | quest 8x |"
    assert "| vt | kv_reads | (96, 1) | 20 | 0.550 | - | 0.300 | - |" in table
    assert "| vt | peak_kv_tokens | (192, 1) | 20 | 0.400 | - | 0.300 | - |" in table  # tova's best within 20 tokens
    assert matched_budgets([r for r in rows if r["policy"] != "dms"]) == []
    # DMS points all cost more than vanilla's cheapest: nothing to compare there, and the line says so
    costly = [dict(r, kv_reads=r["kv_reads"] * 50) if r["policy"] == "dms" else r for r in rows]
    assert "(mean DMS - vanilla n/a); 2 cost less than any DMS point" in "\n".join(findings(costly))


def test_sweep_none_equals_eval_and_resumes(tmp_path):
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none", "window"], crs=[1, 4], lengths=[6], widths=[1],
                      problems=2)
    assert [(p["policy"], p["cr"]) for p in cfg.points()] == [("none", 1), ("window", 4)]
    points = tmp_path / "h.points.jsonl"
    rows = run_sweep(cfg, points, progress=False)
    model, tok = kvshrink.load("smollm2")
    direct = evaluate(model, tok, "arith", "none", problems=2, max_new_tokens=6)
    for key in ("accuracy", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "compression_ratio"):
        assert rows[0][key] == direct[key]
    assert rows[1]["compression_ratio"] > 1
    before = points.read_text()
    assert run_sweep(cfg, points, progress=False) == rows and points.read_text() == before  # nothing rerun
    pngs = write_report(rows, tmp_path / "h.md", "test")
    assert all(p.stat().st_size > 10_000 for p in pngs) and "| window | 4 |" in (tmp_path / "h.md").read_text()


def test_a_finished_point_is_reused_only_under_the_same_settings():
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none"], crs=[1], lengths=[6], widths=[1, 2], problems=2)
    greedy, sampled = cfg.points()
    assert (greedy["temperature"], sampled["temperature"], sampled["top_p"]) == (0.0, cfg.temperature, cfg.top_p)
    for change in ({"problems": 3}, {"seed": 1}, {"temperature": 0.9}):
        other = dataclasses.replace(cfg, **change).points()
        assert point_key(other[1]) != point_key(sampled)
    assert point_key(dataclasses.replace(cfg, temperature=0.9).points()[0]) == point_key(greedy)  # greedy ignores it


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
