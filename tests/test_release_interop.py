"""Checkpoints in the format of the authors' release (NVIDIA Model-Optimizer `experimental/dms`) load into
kvshrink and run on its memory-freeing cache.

Names used exactly as the release defines them:
- `experimental/dms/models/qwen3/configuration_qwen3_dms.py`, `Qwen3ConfigDMS.__init__`:
  dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=512,
  dms_paged_attention_block_size=256, dms_cr=8, dms_disable_eviction=False, dms_separate_alpha=False,
  dms_alpha_per="head", dms_tau=0.1, dms_compile_limit=72, dms_manual_inference_mode=False,
  dms_chunked_prefill=None, dms_preallocate_for_tokens=4096
- `experimental/dms/models/qwen3/modeling_qwen3_dms.py`, `Qwen3AttentionDMS.__init__`:
  self.dms_proj_alpha_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
  self.dms_proj_alpha = nn.Linear(config.hidden_size, self.num_key_value_heads, bias=config.attention_bias)
  (module path model.layers.{i}.self_attn, so weights model.layers.{i}.self_attn.dms_proj_alpha.weight, ...)
"""

from __future__ import annotations

import json

import torch

import kvshrink
from conftest import left_pad, tiny_model
from kvshrink.shims import cache_arg
from kvshrink.attach import DMSCache, dms_config
from kvshrink.dms import TrainSignals

RELEASE_FIELDS = {
    "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_window_size": 4,
    "dms_paged_attention_block_size": 2, "dms_cr": 8, "dms_disable_eviction": False, "dms_separate_alpha": True,
    "dms_alpha_per": "head", "dms_tau": 0.1, "dms_compile_limit": 72, "dms_manual_inference_mode": False,
    "dms_chunked_prefill": None, "dms_preallocate_for_tokens": 4096,
}


def write_release_checkpoint(path, tokenizer_dir):
    """A tiny Qwen3 saved the way the release saves Qwen3ForCausalLMDMS: its config fields and adapter tensors."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    model = tiny_model("qwen3", vocab=128)
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(RELEASE_FIELDS)
    cfg["architectures"] = ["Qwen3ForCausalLMDMS"]
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        tensors[prefix + "dms_proj_alpha_norm.weight"] = 1 + 0.1 * torch.randn(model.config.hidden_size, generator=g)
        tensors[prefix + "dms_proj_alpha.weight"] = 0.5 * torch.randn(model.config.num_key_value_heads, model.config.hidden_size, generator=g)
    save_file(tensors, str(path / "dms_adapter.safetensors"))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return tensors


def test_release_checkpoint_runs_on_our_cache(tmp_path, tiny_model_dir):
    tensors = write_release_checkpoint(tmp_path, tiny_model_dir)
    model, _ = kvshrink.load(tmp_path)
    cfg = dms_config(model)
    assert cfg.window == 4 and cfg.decision == "adapter" and cfg.target_cr == 8
    attn = model.model.layers[1].self_attn
    assert torch.equal(attn.dms_proj_alpha.weight, tensors["model.layers.1.self_attn.dms_proj_alpha.weight"])

    prompts = [torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 2)]
    prompts[1] = prompts[1][:21]
    ids, mask = left_pad(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        collected = []
        dense = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, dms_signals=TrainSignals(collect=collected)).logits
        assert torch.stack([c["flags"] for c in collected]).float().mean() > 0.2  # the adapter really evicts
        cache = DMSCache(model)
        pieces = [model(ids[:, :12], attention_mask=mask[:, :12], position_ids=positions[:, :12], **cache_arg(cache)).logits]
        for t in range(12, ids.shape[1]):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1], **cache_arg(cache)).logits)
    cached = torch.cat(pieces, 1)
    assert (cached - dense)[mask.bool()].abs().max() < 1e-4
