"""Generation that restores stored prompt prefixes instead of recomputing them (KVTC's use).

One prompt at a time (batch 1): the longest stored prefix of its tokens is decompressed into a
`KVCache`, only the rest is prefilled, and after generating, the prompt's own cache is compressed and
stored once, for later prompts that extend it (the next turn of a chat, a few-shot prefix shared by
many problems). A stored prefix stops one token short of its prompt: the last prompt token has to run
through the model anyway, for the first generated token's logits, and the shorter prefix still serves
every prompt that extends the stored one. Prompts of one call that share a beginning (a few-shot
prefix) also store that shared part, once, so the others restore it instead of prefilling it.
"""

from __future__ import annotations

import time

import torch

from ..cache import KVCache
from ..generation import (DEFAULT_PREFILL_CHUNK, GenerationResult, check_sampling, decode_rows, encode_prompts, prefill_row,
                          sample_next)
from ..policies import CachePolicy, for_model
from .cache_io import export_cache, pack_cache, restore_cache, unpack_cache
from .calibration import Calibration, ModelIdentity
from .errors import KVTCFormatError
from .store import PrefixStore

MIN_SHARED_PREFIX = 64  # a shorter shared beginning is not worth an entry of its own


def generate_with_prefix_store(model, tokenizer, prompts: str | list[str], store: PrefixStore, calibration: Calibration,
                               cr: float, *, policy: str | CachePolicy | None = None, window: int | None = None,
                               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                               chat: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> GenerationResult:
    """`kvshrink.generate` for prompts that share prefixes, through a `PrefixStore` of their caches
    compressed at `cr` (see the module docstring). Policies: 'none', 'dms' (default on a DMS model) or
    'window'; the store should be keyed by everything its blobs depend on (`PrefixStore`'s identity):
    an entry this calibration or policy cannot read is recomputed and overwritten.

    stats: prompt/generated tokens, `prefix_tokens_reused` (tokens restored instead of prefilled),
    `prefix_hits`, `prefixes_stored`, and seconds spent restoring (read + decompress + restore),
    prefilling, decoding and storing (compress + write)."""
    pol = for_model(model, policy, window=window)
    calibration.check(ModelIdentity.from_model(model))
    calibration.plan(cr)  # an unplanned ratio fails now, not after the first prompt has been generated
    check_sampling(max_new_tokens, temperature, top_p)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    stats = dict.fromkeys(("prompt_tokens", "generated_tokens", "prefix_tokens_reused", "prefix_hits", "prefixes_stored"), 0)
    seconds = dict.fromkeys(("restore_seconds", "prefill_seconds", "decode_seconds", "store_seconds"), 0.0)
    all_tokens = []
    start = time.perf_counter()
    encoded = encode_prompts(tokenizer, prompts, chat)
    for ids, shared in zip(encoded, _shared_cuts([ids[:-1] for ids in encoded])):
        clock = time.perf_counter()
        prefix = ids[:-1]
        cache, reused = _restore_longest(model, pol, store, calibration, prefix)
        clock = _lap(seconds, "restore_seconds", clock, device)
        states, done = [], reused  # (length, exported cache): stored after generation, off the time to first token
        for cut in sorted(shared | {len(prefix)}):
            if cut > done:
                prefill_row(model, cache, prefix[done:cut], prefill_chunk)
                states.append((cut, export_cache(cache)))
                done = cut
        logits = prefill_row(model, cache, ids[-1:])
        clock = _lap(seconds, "prefill_seconds", clock, device)
        seen = cache.get_seq_length()
        first = sample_next(logits[None], temperature, top_p, generator)
        tokens = decode_rows(model, cache, first, torch.ones(1, seen, dtype=torch.long, device=device),
                             torch.tensor([seen - 1], device=device), max_new_tokens, tokenizer.eos_token_id,
                             temperature, top_p, generator)[0][0]
        clock = _lap(seconds, "decode_seconds", clock, device)
        for cut, state in states:
            stats["prefixes_stored"] += store.put(prefix[:cut], pack_cache(state, model, calibration, cr, pol))
        _lap(seconds, "store_seconds", clock, device)
        all_tokens.append(tokens)
        stats["prompt_tokens"] += len(ids)
        stats["generated_tokens"] += len(tokens)
        stats["prefix_tokens_reused"] += reused
        stats["prefix_hits"] += reused > 0
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in all_tokens]
    return GenerationResult(texts=texts, tokens=all_tokens, stats={
        **stats, **seconds, "seconds": time.perf_counter() - start, "cr": cr, **pol.describe()})


def _shared_cuts(prefixes: list[list[int]]) -> list[set[int]]:
    """For each token list, the lengths of the beginnings it shares with the others, each at least
    `MIN_SHARED_PREFIX`. Sorted, a list shares the most with its neighbours, so only those are compared."""
    order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
    cuts = [set() for _ in prefixes]
    for a, b in zip(order, order[1:]):
        x, y = prefixes[a], prefixes[b]
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        if n >= MIN_SHARED_PREFIX:
            cuts[a].add(n)
            cuts[b].add(n)
    return cuts


def _restore_longest(model, policy: CachePolicy, store: PrefixStore, calibration: Calibration,
                     prefix: list[int]) -> tuple[KVCache, int]:
    """A cache holding the longest stored prefix of `prefix`, and its length (an empty cache and 0 if none).
    An entry this calibration or policy cannot read is dropped: it is recomputed and stored again."""
    hit = store.longest_prefix(prefix) if prefix else None
    if hit is not None:
        n, data = hit
        try:
            return restore_cache(model, policy, *unpack_cache(data, model, calibration, policy)), n
        except KVTCFormatError:
            store.remove(prefix[:n])
    return KVCache(model, policy), 0


def _lap(seconds: dict, key: str, since: float, device: torch.device) -> float:
    if device.type == "cuda":  # the GPU's queued work belongs to the stage that queued it
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    seconds[key] += now - since
    return now
