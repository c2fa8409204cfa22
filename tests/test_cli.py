"""The CLI and the Python API on a real local HF folder: JSON contract and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvshrink
from conftest import run_cli


def test_generate_json_matches_python_api(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run_cli(["generate", str(tiny_model_dir), "w5 w9 w13 w40 w2", "--max-new-tokens", "6", "--json"], capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out)
    model, tok = kvshrink.load(tiny_model_dir)
    api = kvshrink.generate(model, tok, "w5 w9 w13 w40 w2", max_new_tokens=6)
    assert payload["tokens"] == api.tokens and payload["texts"] == api.texts
    for key in ("prompt_tokens", "generated_tokens", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes",
                "compression_ratio", "seconds"):
        assert key in payload["stats"]
    assert payload["stats"]["compression_ratio"] == pytest.approx(1.0)


def test_unsupported_family(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    code, _, err = run_cli(["generate", str(tmp_path), "hello"], capsys, monkeypatch)
    assert code == 2 and "unsupported model family 'gpt2'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cr", "0.5"], "--cr must be >= 1"),
        (["--window", "-1"], "--window must be >= 0"),
        (["--sinks", "-1"], "--sinks must be >= 0"),
        (["--sinks", "4"], "--sinks is a DMS setting"),
        (["--policy", "magic"], "unknown policy 'magic'"),
        (["--policy", "dms"], "kvshrink retrofit"),
    ],
)
def test_bad_options_exit_2(tiny_model_dir, capsys, monkeypatch, extra, message):
    code, _, err = run_cli(["generate", str(tiny_model_dir), "w1 w2", *extra], capsys, monkeypatch)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_folder_and_empty_prompt(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["generate", str(tmp_path / "nope"), "hi"], capsys, monkeypatch)
    assert code == 2 and "not found" in err
    code, _, err = run_cli(["generate", str(tiny_model_dir), "   "], capsys, monkeypatch)
    assert code == 2 and "empty prompt" in err


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    """The installed `python -m kvshrink` entry point, end to end."""
    proc = subprocess.run([sys.executable, "-m", "kvshrink", "generate", str(tmp_path / "missing"), "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch):
    """Emulated bf16 matmuls ran 43x slower than fp32 on an AVX2 CPU: asking for them there gets a warning."""
    import warnings

    import torch

    from kvshrink import loading

    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--dtype bfloat16 on this CPU.*use --dtype float32"):
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
        assert loading.resolve_dtype("auto", cpu) == torch.float32 and loading.resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(kvshrink.KVShrinkError, match="unknown dtype"):
        loading.resolve_dtype("float8", cpu)
