"""An OpenAI-compatible server whose batching and admission use the memory DMS frees."""

from .engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "build_engine"]


def build_engine(model, tokenizer, policy: str | None = None, cr: float | None = None, budget_tokens: int | None = None,
                 budget_mb: float | None = None, max_batch: int = 64, prefill_chunk: int = 256) -> Engine:
    """An engine for `model` under its default (or the named) policy, with a budget in KV slots the caches may
    allocate (per layer and KV head, over all sequences) or in MB they may allocate.
    prefill_chunk: prompt tokens read per engine step, between the running batch's decode steps (DMS reads
    them in one forward: its output does not depend on the chunk; budget policies keep their 16-token chunks)."""
    import dataclasses

    from ..cache import slot_bytes
    from ..errors import KVShrinkError
    from ..policies import DMSPolicy, for_model

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
    budget = budget_tokens if budget_tokens is not None else int(budget_mb * 2**20 // slot_bytes(model, pol))
    if budget < 1:
        raise KVShrinkError(f"the KV budget must hold at least one slot (got {budget}); raise --kv-budget-tokens or --kv-budget-mb")
    return Engine(model, tokenizer, pol, budget_tokens=budget, max_batch=max_batch, expected_cr=expected, window=window,
                  prefill_chunk=prefill_chunk)
