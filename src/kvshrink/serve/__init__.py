"""An OpenAI-compatible server whose batching and admission use the memory DMS frees: its KV budget counts
the bytes the caches really allocate."""

from .engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "build_engine"]


def build_engine(model, tokenizer, policy: str | None = None, cr: float | None = None, budget_tokens: int | None = None,
                 budget_mb: float | None = None, max_batch: int = 64, prefill_chunk: int = 256,
                 paged: bool | None = None) -> Engine:
    """An engine for `model` under its default (or the named) policy, with a budget on the bytes its KV caches
    allocate: `budget_mb` MB (MiB), or `budget_tokens` tokens of a vanilla cache (the bytes that many tokens' keys,
    values and slot metadata take in a cache that keeps every token; a DMS model holds about CR times more tokens
    in them).
    prefill_chunk: prompt tokens read per engine step, between the running batch's decode steps (DMS reads
    them in one forward: its output does not depend on the chunk; budget policies keep their 16-token chunks).
    paged: keys and values in blocks per (sequence, KV head) (None: when the policy frees memory), or contiguous."""
    import dataclasses

    from ..cache import footprint
    from ..errors import KVShrinkError
    from ..policies import CachePolicy, DMSPolicy, for_model
    from .scheduler import size

    pol = for_model(model, policy, cr=cr)
    if pol.name != "none" and not pol.frees_memory:
        raise KVShrinkError(f"{pol.name} keeps every token (it saves reads, not memory): serve with none, dms, tova, h2o or window")
    expected = pol.expected_cr or 1.0
    if isinstance(pol, DMSPolicy):
        window = pol.window
        pol = dataclasses.replace(pol, prefill_chunk=prefill_chunk)
    else:
        window = pol.prefill_chunk or 0  # a prefill chunk is held whole before eviction
    if (budget_tokens is None) == (budget_mb is None):
        raise KVShrinkError("give exactly one of --kv-budget-tokens or --kv-budget-mb")
    if budget_tokens is not None:
        budget = budget_tokens * footprint(model, CachePolicy()).slot
    else:
        budget = int(budget_mb * 2**20)
    engine = Engine(model, tokenizer, pol, budget_bytes=budget, max_batch=max_batch, expected_cr=expected, window=window,
                    prefill_chunk=prefill_chunk, paged=paged)
    smallest = engine.scheduler.allocated([(1, 1, 1)])
    if budget < smallest:
        raise KVShrinkError(f"the KV budget of {size(budget)} holds no request (a one-token one needs {size(smallest)}); "
                            "raise --kv-budget-tokens or --kv-budget-mb")
    return engine
