"""Decode speed and memory: vanilla (HF's default cache, and our preallocated dense cache) vs DMS.

    python benchmarks/decode.py                         # CPU, fp32 -> docs/results/decode.md + decode.png
    python benchmarks/decode.py --device cuda --models bench --dtype bfloat16 --tag cuda
    python benchmarks/decode.py --device cuda --out OUT # real shapes, the fixed-shape step: decode_shapes.py
    python benchmarks/decode.py --smoke --out OUT       # the same in miniature, on the CPU

The rest of this docstring is about the first two (the 17M `bench` model through the slot cache).

Model: a random-init Llama of ~17M parameters (6 layers, d=512, 8 heads, 2 KV heads, head_dim 64, vocab
2048). DMS decisions are not the model's: this measures the cache, not a trained model. Two kinds (`--rates`):
- forced: 7 of every 8 tokens evicted in every head (w = 64);
- trained: each (layer, KV head) flags tokens at random at the rate a shipped model's head flags them
  (`--rates-from`, a `kvshrink inspect` record: its per-head flag rates, drawn for this model's heads),
  so heads that keep nearly everything sit beside heads that keep only the window, as in a real model.
Each runs on both key/value layouts (`--stores`): padded (every row of a layer as long as its longest) and
paged (blocks held per sequence and KV head).

For each context C and batch B the cache is first brought to the state it has after C tokens, by
writing random keys/values through the cache's own write path (for DMS: the real eviction rule, slot
reuse included), without running the model over the prompt (a C-token prefill per point would take
minutes on 2 cores and is not what is timed). Then `--steps` decode steps run through the real model
forward and are timed. Per point:
- decode tokens/s (B tokens per step);
- cache bytes actually allocated (keys, values and, for ours, slot metadata);
- bytes-ideal speedup = (weight bytes + vanilla KV bytes read per step) / (weight bytes + DMS KV bytes
  read per step), the gain of a purely bandwidth-bound decoder;
- share of the bandwidth roofline = (bytes read per step / measured read bandwidth) / measured step time.
The vanilla baseline of every speed ratio is the faster of the two vanilla caches (docs/conventions.md).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import json  # noqa: E402

from kvshrink.attention import install  # noqa: E402
from kvshrink.cache import KVCache  # noqa: E402
from kvshrink.shims import cache_arg  # noqa: E402
from kvshrink.attach import attach_dms  # noqa: E402
from kvshrink.dms.config import DMSConfig  # noqa: E402
from kvshrink.dms.retention import forced_logits  # noqa: E402
from kvshrink.policies import CachePolicy, DMSPolicy  # noqa: E402

WINDOW, KEEP_EVERY = 64, 8


def bench_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1280, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def read_bandwidth(device, dtype) -> float:
    """Bytes/s of a large reduction: what a decode step's reads can reach at best here."""
    x = torch.randn(256 * 1024 * 1024 // 4, device=device).to(dtype)  # 256 MB in fp32
    for _ in range(2):
        x.sum()
    sync(device)
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        x.sum()
    sync(device)
    return x.numel() * x.element_size() * reps / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TrainedLikeCache(KVCache):
    """A DMS cache whose decisions are drawn per (layer, KV head) at given flag rates (L, Hkv) instead of
    taken from the model: what a trained model's mix of keep-all and window-only heads does to the cache."""

    def __init__(self, model, policy, rates: torch.Tensor, paged: bool, block: int = 16):
        super().__init__(model, policy, paged=paged, block=block)
        self.rates = rates
        self.generator = torch.Generator(device=rates.device).manual_seed(0)

    def attend(self, layer_idx, q, k, v, scaling, valid, decisions=None):
        return super().attend(layer_idx, q, k, v, scaling, valid, self.decide(layer_idx, k.shape[0], k.shape[2]))

    def decide(self, layer_idx: int, batch: int, n: int) -> torch.Tensor:
        rate = self.rates[layer_idx][None, :, None]
        return torch.rand(batch, rate.shape[1], n, generator=self.generator, device=rate.device) < rate


def head_rates(path: Path, layers: int, heads: int, device) -> torch.Tensor:
    """Per-(layer, KV head) flag rates for this model, drawn (seeded) from a shipped model's measured heads."""
    measured = torch.tensor(json.loads(path.read_text())["head_flag_rate"]).flatten()
    pick = torch.randint(0, measured.numel(), (layers, heads), generator=torch.Generator().manual_seed(0))
    return measured[pick].to(device)


def fill_ours(cache: KVCache, model, batch: int, context: int, rates: str | None, device, dtype):
    """Write `context` random tokens into every layer through the cache's write path, with the decisions of
    `rates` (None: vanilla, "forced" or "trained")."""
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    chunk = 1024
    for s in range(0, context, chunk):  # chunk by chunk, every layer in order, as a forward would
        q = min(chunk, context - s)
        for i, layer in enumerate(cache.layers):
            decisions = None
            if rates == "forced":
                decisions = forced_logits(torch.arange(s, s + q, device=device).expand(batch, q), hkv, KEEP_EVERY) > 0
            elif rates == "trained":
                decisions = cache.decide(i, batch, q)
            k = torch.randn(batch, hkv, q, d, device=device, dtype=dtype)
            v = torch.randn(batch, hkv, q, d, device=device, dtype=dtype)
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.write(k, v, torch.ones(batch, q, dtype=torch.bool, device=device), decisions)


def fill_hf(model, batch, context, device, dtype):
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), i)
    return cache


def hf_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def time_decode(model, cache, batch, context, steps, device, blocks: int = 3) -> float:
    """Seconds per decode step (full model forward + greedy pick): the best of `blocks` blocks of
    `steps` steps, after 5 warm-up steps (the first touches of freshly written cache memory are slow)."""
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = context
    best = float("inf")
    for block in range(blocks + 1):
        n = 5 if block == 0 else steps
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            out = model(token, position_ids=torch.full((batch, 1), pos, device=device), **cache_arg(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            pos += 1
        sync(device)
        if block:
            best = min(best, (time.perf_counter() - start) / n)
    return best


def live_kv_bytes(cache: KVCache, model, dtype) -> float:
    """KV bytes a bandwidth-bound decoder must read: live tokens x (key + value) per (layer, row)."""
    per_token = 2 * model.config.head_dim * torch.tensor([], dtype=dtype).element_size()
    return float(cache.live_tokens().sum()) * per_token


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    model = bench_model(device, dtype)
    hf_model = model  # HF's own attention with its DynamicCache
    ours = install(copy.deepcopy(model))
    dms = attach_dms(copy.deepcopy(ours), DMSConfig(window=WINDOW, forced_keep_every=KEEP_EVERY))
    weight_bytes = sum(p.nbytes for p in model.parameters())
    bw = read_bandwidth(device, dtype)
    print(f"params {sum(p.numel() for p in model.parameters())/1e6:.1f}M, weights {weight_bytes/1e6:.1f} MB, read bandwidth {bw/1e9:.1f} GB/s", flush=True)
    rates = head_rates(args.rates_from, model.config.num_hidden_layers, model.config.num_key_value_heads, device)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            base = {"context": context, "batch": batch}
            hf_cache = fill_hf(hf_model, batch, context, device, dtype)
            base["hf_s"] = time_decode(hf_model, hf_cache, batch, context, args.steps, device)
            base["hf_bytes"] = hf_cache_bytes(hf_cache)
            del hf_cache
            dense = KVCache(ours, CachePolicy(), reserve=context + args.steps + 8)
            fill_ours(dense, ours, batch, context, None, device, dtype)
            base["dense_s"] = time_decode(ours, dense, batch, context, args.steps, device)
            base["dense_bytes"] = dense.allocated_bytes()
            vanilla_kv = live_kv_bytes(dense, ours, dtype)
            del dense
            base["vanilla_s"] = min(base["hf_s"], base["dense_s"])
            for kind in args.rates:
                for store in args.stores:
                    paged = store == "paged"
                    if kind == "forced":
                        cache = KVCache(dms, DMSPolicy(WINDOW), paged=paged)
                    else:
                        cache = TrainedLikeCache(dms, DMSPolicy(WINDOW), rates, paged=paged)
                    fill_ours(cache, dms, batch, context, kind, device, dtype)
                    point = {**base, "rates": kind, "store": store}
                    point["dms_s"] = time_decode(dms, cache, batch, context, args.steps, device)
                    point["dms_bytes"] = cache.allocated_bytes()
                    dms_kv = live_kv_bytes(cache, dms, dtype)
                    del cache
                    point["live_bytes"] = dms_kv
                    point["ideal"] = (weight_bytes + vanilla_kv) / (weight_bytes + dms_kv)
                    point["speedup"] = point["vanilla_s"] / point["dms_s"]
                    point["roof_vanilla"] = (weight_bytes + vanilla_kv) / bw / point["vanilla_s"]
                    point["roof_dms"] = (weight_bytes + dms_kv) / bw / point["dms_s"]
                    rows.append(point)
                    print(fmt_row(point), flush=True)
    return rows, {"weight_bytes": weight_bytes, "bandwidth": bw}


def fmt_row(p) -> str:
    tps = lambda s: p["batch"] / s  # noqa: E731
    return (f"| {p['context']:,} | {p['batch']} | {p['rates']} | {p['store']} | {tps(p['hf_s']):,.0f} | {tps(p['dense_s']):,.0f} "
            f"| {tps(p['dms_s']):,.0f} | {p['speedup']:.2f}x | {p['ideal']:.2f}x | {p['speedup']/p['ideal']:.0%} "
            f"| {p['hf_bytes']/1e6:,.1f} | {p['dense_bytes']/1e6:,.1f} | {p['dms_bytes']/1e6:,.1f} | {p['live_bytes']/1e6:,.1f} "
            f"| {p['dms_bytes']/p['live_bytes']:.2f} | {p['dms_bytes']/p['hf_bytes']:.3f} | {p['roof_vanilla']:.0%} | {p['roof_dms']:.0%} |")


HEADER = ("| context | batch | DMS decisions | DMS store | HF default tok/s | dense (ours) tok/s | DMS tok/s | DMS speedup | bytes-ideal "
          "| share of ideal | HF MB | dense MB | DMS MB | DMS live MB | DMS MB / live | DMS/vanilla bytes | roofline vanilla | roofline DMS |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


TRIED = "## Decode attention over blocks: what was tried"


def write_report(rows, meta, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 3.5), squeeze=False)
    for ax, batch in zip(axes[0], args.batches):
        pts = [p for p in rows if p["batch"] == batch]
        first = [p for p in pts if (p["rates"], p["store"]) == (pts[0]["rates"], pts[0]["store"])]
        for key, label in (("hf_s", "vanilla, HF default cache"), ("dense_s", "vanilla, our dense cache")):
            ax.plot([p["context"] for p in first], [batch / p[key] for p in first], marker="o", label=label)
        for kind in args.rates:
            for store in args.stores:
                mine = [p for p in pts if (p["rates"], p["store"]) == (kind, store)]
                ax.plot([p["context"] for p in mine], [batch / p["dms_s"] for p in mine], marker="o", label=f"DMS ({kind}), {store}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch} ({args.device}, {args.dtype})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / f"decode{tag}.png"
    fig.savefig(png, dpi=110)
    cmd = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    text = [
        f"# Decode benchmark ({args.device}, {args.dtype}{', ' + args.tag if args.tag else ''})",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads() if args.device == 'cpu' else torch.cuda.get_device_name()} "
        f"{'threads' if args.device == 'cpu' else ''}; no other job was running.  ",
        f"Model: random-init Llama, 6 layers, d=512, 8 heads / 2 KV heads, head_dim 64 "
        f"({meta['weight_bytes']/1e6:.1f} MB of weights). DMS, w = {WINDOW}: forced = 7 of 8 tokens evicted in every head; "
        f"trained = each head at a flag rate drawn from `{args.rates_from.relative_to(ROOT) if args.rates_from.is_relative_to(ROOT) else args.rates_from.name}`.  ",
        f"Measured read bandwidth: {meta['bandwidth']/1e9:.1f} GB/s. Time per step: best of 3 blocks of {args.steps} decode steps, after 5 warm-up steps; "
        "the cache is brought to its state at the given context through its own write path (see the script's docstring).",
        "",
        "DMS speedup is against the faster vanilla cache; bytes-ideal = (weights + vanilla KV read) / (weights + DMS KV read); "
        "roofline = (bytes read per step / read bandwidth) / measured step time.",
        "",
        HEADER,
        *[fmt_row(p) for p in rows],
        "",
        f"![decode]({png.name})",
        "",
    ]
    md = out / f"decode{tag}.md"
    kept = md.read_text().partition(TRIED)[2] if md.exists() else ""  # the hand-written account survives a rerun
    md.write_text("\n".join(text) + (f"\n{TRIED}{kept}" if kept else ""))
    print(f"wrote {md} and {png}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 (bench, smoke), bfloat16 (real shapes)")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--rates", nargs="+", choices=["forced", "trained"], default=["forced", "trained"])
    parser.add_argument("--stores", nargs="+", choices=["padded", "paged"], default=["padded", "paged"])
    parser.add_argument("--rates-from", type=Path, default=ROOT / "docs" / "results" / "diagnostics" / "smollm2-dms8.json",
                        help="a `kvshrink inspect` record whose per-head flag rates the trained-like decisions follow")
    real = parser.add_argument_group("real shapes (benchmarks/decode_shapes.py; the default on CUDA)")
    real.add_argument("--models", nargs="+", choices=["bench", "llama-1b", "qwen3-8b"],
                      help="bench: the 17M model through the slot cache (the default on the CPU); else real shapes")
    real.add_argument("--smoke", action="store_true", help="the real-shape sweep in miniature on the CPU: a rehearsal")
    real.add_argument("--out", type=Path, default=ROOT / "decode-output", help="folder for decode.md and decode.jsonl")
    real.add_argument("--paths", nargs="+", default=["hf-dynamic", "hf-static", "dense", "dms-forced", "dms-trained"])
    real.add_argument("--blocks", type=int, default=2, help="timed blocks of --steps steps per path (best counts)")
    real.add_argument("--budget", type=float, default=440, help="seconds for the whole sweep; later paths are skipped")
    real.add_argument("--per-path", type=float, default=150, help="seconds one path may take (compiles included)")
    real.add_argument("--min-left", type=float, default=10, help="seconds of budget below which no path starts")
    real.add_argument("--compile-backend", default="inductor", help="inductor, eager (traces only), or none")
    args = parser.parse_args()
    args.models = args.models or (["llama-1b", "qwen3-8b"] if args.device == "cuda" or args.smoke else ["bench"])
    if args.models != ["bench"]:
        import decode_shapes

        smoke = args.smoke
        args.device = "cpu" if smoke else args.device
        args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
        args.contexts = args.contexts or ([128, 256] if smoke else [8192, 16384, 32768])
        args.batches = args.batches or ([1, 2] if smoke else [1, 8, 32])
        args.steps = args.steps or (3 if smoke else 10)
        torch.set_num_threads(args.threads)
        decode_shapes.run(args)
        return
    args.dtype = args.dtype or "float32"
    args.contexts = args.contexts or [1024, 4096, 16384, 32768]
    args.batches = args.batches or [1, 8]
    args.steps = args.steps or 16
    rows, meta = run(args)
    write_report(rows, meta, args)


if __name__ == "__main__":
    main()
