"""A DMS model saved in HF format reloads with DMS attached (settings from config.json, adapter weights
from the safetensors), and its cache also drives transformers' own generate."""

from __future__ import annotations

import torch

import kvshrink
from conftest import tiny_model, with_random_dms
from kvshrink.dms.attach import DMSCache, dms_config
from kvshrink.generation import generate_ids
from kvshrink.policies import DMSPolicy


def test_saved_dms_model_reloads_with_dms(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model = with_random_dms(tiny_model("llama"), window=3, evict_bias=8.0)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    loaded, tok = kvshrink.load(tmp_path)
    cfg = dms_config(loaded)
    assert cfg is not None and cfg.window == 3 and cfg.decision == "adapter"
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    out = kvshrink.generate(loaded, tok, "w3 w4 w5 w6 w7 w8 w9 w10", max_new_tokens=8)
    assert out.stats["policy"] == "dms"  # the default on a DMS model


def test_dms_cache_with_transformers_generate():
    model = with_random_dms(tiny_model("qwen2"), window=3, evict_bias=8.0)
    prompt = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, stats, _ = generate_ids(model, [prompt], DMSPolicy(3), max_new_tokens=10)
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                        past_key_values=DMSCache(model))[0, len(prompt):].tolist()
    assert hf == ours[0]
    assert stats["compression_ratio"] > 1.2
