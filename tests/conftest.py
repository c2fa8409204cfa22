"""Tiny random-init models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

torch.set_num_threads(2)
if not torch.cuda.is_available():  # Triton kernels are defined in interpreter mode or not at all: before any import of them
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Studies inside tests (SmolLM2 loads, retrofits of 100+ steps, multi-process launches, building the wheel): marked
# `slow`, so that `pytest -m "not slow"` is the fast unit suite; `make test` runs both.
SLOW_FIXTURES = {"smollm2", "base_dir", "wheel"}
SLOW_MODULES = {"test_smollm2.py", "test_zoo.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_model(family: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128, seed: int = 0, max_pos: int = 4096, init_scale: float = 5.0):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                        max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        tie_word_embeddings=False)
    if family == "mistral":
        config.sliding_window = None
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # random-init weights are tiny (std 0.02); scale them so attention patterns and logits are not flat
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(init_scale)
    model.generation_config.eos_token_id = None
    return model


def with_random_dms(model, window: int, decision: str = "adapter", evict_bias: float = 0.0, seed: int = 1):
    """A copy of `model` with DMS attached and random (non-trivial) retention predictors.

    evict_bias shifts the logits (alpha_offset = 5 - evict_bias) to raise the eviction rate."""
    from kvshrink.attach import attach_dms
    from kvshrink.dms.config import DMSConfig

    m = attach_dms(copy.deepcopy(model), DMSConfig(window=window, decision=decision, alpha_offset=5.0 - evict_bias))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers:
            attn = layer.self_attn
            if decision == "adapter":
                attn.dms_proj_alpha.weight.copy_(torch.randn(attn.dms_proj_alpha.weight.shape, generator=g) * 0.5)
    return m


@pytest.fixture(scope="module")
def one_thread():
    """Tests on small tensors: one thread is as fast, and stays fast on a busy 2-core machine (2 can be 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def left_pad(prompts: list[list[int]], pad: int = 0):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a word-level tokenizer: a real local HF folder for the CLI and `load`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def run_cli(args, capsys, monkeypatch):
    """`kvshrink ARGS` in this process, through the entry point: (exit code, stdout, stderr)."""
    from kvshrink.cli import main

    monkeypatch.setattr(sys, "argv", ["kvshrink", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
