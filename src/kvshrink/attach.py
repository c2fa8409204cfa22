"""Attaching DMS (`kvshrink.dms`) to a model whose attention kvshrink installed, and the cache that applies
its decisions. It sits above both: the DMS math imports nothing of the core."""

from __future__ import annotations

from torch import nn

from .attention import KVAttention, install
from .cache import KVCache
from .dms.config import DMSConfig
from .policies import for_model
from .shapes import decoder_layers


def _pass_residual(layer, args, kwargs):
    """The adapter reads the residual stream before the layer's input norm; hand it to the attention."""
    kwargs["dms_residual"] = args[0] if args else kwargs["hidden_states"]
    return args, kwargs


def attach_dms(model, cfg: DMSConfig):
    """Turn `model` into a DMS model with settings `cfg` (stored in `model.config`). Returns the model.

    neuron: borrows a query channel, no new parameters. adapter: adds `self_attn.dms_proj_alpha_norm`
    (RMSNorm) and `self_attn.dms_proj_alpha` (Linear hidden -> n_kv_heads, zero-initialised), the
    release's names, so its checkpoints load into them.
    """
    install(model)
    cfg.to_hf(model.config)
    config = model.config
    for layer in decoder_layers(model):
        attn: KVAttention = layer.self_attn
        attn.dms = cfg
        if cfg.decision == "adapter" and attn.dms_proj_alpha is None:
            ref = attn.q_proj.weight
            attn.dms_proj_alpha_norm = type(layer.input_layernorm)(config.hidden_size, eps=config.rms_norm_eps).to(ref.device, ref.dtype)
            attn.dms_proj_alpha = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=bool(getattr(config, "attention_bias", False)))
            attn.dms_proj_alpha.to(ref.device, ref.dtype)
            nn.init.zeros_(attn.dms_proj_alpha.weight)
            if attn.dms_proj_alpha.bias is not None:
                nn.init.zeros_(attn.dms_proj_alpha.bias)
            attn.train(attn.training)  # the new adapter modules follow the model's train/eval mode
            layer.register_forward_pre_hook(_pass_residual, with_kwargs=True)
    return model


def dms_config(model) -> DMSConfig | None:
    """The DMS settings of a model prepared by kvshrink, or None."""
    first = decoder_layers(model)[0].self_attn
    return first.dms if isinstance(first, KVAttention) else None


def DMSCache(model, window: int | None = None, **kwargs) -> KVCache:
    """A `KVCache` that applies the model's DMS decisions (window from the model unless overridden)."""
    return KVCache(model, for_model(model, "dms", window=window), **kwargs)



