"""Decode speed of every cache policy at one compression ratio (the baseline speed bars at batch 8: docs/conventions.md).

    python benchmarks/decode_policies.py                       # CPU, fp32, 4k context, batch 8, CR 4
    python benchmarks/decode_policies.py --device cuda --dtype bfloat16 --tag cuda

Same model and method as `benchmarks/decode.py` (random-init ~17M Llama; the cache is brought to its
state after C tokens through its own write path, then decode steps through the real forward are timed, the policies in turn).
Per policy at CR X: DMS with decisions forced to keep 1 of X tokens (w = 64); TOVA, H2O and the window
evict to ceil(t / X) as they fill (chunks of 1,024 tokens, then every step); Quest stores all tokens and
reads the selected pages. Vanilla = the faster of HF's default cache and our preallocated dense cache.
Writes docs/results/decode-policies[-TAG].md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

from decode import bench_model, fill_hf, read_bandwidth, time_decode  # noqa: E402
from kvshrink.attention import install  # noqa: E402
from kvshrink.cache import KVCache  # noqa: E402
from kvshrink.attach import attach_dms  # noqa: E402
from kvshrink.dms.config import DMSConfig  # noqa: E402
from kvshrink.dms.retention import forced_logits  # noqa: E402
from kvshrink.policies import CachePolicy, DMSPolicy, for_model  # noqa: E402

WINDOW = 64


def fill(cache: KVCache, model, batch: int, context: int, device, dtype, keep_every: int | None = None):
    """Write `context` random tokens per layer through the cache's write path, applying the policy's
    budget after each 1,024-token chunk as a forward would."""
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    policy = cache.policy
    for s in range(0, context, 1024):
        q = min(1024, context - s)
        decisions = None
        if keep_every:
            decisions = forced_logits(torch.arange(s, s + q, device=device).expand(batch, q), hkv, keep_every) > 0
        for layer in cache.layers:
            k = torch.randn(batch, hkv, q, d, device=device, dtype=dtype)
            if not layer.is_initialized:
                layer.lazy_initialization(k, k)
            layer.write(k, torch.randn_like(k), torch.ones(batch, q, dtype=torch.bool, device=device), decisions)
            scores = policy.keep_scores(layer)
            if scores is not None:
                layer.enforce_budget(policy.budget(layer), scores, q)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cr", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per policy, taken in turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = bench_model(device, dtype)
    ours = install(copy.deepcopy(model))
    dms = attach_dms(copy.deepcopy(ours), DMSConfig(window=WINDOW, forced_keep_every=args.cr))
    bw = read_bandwidth(device, dtype)
    B, C = args.batch, args.context
    sizes = {}
    grown = args.rounds * (args.steps + 5)  # every round decodes 5 warm-up steps and one timed block
    runs = {"vanilla (HF cache)": (model, fill_hf(model, B, C, device, dtype)),
            "vanilla (our dense cache)": (ours, KVCache(ours, CachePolicy(), reserve=C + grown + 8)),
            f"dms (forced 1 in {args.cr}, w={WINDOW})": (dms, KVCache(dms, DMSPolicy(WINDOW)))}
    runs.update({name: (ours, KVCache(ours, for_model(ours, name, cr=args.cr))) for name in ("tova", "h2o", "window", "quest")})
    for name, (m, cache) in runs.items():
        if isinstance(cache, KVCache):
            fill(cache, m, B, C, device, dtype, args.cr if name.startswith("dms") else None)
    # round robin, best block per policy: a slow spell of the machine hits every policy alike
    times = {name: float("inf") for name in runs}
    for r in range(args.rounds):
        for name, (m, cache) in runs.items():
            times[name] = min(times[name], time_decode(m, cache, B, C + r * (args.steps + 5), args.steps, device, blocks=1))
    for name, (m, cache) in runs.items():
        if isinstance(cache, KVCache):
            sizes[name] = cache.allocated_bytes()
        print(f"{name}: {B / times[name]:,.0f} tok/s", flush=True)
    vanilla = min(times["vanilla (HF cache)"], times["vanilla (our dense cache)"])
    cmd = "python benchmarks/decode_policies.py " + " ".join(sys.argv[1:])
    lines = [f"# Decode speed per policy: context {C:,}, batch {B}, CR {args.cr} ({args.device}, {args.dtype})", "",
             f"Command: `{cmd}`. Read bandwidth {bw / 1e9:.1f} GB/s. Best of {args.rounds} blocks of "
             f"{args.steps} steps (each after 5 warm-up steps), the policies taking turns block by block.", "",
             "| policy | decode tok/s | vs vanilla | cache MB |", "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {B / t:,.0f} | {vanilla / t:.2f}x | {sizes[name] / 1e6:,.1f} |" if name in sizes
                     else f"| {name} | {B / t:,.0f} | {vanilla / t:.2f}x | - |")
    dms_name = next(name for name in runs if name.startswith("dms"))
    for name in ("tova", "h2o", "window"):
        if times[name] < times[dms_name]:  # the bar: DMS the fastest at equal CR, or say why
            lines += ["", f"{name} decodes faster than DMS here ({times[dms_name] / times[name]:.2f}x). At the same CR, "
                          f"DMS's cache holds {100 * (sizes[dms_name] / sizes[name] - 1):.0f}% more bytes "
                          f"({sizes[dms_name] / 1e6:.1f} vs {sizes[name] / 1e6:.1f} MB): the last w = {WINDOW} tokens, "
                          f"whose eviction is delayed, stay on top of the 1 in {args.cr} kept."]
    out = HERE.parent / "docs" / "results" / f"decode-policies{'-' + args.tag if args.tag else ''}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
