"""W samples that share one read of their prompt, and a sweep's smaller L and W read off one run, against
the runs they stand for."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import kvshrink
from kvshrink.attach import attach_dms
from kvshrink.attention import install
from kvshrink.dms.config import DMSConfig
from kvshrink.evaluation.evaluate import evaluate
from kvshrink.evaluation.sweep import SweepConfig, run_sweep
from kvshrink.generation import generate_ids
from kvshrink.policies import CachePolicy, DMSPolicy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dms", [False, True])
def test_samples_sharing_a_prompt_read_equal_samples_that_read_it_each(paged, dms):
    """Three samples per prompt: read once and copied (group=3) against each read on its own (group=1), same
    seed: the same tokens and decode reads; the prompt's reads counted once; the trace adds up to the reads."""
    model = install(tiny_model("llama"))
    policy = CachePolicy()
    if dms:
        model, policy = attach_dms(model, DMSConfig(window=4, forced_keep_every=2)), DMSPolicy(4)
    rows = [p for p in PROMPTS for _ in range(3)]
    for temperature in (0.0, 1.0):
        shared = generate_ids(model, rows, policy, max_new_tokens=12, group=3, paged=paged, temperature=temperature, seed=1, trace=True)
        each = generate_ids(model, rows, policy, max_new_tokens=12, group=1, paged=paged, temperature=temperature, seed=1)
        assert shared[0] == each[0]
        assert torch.allclose(shared[2]["kv_reads"], each[2]["kv_reads"])
        assert torch.allclose(shared[2]["prefill_kv_reads"].view(2, 3).sum(1), each[2]["prefill_kv_reads"][::3])
        assert torch.equal(shared[2]["prefill_kv_reads"].view(2, 3)[:, 1:], torch.zeros(2, 2, dtype=torch.float64))
        trace = shared[2]
        assert torch.allclose(trace["first_kv_reads"] + trace["read_trace"].sum(1), trace["kv_reads"])
        assert torch.allclose(trace["live_trace"].view(2, 3, -1).sum(1).amax(-1).maximum(trace["prefill_peak_kv_tokens"].view(2, 3).sum(1)),
                              trace["group_peak_kv_tokens"])
    assert len({tuple(t) for t in shared[0][:3]}) > 1  # sampled: the copies went their own ways


@pytest.fixture(scope="module")
def smollm2():
    return kvshrink.load("smollm2")


@pytest.mark.parametrize("policy", ["none", "window"])
def test_a_shorter_generation_read_off_a_longer_run_equals_that_generation(smollm2, policy):
    """The grid point (L, W) taken from a run at (12, 2) equals a run made at (L, 2), sampled with the same seed:
    accuracy, reads, peak and ratio; the run's own point equals its plain result."""
    model, tok = smollm2
    cr = 4 if policy == "window" else None
    args = dict(problems=3, seed=2, width=2, temperature=0.8, top_p=0.95, batch_size=2)
    run = evaluate(model, tok, "arith", policy, cr=cr, max_new_tokens=12, lengths=[5, 12], widths=[1, 2], **args)
    grid = {(g["L"], g["W"]): g for g in run["grid"]}
    for length in (5, 12):
        direct = evaluate(model, tok, "arith", policy, cr=cr, max_new_tokens=length, **args)
        point = grid[(length, 2)]
        assert point["correct"] == [int(r["correct"]) for r in direct["results"]]
        for key in ("accuracy", "pass_at_w", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "compression_ratio"):
            assert point[key] == pytest.approx(direct[key]), key
    assert grid[(12, 1)]["kv_reads"] == pytest.approx(run["kv_reads"] / 2, rel=0.3)  # one sample of two


def test_a_nested_sweep_runs_once_per_policy_and_resumes(tmp_path):
    cfg = SweepConfig(base="smollm2", tasks=["arith"], policies=["none"], crs=[1], lengths=[4, 8], widths=[1, 2], problems=2,
                      nested=True, temperature=0.8)
    points = tmp_path / "n.points.jsonl"
    rows = run_sweep(cfg, points, progress=False)
    assert [(r["L"], r["W"]) for r in rows] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert {r["run"] for r in rows} == {"L 8, W 2"} and len({r["seconds"] for r in rows}) == 1  # one run measured them all
    assert all(r["temperature"] == 0.8 for r in rows)  # W = 1 is a sample too
    assert rows[0]["kv_reads"] < rows[3]["kv_reads"]
    before = points.read_text()
    assert run_sweep(cfg, points, progress=False) == rows and points.read_text() == before
