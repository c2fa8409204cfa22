"""What kvshrink reads off a model's config: the supported families, the layers, a KV head's width, and the
context it can attend. Plain helpers, imported by the core and by its callers."""

from __future__ import annotations

from .errors import KVShrinkError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def kv_head_dim(config) -> int:
    """Width of one key/value head (Qwen3 and some Mistral configs set it apart from hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_context(config, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse up front what the model cannot attend: positions past its trained context (RoPE would
    extrapolate silently) or past a sliding window (which kvshrink's cache does not implement)."""
    used = prompt_tokens + new_tokens - 1  # the last generated token is never fed back
    limits = [(getattr(config, "max_position_embeddings", None), "context"),
              (getattr(config, "sliding_window", None) if config.model_type == "mistral" else None, "sliding window")]
    for limit, what in limits:
        if limit and used > limit:
            raise KVShrinkError(f"prompt ({prompt_tokens} tokens) + {new_tokens} new tokens exceed the model's {what} of "
                                f"{limit} tokens; shorten the prompt or generate fewer tokens")


def decoder_layers(model):
    """The decoder blocks of a supported model (Llama, Qwen2/3 and Mistral share HF's layout)."""
    return model.model.layers


def check_family(config) -> None:
    """Refuse a model whose attention kvshrink cannot take over, naming the supported families."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise KVShrinkError(
            f"unsupported model family {family!r}: kvshrink supports {', '.join(SUPPORTED_FAMILIES)} decoders"
        )
