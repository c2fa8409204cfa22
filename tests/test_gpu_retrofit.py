"""The retrofit's GPU path, checked on CPU: flex_attention against the masked math path, the fresh-problem and
stdlib data sources, models taken as the CR ramp passes them, and benchmarks/gpu_retrofit.py rehearsed in
miniature (--tiny-run), so that no GPU minute goes to a bug. (flex_attention has no CPU backward: the script
checks the gradients on CUDA before it trains, `flex_check`.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvshrink
from conftest import tiny_model, with_random_dms
from kvshrink.dms import TrainSignals
from kvshrink.dms.mask import delayed_eviction_bias, flex_delayed_eviction_attention
from kvshrink.errors import KVShrinkError
from kvshrink.train.data import PAD, ProblemStream, stdlib_files, training_source

ROOT = Path(__file__).resolve().parents[1]


def test_flex_attention_equals_the_masked_reference(one_thread):
    """Grouped query heads, a window and soft log-keep values: flex's score_mod is the dense additive mask."""
    torch.manual_seed(0)
    B, H, Hkv, T, D, w = 2, 6, 2, 70, 16, 5
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    log_keep = torch.nn.functional.logsigmoid(3 * torch.randn(B, Hkv, T))
    out = flex_delayed_eviction_attention(q, k, v, log_keep, w, D ** -0.5)
    bias = delayed_eviction_bias(log_keep, w)  # (B, Hkv, T, T), shared by each KV head's query group
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(H // Hkv, 1)) * D ** -0.5 + bias.repeat_interleave(H // Hkv, 1)
    reference = torch.softmax(scores, -1) @ v.repeat_interleave(H // Hkv, 1)
    assert torch.allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flex_training_forward_equals_the_math_path(family, one_thread):
    """The whole model in training mode (soft Gumbel gates): same logits with flex attention."""
    model = with_random_dms(tiny_model(family), window=4, evict_bias=3).train()
    ids = torch.randint(3, 128, (2, 40))
    uniform = torch.rand(2, 2, 2, 40)
    with torch.no_grad():
        math = model(ids, use_cache=False, dms_signals=TrainSignals(uniform=uniform)).logits
        flex = model(ids, use_cache=False, dms_signals=TrainSignals(uniform=uniform, flex=True)).logits
    assert torch.allclose(math, flex, atol=1e-4)


class CharTokenizer:
    """One id per character (no chat template): problems differ in their ids exactly when their texts do."""

    eos_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1 + ord(c) % 4000 for c in text]}


def test_problem_stream_is_fresh_deterministic_and_answer_masked():
    tok = CharTokenizer()
    stream = training_source("gold:arith,vt", tok, 8192, Path("unused"))
    assert isinstance(stream, ProblemStream)
    a, again, other = stream.batch([0, 1, 2, 3]), stream.batch([0, 1, 2, 3]), stream.batch([4, 5, 6, 7])
    assert torch.equal(a.ids, again.ids)  # a resumed run draws the same problems
    assert all(not torch.equal(x, y) for x in a.ids for y in other.ids)  # never the same problem twice
    for row, start in zip(a.ids, a.answer_start):
        length = int((row != PAD).sum())
        assert 0 < start < length  # the gold solution follows the prompt in the same block
    with pytest.raises(KVShrinkError, match="gold:NAME"):
        training_source("gold:vt+pydoc", tok, 64, Path("unused"))
    with pytest.raises(KVShrinkError, match="unknown task"):
        training_source("gold:nope", tok, 64, Path("unused"))


def test_stdlib_split_is_disjoint_by_module():
    """A top-level module is wholly train or wholly held out (by a hash of its name), tests excluded."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    top = lambda files: {p.relative_to(root).parts[0].removesuffix(".py") for p in files}  # noqa: E731
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert train and held and top(train).isdisjoint(top(held))
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.3
    assert not any({"test", "tests"} & set(p.relative_to(root).parts) for p in train + held)


def test_gpu_retrofit_tiny_run_exports_each_cr_and_resumes(tiny_model_dir, tmp_path):
    """The prepared GPU command in miniature: the tiny job ramps 1 -> 16 over 8 steps, takes DMS-4 and DMS-8
    as the ramp passes them (labelled with their own CR, loadable), stops there, and a rerun skips it."""
    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_retrofit.py"), str(out), "--tiny-run", "--jobs", "tiny",
           "--base", str(tiny_model_dir)]
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    job = json.loads((out / "summary.json").read_text())["jobs"]["tiny"]
    assert job["exports"] == ["cr-4", "cr-8"] and job["packed"] == ["tiny-dms4", "tiny-dms8"]
    metrics = [json.loads(line) for line in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    ramp = [m["target_cr"] for m in metrics]
    assert ramp[-1] >= 8 > ramp[-2] and len(metrics) < 8  # stopped after the last export, mid-ramp
    for cr in (4, 8):
        export = out / "tiny" / f"cr-{cr}"
        at = json.loads((export / "export.json").read_text())
        assert at["target_cr"] >= cr and (at["step"] == 1 or metrics[at["step"] - 2]["target_cr"] < cr)
        model, _ = kvshrink.load(export)
        assert model.config.dms_cr == cr and model.config.dms_sink_tokens == 4
        assert abs(at["target_flag_rate"] - (1 - 1 / at["target_cr"])) < 1e-9  # flag-based target (docs/conventions.md)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and json.loads((out / "summary.json").read_text())["jobs"]["tiny"]["skipped"]
