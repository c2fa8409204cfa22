"""kvshrink's attention for Llama, Qwen2, Qwen3 and Mistral decoders.

`install(model)` swaps each layer's `self_attn` for a `KVAttention` that owns the same projection
modules (so the state dict keeps its names) and reads three kinds of cache:
- a kvshrink `KVCache`: tokens go into the slot store and attention reads only live slots;
- no cache (training, scoring a whole sequence): DMS applies the delayed-eviction mask, a training forward
  saying what it needs through one `TrainSignals` (`dms_signals=`);
- any other transformers `Cache` (e.g. `DynamicCache`): the model's usual attention, unchanged.
Nothing global is patched: only the model passed in changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .cache import KVCache
from .dms.config import DMSConfig
from .dms.mask import delayed_eviction_bias, flex_delayed_eviction_attention, hard_log_keep, sink_tokens, soft_log_keep
from .dms.retention import adapter_logits, borrowed_channel_keep, forced_logits, gumbel_sigmoid, neuron_logits
from .dms.signals import TrainSignals
from .errors import KVShrinkError
from .policies.base import dms_model_needed
from .shapes import check_family, decoder_layers


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (B, T, D) from the model's rotary embedding (HF's half-split convention)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int, device) -> torch.Tensor:
    """(B, Q) bool: which new tokens are real (not padding), read off the model's 4D mask.

    The last query row of a causal mask shows every new column; left padding is the only way a
    new column is hidden from it. No mask means no padding.
    """
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, -q_len:]
    return row if row.dtype == torch.bool else row == 0


class KVAttention(nn.Module):
    """Self-attention with optional DMS eviction decisions (see `kvshrink.dms`)."""

    def __init__(self, hf_attn: nn.Module, config):
        super().__init__()
        self.config = config
        self.layer_idx = hf_attn.layer_idx
        self.head_dim = hf_attn.head_dim
        self.scaling = hf_attn.scaling
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.n_kv_heads  # read by HF's attention functions
        self.attention_dropout = hf_attn.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(hf_attn, "sliding_window", None)
        if config.model_type == "mistral":
            self.sliding_window = getattr(config, "sliding_window", None)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj
        self.q_norm = getattr(hf_attn, "q_norm", None)  # Qwen3
        self.k_norm = getattr(hf_attn, "k_norm", None)
        self.dms: DMSConfig | None = None  # set by kvshrink.attach_dms
        self.dms_proj_alpha_norm: nn.Module | None = None  # adapter variant (release names)
        self.dms_proj_alpha: nn.Linear | None = None
        self._keep = None  # cached borrowed-channel multiplier (neuron variant)
        self.train(hf_attn.training)  # a new module starts in training mode; follow the model's

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                dms_residual=None, dms_signals: TrainSignals | None = None, **kwargs):
        """dms_residual: the layer's input before its norm (the adapter reads it; `attach` passes it);
        dms_signals: what a training or inspecting forward asks (`TrainSignals`)."""
        signals = dms_signals or TrainSignals()
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 passes `cache`
        B, T, _ = hidden_states.shape
        dms = None if signals.teacher else self.dms
        steps = self._positions(past_key_values, B, T, hidden_states.device) if dms and dms.forced_keep_every else None
        q, k, v, logits = self.project(hidden_states, position_embeddings, dms_residual, dms, steps)
        if isinstance(past_key_values, KVCache):
            out = self._cached_attention(q, k, v, logits, attention_mask, past_key_values)
        elif logits is not None:
            out = self._dms_full_attention(q, k, v, logits, attention_mask, past_key_values, signals)
        else:
            out = self._hf_attention(q, k, v, attention_mask, past_key_values, kwargs)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), None

    def project(self, hidden_states, position_embeddings, dms_residual, dms: DMSConfig | None, steps=None):
        """Queries, keys, values (B, H|Hkv, T, D) after RoPE, and DMS logits (B, Hkv, T) or None: what every
        path, the fixed-shape decode step included, computes before it reads a cache.
        steps: (B, T) step indices of the tokens, read only by forced decisions."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        logits = None
        if dms is not None and dms.decision == "neuron":
            logits = neuron_logits(q, self.n_kv_heads, dms)
            q = q * self._channel_keep(q)
        elif dms is not None:
            logits = adapter_logits(self.dms_proj_alpha_norm, self.dms_proj_alpha, dms_residual, dms)

        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if dms is not None and dms.decision == "neuron":
            q = q * self._channel_keep(q)  # RoPE mixed it back in from its rotary pair

        if dms is not None and dms.disable_eviction:
            logits = None
        elif dms is not None:
            if dms.forced_keep_every:
                logits = forced_logits(steps, self.n_kv_heads, dms.forced_keep_every)
            if dms.alpha_per == "layer":
                logits = logits[:, :1].expand_as(logits)
        return q, k, v, logits

    def _channel_keep(self, q: torch.Tensor) -> torch.Tensor:
        if self._keep is None or self._keep.dtype != q.dtype or self._keep.device != q.device:
            self._keep = borrowed_channel_keep(self.n_heads, self.n_kv_heads, self.head_dim, q.dtype, q.device)
        return self._keep

    # -- the three paths ------------------------------------------------------------------------------
    def _cached_attention(self, q, k, v, logits, attention_mask, cache: KVCache):
        B, _, T, _ = q.shape
        if self.sliding_window and cache.get_seq_length(self.layer_idx) + T > self.sliding_window:
            raise KVShrinkError(
                f"this model uses sliding-window attention ({self.sliding_window} tokens), which kvshrink's cache "
                f"does not implement; keep prompt + generation within {self.sliding_window} tokens"
            )
        if cache.policy.needs_dms and logits is None and self.dms is None:
            raise dms_model_needed(cache.policy.name)
        valid = new_token_validity(attention_mask, B, T, q.device)
        decisions = (logits > 0) if (logits is not None and cache.policy.needs_dms) else None
        return cache.attend(self.layer_idx, q, k, v, self.scaling, valid, decisions)

    def _dms_full_attention(self, q, k, v, logits, attention_mask, hf_cache, signals: TrainSignals):
        """Whole-sequence DMS attention with the delayed-eviction mask (training and reference scoring)."""
        if isinstance(hf_cache, Cache):
            if hf_cache.get_seq_length(self.layer_idx) > 0:
                raise KVShrinkError(
                    "a DMS model decodes only with a kvshrink cache: pass past_key_values=kvshrink.DMSCache(model) "
                    "or use kvshrink.generate"
                )
            hf_cache.update(k, v, self.layer_idx)
        B, H, T, D = q.shape
        if self.training:
            uniform = signals.uniform
            z, hard = gumbel_sigmoid(logits, self.dms.tau, None if uniform is None else uniform[self.layer_idx])
            log_keep = soft_log_keep(z)
        else:
            hard = (logits > 0).to(q.dtype)
            log_keep = hard_log_keep(logits > 0)
        valid = new_token_validity(attention_mask, B, T, q.device)
        if self.dms.sinks:  # sinks stay, and their decisions (at the next position) count as "keep"
            sink = sink_tokens(valid, self.dms.sinks)
            log_keep = log_keep.masked_fill(sink[:, None, :], 0.0)
            decides_sink = F.pad(sink[:, :-1], (1, 0), value=False)  # the decision at t+1 marks token t
            hard = hard.masked_fill(decides_sink[:, None, :], 0.0)
        if signals.collect is not None:
            signals.collect.append({"layer": self.layer_idx, "flags": hard, "logits": logits})
        # training at 2k-8k tokens: no T x T mask. flex has no CPU backward, so CPU training keeps the math path (same values)
        if signals.flex and attention_mask is None and (q.is_cuda or not log_keep.requires_grad):
            return flex_delayed_eviction_attention(q, k, v, log_keep, self.dms.window, self.scaling)
        bias = delayed_eviction_bias(log_keep, self.dms.window).to(q.dtype)  # (B, Hkv, T, T)
        if attention_mask is not None:  # padding: hide padded keys (a query still sees itself)
            pad = ~valid
            bias = bias.masked_fill(pad[:, None, None, :] & ~torch.eye(T, dtype=torch.bool, device=q.device), float("-inf"))
        G = H // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, G * T, D)  # query heads grouped per KV head: no repeat_kv
        mask = bias[:, :, None].expand(B, self.n_kv_heads, G, T, T).reshape(B, self.n_kv_heads, G * T, T)
        if mask.requires_grad:
            # training: the retention gradient flows through the mask. GPU fused kernels either take no
            # mask or fail on a mask gradient in this layout, so the plain math runs here.
            scores = (qg @ k.transpose(-1, -2)) * self.scaling + mask
            probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(v.dtype), self.attention_dropout, training=True)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(B, H, T, -1)

    def _hf_attention(self, q, k, v, attention_mask, hf_cache, kwargs):
        """The model's own attention (any transformers cache, or none)."""
        if hf_cache is not None:
            k, v = hf_cache.update(k, v, self.layer_idx)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if self.sliding_window:
            kwargs["sliding_window"] = self.sliding_window
        out, _ = fn(
            self, q, k, v, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return out.transpose(1, 2)  # HF returns (B, T, H, D)

    def _positions(self, cache, B, T, device) -> torch.Tensor:
        """Token positions (step index, padding included) of this forward's tokens, for forced decisions."""
        start = cache.get_seq_length(self.layer_idx) if isinstance(cache, Cache) else 0
        return (torch.arange(T, device=device) + start).expand(B, T)


def install(model):
    """Give `model` kvshrink's attention (idempotent). Returns the model."""
    check_family(model.config)
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    for layer in decoder_layers(model):
        if not isinstance(layer.self_attn, KVAttention):
            layer.self_attn = KVAttention(layer.self_attn, model.config)
    return model
