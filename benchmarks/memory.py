"""Memory that follows live tokens: bytes a real DMS model's cache allocates, padded store against paged.

    python benchmarks/memory.py --model smollm2-dms8 --vanilla smollm2 --batch 8 --contexts 1024 2048 3072 --new-tokens 256

For each prompt length, `batch` windows of held-out Python-docs text (never trained on) are generated
greedily for `--new-tokens` tokens (no early stop, so every run decodes the same number of tokens)
through `kvshrink`'s generation, three ways:
- vanilla: the base model, dense cache (contiguous, preallocated as `generate` does it);
- DMS, padded: the slot store with one capacity per layer for every (sequence, KV head): the fullest sets it;
- DMS, paged: keys and values in blocks held per (sequence, KV head) (`kvshrink.blocks`).
Per run: peak allocated cache bytes (`cache_bytes`), peak live tokens, the ideal bytes of those live
tokens (peak live tokens x bytes per token), decode tokens/s and the reads-based CR. The two DMS stores run
side by side, decoding in turns of 16 steps (`run_interleaved`), so their speeds are compared under the same
conditions. Results are appended
to WORK/records.jsonl (a rerun skips finished points) and written to docs/results/memory.md + .png.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

import kvshrink
from kvshrink.corpora import pydoc_split
from kvshrink.accounting import vanilla_reads
from kvshrink.cache import KVCache
from kvshrink.generation import decode_step, generate_ids, prefill
from kvshrink.jsonl import append_jsonl, read_jsonl
from kvshrink.policies import for_model
from kvshrink.shapes import kv_head_dim

ROOT = Path(__file__).resolve().parents[1]
STORES = ("vanilla", "padded", "paged")
NOTES = [
    "The 3,072-token DMS rows run the two stores side by side, 16 decode steps each in turn, because the machine was "
    "shared during the run; the vanilla row of that context is from an earlier run with nothing else running.",
    "",
    "How decode attention reads the blocks, and what else was tried: "
    "[decode.md](decode.md#decode-attention-over-blocks-what-was-tried).",
]


def prompts(tok, batch: int, tokens: int) -> list[list[int]]:
    """`batch` consecutive windows of `tokens` held-out tokens."""
    ids = tok(pydoc_split()[1])["input_ids"]
    if len(ids) < batch * tokens:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than {batch} x {tokens}")
    return [ids[i * tokens:(i + 1) * tokens] for i in range(batch)]


def run_point(model, tok, store: str, context: int, args) -> dict:
    """Vanilla alone, through `generate_ids`."""
    ids = prompts(tok, args.batch, context)
    _, stats, _ = generate_ids(model, ids, for_model(model, "none"), max_new_tokens=args.new_tokens, eos_token_id=None,
                               pad_token_id=tok.pad_token_id or 0)
    return record(model, store, context, args, stats["cache_bytes"], stats["peak_kv_tokens"],
                  stats["decode_tokens_per_second"], stats["compression_ratio"])


@torch.no_grad()
def run_interleaved(model, tok, stores: list[str], context: int, args) -> list[dict]:
    """The DMS stores side by side: each reads the same prompts into its own cache, then they decode in turns of
    16 steps, so that whatever else the machine runs slows both alike; tokens/s = the store's tokens over its
    own decode time. Greedy, no early stop: every store writes the same tokens (the layouts are exact)."""
    ids = torch.tensor(prompts(tok, args.batch, context))
    attn, positions = torch.ones_like(ids), torch.arange(context).expand_as(ids)
    runs = {}
    for store in stores:
        cache = KVCache(model, for_model(model), paged=store == "paged")
        logits, _ = prefill(model, cache, ids, attn, positions)
        runs[store] = {"cache": cache, "token": logits.argmax(-1), "reads": cache.accounting.last_reads[:, -1].clone(),
                       "seconds": 0.0}
    for start in range(1, args.new_tokens, 16):
        for run in runs.values():
            began = time.perf_counter()
            for step in range(start, min(start + 16, args.new_tokens)):
                logits = decode_step(model, run["cache"], run["token"], None, torch.full((args.batch,), context + step - 1))
                run["reads"] += run["cache"].accounting.last_reads[:, 0]
                run["token"] = logits.argmax(-1)
            run["seconds"] += time.perf_counter() - began
    vanilla = float(vanilla_reads(torch.tensor(float(context)), torch.tensor(float(args.new_tokens)))) * args.batch
    return [record(model, store, context, args, run["cache"].accounting.peak_bytes, run["cache"].accounting.peak_tokens_total,
                   args.batch * (args.new_tokens - 1) / run["seconds"], vanilla / float(run["reads"].sum()))
            for store, run in runs.items()]


def record(model, store: str, context: int, args, cache_bytes, peak_kv_tokens, tokens_per_second, cr) -> dict:
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * kv_head_dim(config) * next(model.parameters()).element_size()
    return {"store": store, "context": context, "batch": args.batch, "new_tokens": args.new_tokens,
            "cache_bytes": int(cache_bytes), "peak_kv_tokens": float(peak_kv_tokens), "live_bytes": float(peak_kv_tokens) * per_token,
            "tokens_per_second": tokens_per_second, "cr": float(cr)}


def report(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "docs" / "results"
    vanilla = {r["context"]: r for r in rows if r["store"] == "vanilla"}
    lines = [
        "# Memory that follows live tokens: padded against paged DMS",
        "",
        f"Command: `python benchmarks/memory.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.dtype}; DMS model `{args.model}`, vanilla `{args.vanilla}`; {args.batch} sequences of held-out text, "
        f"{args.new_tokens} greedy tokens each (no early stop).",
        "",
        "allocated / live: peak allocated cache bytes over the bytes of the peak live tokens (keys and values only). "
        "bar: allocated <= 1.2 x live bytes + one block per (sequence, KV head, layer).",
        "",
        "| context | store | reads-based CR | peak live tokens | live MB | allocated MB | allocated / live | less than vanilla | decode tok/s | tok/s vs vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["context"], STORES.index(r["store"]))):
        v = vanilla.get(r["context"])
        less = f"{v['cache_bytes'] / r['cache_bytes']:.1f}x" if v else "-"
        speed = f"{r['tokens_per_second'] / v['tokens_per_second']:.2f}x" if v else "-"
        lines.append(f"| {r['context']:,} | {r['store']} | {r['cr']:.2f} | {r['peak_kv_tokens']:,.0f} | {r['live_bytes'] / 1e6:,.1f} "
                     f"| {r['cache_bytes'] / 1e6:,.1f} | {r['cache_bytes'] / r['live_bytes']:.2f} | {less} "
                     f"| {r['tokens_per_second']:.1f} | {speed} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for store, label in (("vanilla", "vanilla (dense)"), ("padded", "DMS, padded store"), ("paged", "DMS, paged store")):
        pts = sorted((r["context"], r["cache_bytes"] / 1e6) for r in rows if r["store"] == store)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    pts = sorted((r["context"], r["live_bytes"] / 1e6) for r in rows if r["store"] == "paged")
    if pts:
        ax.plot(*zip(*pts), linestyle=":", color="gray", label="DMS live tokens' bytes")
    ax.set_xlabel("prompt tokens per sequence")
    ax.set_ylabel(f"peak cache MB (batch {args.batch})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    lines += ["", "![memory](memory.png)", "", *NOTES, ""]
    (out / "memory.md").write_text("\n".join(lines))
    print(f"wrote {out / 'memory.md'}")


@functools.cache
def _load(name: str, dtype: str):
    return kvshrink.load(name, device="cpu", dtype=dtype)


def load(name: str, args):
    return _load(name, args.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-dms8")
    parser.add_argument("--vanilla", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 3072])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", type=Path, default=ROOT / "docs" / "results" / "memory")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    records = args.work / "records.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(records)
    if not args.report_only:
        done = {(r["store"], r["context"], r["batch"], r["new_tokens"]) for r in rows}
        for context in args.contexts:
            todo = [store for store in args.stores if (store, context, args.batch, args.new_tokens) not in done]
            for row in ([run_point(*load(args.vanilla, args), "vanilla", context, args)] if "vanilla" in todo else []) + \
                    (run_interleaved(*load(args.model, args), [s for s in todo if s != "vanilla"], context, args)
                     if set(todo) - {"vanilla"} else []):
                print(row, flush=True)
                append_jsonl(records, row)
                rows.append(row)
    report([r for r in rows if r["batch"] == args.batch and r["new_tokens"] == args.new_tokens], args)


if __name__ == "__main__":
    main()
