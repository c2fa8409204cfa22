"""Batched generation through a `KVCache`, with the accounting every policy is compared on.

Prompts are left-padded; `prefill` reads them in chunks (same eviction rule as decode), then
`decode_step` feeds one token per row at a time. These two steps are kvshrink's only forwards through a
`KVCache`: the server, KVTC's prefix reuse and the KVTC study run them too, so every path writes,
evicts and counts the same way. Stats follow docs/conventions.md:
- kv_reads: over every generated token (the first comes from the prompt's last position), the cached
  tokens its query attends, itself included, averaged over (layer, KV head), summed over sequences;
- prefill_kv_reads: the same for the other prompt positions;
- peak_kv_tokens: max over time of live cached tokens (averaged over (layer, KV head)) summed over the
  sequences in flight. The last generated token is never written to the cache, so vanilla's peak is
  prompt + generated - 1 per sequence;
- compression_ratio: vanilla kv_reads for the same token sequences / the policy's kv_reads;
- cache_bytes: peak bytes the cache actually allocated (keys, values, slot and row metadata, policy state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .accounting import vanilla_reads
from .cache import KVCache
from .errors import KVShrinkError, check_prefill_chunk
from .fast_decode import FixedDecoder, supports
from .policies import CachePolicy, for_model
from .prompts import chat_prompt, pad_token_id
from .shapes import check_context
from .shims import cache_arg

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]
    stats: dict
    per_sequence: dict = field(default_factory=dict, repr=False)  # tensors (B,): reads, peak tokens, lengths


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise KVShrinkError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if not 0 <= temperature < float("inf"):  # nan too
        raise KVShrinkError(f"--temperature must be a number >= 0 (got {temperature}); 0 is greedy, e.g. --temperature 0.7")
    if not 0 < top_p <= 1:
        raise KVShrinkError(f"--top-p must be in (0, 1] (got {top_p}); 1 samples from every token, e.g. --top-p 0.9")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(cut, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model, cache: KVCache, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor,
            chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The one prefill: read left-padded `ids` (B, P) into `cache` after what it holds, `chunk` tokens per
    forward. attn: (B, seen + P) mask of every position the cache will have seen (0 = padding);
    positions: (B, P). Returns the last position's logits (B, V) and each row's reads of the other
    positions (`prefill_kv_reads`, summed per chunk); the last position's reads count for the first
    generated token: they stay in `cache.accounting.last_reads[:, -1]`."""
    B, P = ids.shape
    if P == 0:
        raise KVShrinkError("nothing to prefill: give at least one token")
    chunk = cache.policy.prefill_chunk or chunk  # evicting policies read prompts in 16-token chunks (docs/conventions.md)
    seen = cache.get_seq_length()
    reads = torch.zeros(B, dtype=torch.float64, device=ids.device)
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        out = model(ids[:, s:e], attention_mask=attn[:, :seen + e], position_ids=positions[:, s:e],
                    **cache_arg(cache), use_cache=True, logits_to_keep=1)
        step_reads = cache.accounting.last_reads
        reads += (step_reads[:, :-1] if e == P else step_reads).sum(-1)
    return out.logits[:, -1], reads


@torch.no_grad()
def decode_step(model, cache: KVCache, tokens: torch.Tensor, attn: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
    """The one decode step: feed one token per row, tokens (B,) at positions (B,), through `cache`; the
    next token's logits (B, V). attn: (B, seen + 1) mask (0 = padding: a finished row's token), None when
    no row pads. Each row's reads are then `cache.accounting.last_reads[:, 0]`."""
    out = model(tokens[:, None], attention_mask=attn, position_ids=positions[:, None], **cache_arg(cache), use_cache=True)
    return out.logits[:, -1]


def prefill_row(model, cache: KVCache, ids: list[int], chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """`prefill` of one unpadded row, `ids` after whatever `cache` holds; returns the last logits (V,)."""
    device = next(model.parameters()).device
    seen = cache.get_seq_length()
    row = torch.tensor([ids], dtype=torch.long, device=device)
    attn = torch.ones(1, seen + len(ids), dtype=torch.long, device=device)
    positions = torch.arange(seen, seen + len(ids), device=device)[None]
    return prefill(model, cache, row, attn, positions, chunk)[0][0]


@torch.no_grad()
def decode_rows(model, cache: KVCache, token: torch.Tensor, attn: torch.Tensor, last_pos: torch.Tensor,
                max_new_tokens: int, eos_token_id: int | list[int] | None = None, temperature: float = 0.0,
                top_p: float = 1.0, generator: torch.Generator | None = None, fixed: bool = False):
    """Decode every row of `cache` from its first new token `token` (B,): write it, feed it, sample the
    next, until each row has written an eos token or `max_new_tokens` tokens. attn: (B, S) mask of the
    positions the cache has seen (0 = padding); last_pos: (B,) position of each row's last one. A finished
    row's later tokens are fed as padding and dropped.
    fixed: decode with the fixed-shape step (`kvshrink.fast_decode`); the cache's tokens move into its state
    (the cache is left empty), the reads and peaks are counted the same way.
    Returns (new tokens per row, eos included; their count (B,); decode reads per row (B,))."""
    device = token.device
    eos = torch.tensor([] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       dtype=token.dtype, device=device)
    finished = torch.zeros(token.shape[0], dtype=torch.bool, device=device)
    n_generated = torch.zeros(token.shape[0], dtype=torch.long, device=device)
    reads = torch.zeros(token.shape[0], dtype=torch.float64, device=device)
    generated = []
    decoder = FixedDecoder.take(model, cache, max_new_tokens) if fixed else None
    for step in range(max_new_tokens):
        generated.append(token)
        n_generated += (~finished).long()
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        last_pos = last_pos + 1
        if decoder is None:
            attn = torch.cat([attn, (~finished).long()[:, None]], dim=1)
            logits = decode_step(model, cache, token, attn, last_pos)
            reads += cache.accounting.last_reads[:, 0]
        else:
            logits = decoder.step(token, last_pos, ~finished)
            live = decoder.state.live_tokens().sum((0, 2)).double() / cache.accounting.pairs
            step_reads = live * ~finished  # every live token is read, the new one included; padding reads nothing
            cache.accounting.note_live(live, step_reads[:, None])
            reads += step_reads
        token = sample_next(logits, temperature, top_p, generator)
    if decoder is not None:
        decoder.check()
    rows = torch.stack(generated, dim=1).tolist()
    return [row[: int(n)] for row, n in zip(rows, n_generated.tolist())], n_generated, reads


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[list[int]],
    policy: CachePolicy,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    reserve: int = 0,
    group: int = 1,
    paged: bool | None = None,
    trace: bool = False,
    fixed: bool | None = None,
) -> tuple[list[list[int]], dict, dict]:
    """Generate for token-id prompts. Returns (generated ids per sequence, stats, per-sequence tensors).
    paged: the cache's key/value layout (`KVCache`; None: blocks when the policy frees memory).
    fixed: decode with the fixed-shape step (`kvshrink.fast_decode`, policies none and DMS); None: on CUDA
    where the policy allows it.

    group: consecutive sequences that sample one problem (W = group); per_sequence["group_peak_kv_tokens"]
    then holds each problem's peak of its samples' live tokens summed (docs/conventions.md). When a group's prompts are
    the same, the prompt is read once and its cache copied to the W rows: its prefill reads count once, on
    the group's first sequence.
    trace: per_sequence also holds every decode step's reads and live tokens, "read_trace" and "live_trace"
    (B, steps), and the prompt's peak, "prefill_peak_kv_tokens" (B,): what any shorter generation, or any
    subset of a group's samples, would have cost.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise KVShrinkError("empty prompt: give at least one token of text")
    check_prefill_chunk(prefill_chunk)
    check_context(model.config, max(len(p) for p in prompt_ids), max_new_tokens)
    device = next(model.parameters()).device
    fixed = device.type == "cuda" and supports(policy) if fixed is None else fixed
    if fixed and not supports(policy):
        raise KVShrinkError(f"the fixed-shape decode step runs policies 'none' and DMS, not {policy.name!r}")
    B = len(prompt_ids)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    P = int(lengths.max())
    input_ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        attn[i, P - len(p):] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)

    if group < 1 or B % group:
        raise KVShrinkError(f"{B} sequences do not split into problems of {group} samples")
    shared = group > 1 and all(prompt_ids[i] == prompt_ids[i - i % group] for i in range(B))
    read = slice(None, None, group) if shared else slice(None)  # the rows whose prompts are read
    cache = KVCache(model, policy, reserve=reserve, paged=paged)
    cache.accounting = cache.accounting.fresh(torch.arange(B, device=device)[read] // group)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    start = time.perf_counter()
    logits, prefill_reads = prefill(model, cache, input_ids[read], attn[read], positions[read], prefill_chunk)
    prefill_peak = cache.accounting.peak_tokens_per_seq
    if shared:
        cache.repeat_rows(group)
        logits = logits.repeat_interleave(group, 0)
        prefill_reads = torch.zeros(B, dtype=prefill_reads.dtype, device=device).index_copy_(0, torch.arange(0, B, group, device=device), prefill_reads)
        prefill_peak = prefill_peak.repeat_interleave(group)
    first_reads = cache.accounting.last_reads[:, -1]
    cache.accounting.trace = trace
    prefill_seconds = time.perf_counter() - start

    first = sample_next(logits, temperature, top_p, generator)
    tokens, n_generated, decode_reads = decode_rows(model, cache, first, attn, positions[:, -1], max_new_tokens,
                                                    eos_token_id, temperature, top_p, generator, fixed)
    reads = first_reads + decode_reads
    seconds = time.perf_counter() - start

    real_prompt = lengths.to(torch.float64)
    n_gen = n_generated.to(torch.float64)
    vanilla = vanilla_reads(real_prompt, n_gen)
    total_reads = float(reads.sum())
    stats = {
        "prompt_tokens": int(lengths.sum()),
        "generated_tokens": int(n_generated.sum()),
        "kv_reads": total_reads,
        "prefill_kv_reads": float(prefill_reads.sum()),
        "peak_kv_tokens": float(cache.accounting.peak_tokens_total),
        "cache_bytes": int(cache.accounting.peak_bytes),
        "compression_ratio": float(vanilla.sum()) / total_reads if total_reads else 1.0,
        "seconds": seconds,
        "prefill_seconds": prefill_seconds,
        "decode_tokens_per_second": (float(n_generated.sum()) - B) / max(seconds - prefill_seconds, 1e-9),
        **policy.describe(),
    }
    per_sequence = {
        "kv_reads": reads.cpu(),
        "vanilla_kv_reads": vanilla.cpu(),
        "prefill_kv_reads": prefill_reads.cpu(),
        "peak_kv_tokens": cache.accounting.peak_tokens_per_seq.cpu(),
        "prompt_tokens": lengths.cpu(),
        "generated_tokens": n_generated.cpu(),
        "group_peak_kv_tokens": cache.accounting.peak_tokens_per_group.cpu(),
    }
    if trace:
        steps = cache.accounting.read_trace
        per_sequence["read_trace"] = torch.cat([r[:, :1] for r in steps], 1).cpu() if steps else torch.zeros(B, 0, dtype=torch.float64)
        per_sequence["live_trace"] = torch.stack(cache.accounting.live_trace, 1).cpu() if steps else torch.zeros(B, 0, dtype=torch.float64)
        per_sequence["first_kv_reads"] = first_reads.cpu()
        per_sequence["prefill_peak_kv_tokens"] = prefill_peak.cpu()
    return tokens, stats, per_sequence


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    if any(not p or not p.strip() for p in prompts):
        raise KVShrinkError("empty prompt: give some text to continue")
    if chat:
        return [chat_prompt(tokenizer, p) for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def generate(
    model,
    tokenizer,
    prompts: str | list[str],
    policy: str | CachePolicy | None = None,
    cr: float | None = None,
    *,
    window: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    chat: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    reserve: int = 0,
    sinks: int | None = None,
) -> GenerationResult:
    """Generate `n` continuations per prompt under a cache policy; greedy when temperature == 0.

    policy: a name (none, dms, dms-immediate, tova, h2o, window, quest; the last four need `cr`) or a
    `CachePolicy`; default 'dms' on a DMS model, else 'none'.
    `texts`/`tokens` hold the generated part only, one entry per sequence (prompt-major, n per prompt).
    Reusing stored prefixes instead of prefilling them is `kvtc.generate_with_prefix_store`, which calls this
    module's steps.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if n < 1:
        raise KVShrinkError(f"--n must be >= 1 (got {n})")
    pol = for_model(model, policy, cr=cr, window=window, sinks=sinks)
    ids = encode_prompts(tokenizer, prompts, chat)
    ids = [p for p in ids for _ in range(n)]
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    tokens, stats, per_seq = generate_ids(
        model, ids, pol, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        eos_token_id=eos, pad_token_id=pad, prefill_chunk=prefill_chunk, reserve=reserve, group=n,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationResult(texts=texts, tokens=tokens, stats=stats, per_sequence=per_seq)
