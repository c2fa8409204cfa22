"""`kvshrink sweep`: grid, resume, Pareto frontiers; `none` at CR 1 equals `kvshrink eval`."""

from __future__ import annotations

import itertools
import random

import pytest

import kvshrink
from kvshrink.errors import KVShrinkError
from kvshrink.scaling.sweep import SweepConfig, findings, pareto, run_sweep, write_report
from kvshrink.tasks.evaluate import evaluate


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
    def pt(policy, cr, L, acc, reads, peak):
        return {"task": "vt", "policy": policy, "cr": cr, "L": L, "W": 1, "accuracy": acc, "kv_reads": reads, "peak_kv_tokens": peak}

    rows = [pt("none", 1, 96, 0.5, 100, 50), pt("none", 1, 192, 0.6, 200, 100),
            pt("dms", 8, 96, 0.55, 20, 10), pt("dms", 8, 192, 0.4, 40, 20),
            pt("tova", 8, 96, 0.3, 20, 10), pt("tova", 8, 192, 0.2, 40, 20),
            pt("dms-immediate", 8, 96, 0.5, 20, 10), pt("quest", 8, 96, 0.5, 50, 52)]
    text = "\n".join(findings(rows))
    # DMS's best within 100 reads (0.55) beats vanilla's 0.5; within 200 it is still 0.55 < 0.6
    assert "at equal kv_reads: DMS's frontier is at or above vanilla's at 1 of 2 vanilla points (mean difference +0.000)" in text
    assert "DMS minus tova: +0.225 accuracy (mean over 2 (L, W) pairs)" in text
    assert "DMS minus dms-immediate: +0.050 accuracy (mean over 1 (L, W) pairs)" in text
    assert "Quest vs vanilla (same L, W): 2.00x fewer reads, 1.04x vanilla's peak tokens, accuracy +0.000" in text
    assert "h2o" not in text  # no points, no claim


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


def test_bad_sweep_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nx = 1\n")
    with pytest.raises(KVShrinkError, match="needs a \\[sweep\\] table"):
        SweepConfig.from_file(bad)
    bad.write_text('[sweep]\nbase = "smollm2"\ntasks = ["arith"]\npolicies = ["magic"]\ncrs = [4]\nlengths = [8]\nwidths = [1]\n')
    with pytest.raises(KVShrinkError, match="sweep policy 'magic' unknown"):
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
