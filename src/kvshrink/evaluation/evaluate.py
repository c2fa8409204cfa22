"""`kvshrink eval`: a task's problems through a cache policy, batched, W samples per problem, graded.

Accounting (docs/conventions.md): `kv_reads`, `prefill_kv_reads` and `peak_kv_tokens` are per-problem means (a
problem's peak is the max over time of its W samples' live tokens summed); `compression_ratio` is the
reads-based ratio over all generated tokens; `cache_bytes` the largest batch's peak allocation.
"""

from __future__ import annotations

import time

import torch

from ..accounting import vanilla_reads
from ..errors import KVShrinkError
from ..generation import generate_ids
from ..policies import for_model
from ..progress import advance, progress_bar, stop
from ..prompts import chat_prompt, pad_token_id
from ..tasks import answer_budget, extract_answer, make_problems
from .voting import majority_vote


def evaluate(model, tokenizer, task: str, policy=None, *, cr: float | None = None, window: int | None = None,
             problems: int = 100, seed: int = 0, difficulty: int | None = None, width: int = 1,
             max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             batch_size: int = 8, first: int = 0, progress: bool = False, sinks: int | None = None,
             lengths: list[int] | None = None, widths: list[int] | None = None) -> dict:
    """Accuracy (majority vote of `width` samples) and cost of `problems` problems. Greedy when
    temperature == 0 (then width > 1 repeats one answer). Returns the accuracy and its 95% interval
    (`accuracy_interval`), `pass_at_w`, the costs (docs/conventions.md) and per-problem `results` (all but these
    are what `kvshrink eval --json` prints). `first` starts at a later problem (to split a run).

    lengths, widths: also what every shorter L (<= max_new_tokens) and smaller W (<= width) would have given,
    read off this run (`nested_points`): a generation stopped at L tokens is this one's first L tokens, and the
    first W of the samples are W samples. The result's "grid" holds one entry per (L, W)."""
    if width < 1:
        raise KVShrinkError(f"--width must be >= 1 (got {width})")
    if batch_size < 1:
        raise KVShrinkError(f"--batch-size must be >= 1 (got {batch_size})")
    items = make_problems(task, problems, seed=seed, difficulty=difficulty, first=first)
    if max_new_tokens is None:
        max_new_tokens = answer_budget(tokenizer, items)
    pol = for_model(model, policy, cr=cr, window=window, sinks=sinks)
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    totals = {"kv_reads": 0.0, "vanilla_kv_reads": 0.0, "prefill_kv_reads": 0.0, "peak_kv_tokens": 0.0}
    cache_bytes, results, traces = 0, [], []
    nested = lengths is not None or widths is not None
    bar = progress_bar(progress, f"{task} ({pol.describe()['policy']})", len(items))
    start = time.perf_counter()
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        ids = [chat_prompt(tokenizer, p.prompt) for p in chunk for _ in range(width)]
        tokens, stats, per_seq = generate_ids(model, ids, pol, max_new_tokens=max_new_tokens, temperature=temperature,
                                              top_p=top_p, seed=seed + s, eos_token_id=eos, pad_token_id=pad, group=width,
                                              trace=nested)
        if nested:
            traces.append((chunk, tokens, per_seq))
        for key in ("kv_reads", "vanilla_kv_reads", "prefill_kv_reads"):
            totals[key] += float(per_seq[key].sum())
        totals["peak_kv_tokens"] += float(per_seq["group_peak_kv_tokens"].sum())
        cache_bytes = max(cache_bytes, stats["cache_bytes"])
        for i, p in enumerate(chunk):
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens[i * width:(i + 1) * width]]
            answers = [extract_answer(t, p.kind) for t in texts]
            results.append({"answer": _jsonable(p.answer), "voted": _jsonable(majority_vote(answers)),
                            "correct": majority_vote(answers) == p.answer, "any_correct": p.answer in answers,
                            "output": texts[0]})
        advance(bar, len(chunk), f"{sum(r['correct'] for r in results)}/{len(results)} correct")
    stop(bar)
    n = len(items)
    grid = nested_points(tokenizer, traces, width, lengths or [max_new_tokens], widths or [width]) if nested else None
    return {
        "task": task, "difficulty": items[0].difficulty, "policy": pol.describe()["policy"], "width": width,
        "max_new_tokens": max_new_tokens, "problems": n,
        "accuracy": sum(r["correct"] for r in results) / n, "accuracy_interval": wilson_interval(sum(r["correct"] for r in results), n),
        "pass_at_w": sum(r["any_correct"] for r in results) / n,
        "kv_reads": totals["kv_reads"] / n, "prefill_kv_reads": totals["prefill_kv_reads"] / n,
        "peak_kv_tokens": totals["peak_kv_tokens"] / n, "cache_bytes": cache_bytes,
        "compression_ratio": totals["vanilla_kv_reads"] / totals["kv_reads"] if totals["kv_reads"] else 1.0,
        "seconds": time.perf_counter() - start, "results": results, **({"grid": grid} if nested else {}),
    }


def nested_points(tokenizer, traces: list, width: int, lengths: list[int], widths: list[int]) -> list[dict]:
    """Accuracy and cost at every (L, W) of the grid, from traced batches of `width` samples per problem.

    At L: each sample's first L tokens are graded, its reads are its first token's plus those of the decode
    steps that made the next L - 1, and a problem's peak is its W samples' live tokens summed, at most over the
    prompt and those steps. The first W samples vote."""
    out = []
    for length in lengths:
        # each sample's answer at L, read once for every W
        answers = [[extract_answer(tokenizer.decode(t[:length], skip_special_tokens=True), chunk[j // width].kind)
                    for j, t in enumerate(tokens)] for chunk, tokens, _ in traces]
        for w in widths:
            correct, hit, reads, vanilla, prefill, peak = [], 0, 0.0, 0.0, 0.0, 0.0
            for (chunk, tokens, per_seq), batch_answers in zip(traces, answers):
                steps = per_seq["read_trace"][:, :length - 1]
                row_reads = per_seq["first_kv_reads"] + steps.sum(1)
                made = torch.tensor([min(len(t), length) for t in tokens], dtype=torch.float64)
                for i, p in enumerate(chunk):
                    rows = slice(i * width, i * width + w)
                    voters = batch_answers[rows]
                    correct.append(majority_vote(voters) == p.answer)
                    hit += p.answer in voters
                    reads += float(row_reads[rows].sum())
                    vanilla += float(vanilla_reads(per_seq["prompt_tokens"][rows].to(torch.float64), made[rows]).sum())
                    prefill += float(per_seq["prefill_kv_reads"][i * width:(i + 1) * width].sum())  # read once per problem
                    live = per_seq["live_trace"][rows, :length - 1].sum(0)
                    peak += max(float(per_seq["prefill_peak_kv_tokens"][rows].sum()), float(live.max()) if live.numel() else 0.0)
            n = len(correct)
            out.append({"L": length, "W": w, "problems": n, "accuracy": sum(correct) / n, "pass_at_w": hit / n,
                        "correct": [int(c) for c in correct],
                        "kv_reads": reads / n, "prefill_kv_reads": prefill / n, "peak_kv_tokens": peak / n,
                        "compression_ratio": vanilla / reads if reads else 1.0})
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% (Wilson score) interval of a proportion k / n: unlike the normal approximation it stays honest at
    the few problems a quick run has (8 of 8 right is 0.68-1.00, not 1.00 +- 0)."""
    p, scale = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / scale, z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / scale
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _jsonable(answer):
    return sorted(answer) if isinstance(answer, frozenset) else list(answer) if isinstance(answer, tuple) else answer
