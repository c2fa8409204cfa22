"""A DMS model saved in HF format reloads with DMS attached (settings from config.json, adapter weights
from the safetensors), and its cache also drives transformers' own generate."""

from __future__ import annotations

import pytest
import torch

import kvshrink
from conftest import tiny_model, with_random_dms
from kvshrink.shims import cache_arg
from kvshrink.attach import DMSCache, dms_config
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
                        **cache_arg(DMSCache(model)))[0, len(prompt):].tolist()
    assert hf == ours[0]
    assert stats["compression_ratio"] > 1.2


def test_compare_vanilla_and_dms(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import json
    import sys

    from transformers import AutoTokenizer

    from kvshrink.cli import main
    from kvshrink.compare import leading_agreement

    assert leading_agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    model = with_random_dms(tiny_model("llama"), window=3, evict_bias=8.0)
    model.save_pretrained(tmp_path / "dms")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "dms")
    text = tmp_path / "passage.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(200)))
    monkeypatch.setattr(sys, "argv", ["kvshrink", "compare", str(tiny_model_dir), str(tmp_path / "dms"), "--text", str(text),
                                      "--prompt-tokens", "64", "--max-new-tokens", "8", "--json"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    runs = list(result["runs"].values())
    assert result["prompt_tokens"] == 64 and 0 <= result["agreement"] <= 8
    assert runs[0]["stats"]["policy"] == "none" and runs[1]["stats"]["policy"] == "dms"
    assert runs[1]["stats"]["kv_reads"] < runs[0]["stats"]["kv_reads"]
    assert result["agreement"] == leading_agreement(runs[0]["tokens"], runs[1]["tokens"])
