"""Decode at real model shapes: DMS through the fixed-shape step (`kvshrink.fast_decode`) against the best
vanilla decoding. Run by `decode.py --device cuda` (and `benchmarks/gpu_decode.sh OUT`, the GPU run in one
command); `decode.py --smoke` runs the same sweep in miniature on the CPU.

Models, random weights: `llama-1b` shaped like Llama-3.2-1B (16 layers, d 2048, 32/8 heads, head_dim 64, vocab
128,256, tied embeddings) and `qwen3-8b` like Qwen3-8B (36 layers, d 4096, 32/8 heads, head_dim 128, vocab
151,936). Paths at each (context, batch):
- hf-dynamic: HF's default DynamicCache, eager;
- hf-static: HF's StaticCache, the forward under torch.compile(mode="reduce-overhead", fullgraph=True);
- dense: our fixed-shape step with no token ever flagged (compiled, one CUDA graph, the Triton kernel);
- dms-forced: the same step, 7 of every 8 tokens evicted in every head (w = 64);
- dms-trained: the same step, each (layer, KV head) flagging at a shipped model's measured per-head rate.
The fastest vanilla path (hf-dynamic, hf-static, dense) is the baseline of every speedup. Caches are set to
their state after `context` tokens directly (random keys and values; DMS's live tokens from the same decisions
a decode would have made), not by a prefill. Per path: tok/s, ms/step, bytes the cache allocates, share of the
bandwidth roofline ((weights read + live KV read) per step / HBM bandwidth from a large device copy, over the
step time); for DMS the bytes-ideal speedup (what a purely bandwidth-bound step would gain).

Points run in order of what the bars need (the first four), the compile-heavy hf-static after the other
paths; each path runs under a time guard and is skipped with a note once the budget is spent, so the sweep
ends in time; rows are appended to decode.jsonl as they finish and decode.md is rewritten after each.
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from decode import fill_hf, head_rates
from kvshrink.attach import attach_dms
from kvshrink.attention import install
from kvshrink.dms.config import DMSConfig
from kvshrink.dms.retention import forced_logits
from kvshrink.fast_decode import DecodeState, FixedDecoder
from kvshrink.kernels.paged import paged_decode, paged_decode_torch
from kvshrink.policies import DMSPolicy
from kvshrink.shims import cache_arg

WINDOW, KEEP_EVERY = 64, 8
WARM = FixedDecoder.WARMUP + 1  # calls before timing: compile, warm-up, capture (every path gets the same)
SHAPES = {
    "llama-1b": dict(family="llama", layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64,
                     vocab=128256, tied=True),
    "qwen3-8b": dict(family="qwen3", layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128,
                     vocab=151936, tied=False),
}
SMOKE = dict(layers=2, hidden=256, intermediate=512, vocab=512)  # --smoke: the same heads, a tiny body
BARS = [("llama-1b", 16384, 8), ("qwen3-8b", 32768, 8), ("llama-1b", 8192, 1), ("qwen3-8b", 8192, 1)]
VANILLA, OURS = ("hf-dynamic", "hf-static", "dense"), ("dms-forced", "dms-trained")


class OutOfTime(Exception):
    pass


@contextmanager
def time_guard(seconds: float):
    """Raise OutOfTime in this thread after `seconds` (checked between Python bytecodes)."""
    def fire(*_):
        raise OutOfTime(f"stopped by the time guard after {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build(name: str, device, dtype, smoke: bool):
    """(HF model, ours: kvshrink's attention, ours with forced DMS), sharing one set of random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    s = {**SHAPES[name], **(SMOKE if smoke else {})}
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[s["family"]]
    config = config_cls(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                        head_dim=s["head_dim"], tie_word_embeddings=s["tied"], max_position_embeddings=65536)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in their dtype, on the device: no float32 copy of 8B parameters
    try:
        with torch.device(device):
            hf = model_cls(config).eval()
    finally:
        torch.set_default_dtype(default)
    shared = {id(p): p for p in hf.parameters()}
    ours = install(copy.deepcopy(hf, memo=dict(shared)))
    dms = attach_dms(install(copy.deepcopy(hf, memo=dict(shared))), DMSConfig(window=WINDOW, forced_keep_every=KEEP_EVERY))
    return hf, ours, dms


def weights_read(model) -> int:
    """Bytes of weights a decode step reads: every parameter but an untied embedding table (B rows of it)."""
    total = sum(p.nbytes for p in model.parameters())
    embed = model.get_input_embeddings().weight
    return total if embed is model.get_output_embeddings().weight else total - embed.nbytes


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s moved (read + written) by a large device copy: the HBM bandwidth a decode step can reach."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps: int, blocks: int, device) -> float:
    """Seconds per call of step(): the best of `blocks` blocks of `steps` calls, after WARM calls."""
    for _ in range(WARM):
        step()
    best = float("inf")
    for _ in range(blocks):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def kv_bytes(cfg, batch: int, tokens: float, dtype) -> float:
    """Keys and values of `tokens` tokens per (sequence, KV head) in every layer."""
    item = torch.tensor([], dtype=dtype).element_size()
    return cfg.num_hidden_layers * batch * cfg.num_key_value_heads * tokens * 2 * cfg.head_dim * item


# -- the paths: each returns (seconds per step, allocated bytes, live tokens per layer and row, a note) --------

def run_hf_dynamic(models, context, batch, args, device, dtype, _):
    hf = models[0]
    cache = fill_hf(hf, batch, context, device, dtype)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), context, device=device)

    def step():
        nonlocal token
        token = hf(token, position_ids=pos, **cache_arg(cache), use_cache=True).logits[:, -1:].argmax(-1)
        pos.add_(1)
    seconds = timed(step, args.steps, args.blocks, device)
    return seconds, sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), context, ""


def run_hf_static(models, context, batch, args, device, dtype, _):
    from transformers import StaticCache

    hf, cfg = models[0], models[0].config
    cache = StaticCache(config=cfg, max_cache_len=context + WARM + args.blocks * args.steps + 1)
    empty = torch.zeros(batch, cfg.num_key_value_heads, 1, cfg.head_dim, device=device, dtype=dtype)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    forward = compiled(hf.forward, args)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), context, device=device)

    def step():
        nonlocal token
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        token = forward(input_ids=token, position_ids=pos.clone(), **cache_arg(cache), use_cache=True).logits[:, -1:].argmax(-1)
        pos.add_(1)
    seconds = timed(step, args.steps, args.blocks, device)
    return seconds, sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), context, ""


def compiled(fn, args):
    if args.compile_backend == "none":
        return fn
    if args.compile_backend == "inductor":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return torch.compile(fn, backend=args.compile_backend, fullgraph=True)


def run_fixed(kind):
    """dense (no flags), dms-forced (the model's forced decisions) or dms-trained (per-head rates)."""
    def run(models, context, batch, args, device, dtype, checks):
        model, cfg = models[2], models[2].config
        L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
        rates = None if kind == "forced" else torch.zeros(L, H, device=device) if kind == "dense" else args.head_rates(L, H, device)
        calls = WARM + args.blocks * args.steps + 1
        state = synthetic_state(model, context, batch, calls, rates, device, dtype)
        live_before = state.live_tokens().float().mean()
        if kind == "forced" and device.type == "cuda" and "kernel_vs_torch_max_abs" not in checks:
            checks["kernel_vs_torch_max_abs"] = kernel_check(state, cfg, device, dtype)
        decoder = FixedDecoder(model, state, compile=args.compile_backend != "none", backend=args.compile_backend, rates=rates)
        token = torch.zeros(batch, dtype=torch.long, device=device)
        pos = torch.full((batch,), context, device=device)

        def step():
            nonlocal token
            token = decoder.step(token, pos).argmax(-1)
            pos.add_(1)
        seconds = timed(step, args.steps, args.blocks, device)
        decoder.check()
        live = float((live_before + state.live_tokens().float().mean()) / 2)
        return seconds, state.nbytes, live, f"{decoder.layout.splits} split(s)"
    return run


def synthetic_state(model, context, batch, new_tokens, rates, device, dtype) -> DecodeState:
    """The fixed-shape cache after `context` tokens with random keys and values: each layer's live set follows
    its decisions (the model's forced ones, or drawn at `rates`) under DMS's rule, a flagged token staying while
    within the window."""
    cfg, page = model.config, 16
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    steps = torch.arange(context, device=device)
    kept, flags = [], []
    for i in range(L):
        if rates is None:
            decided = forced_logits(steps.expand(batch, context), H, KEEP_EVERY) > 0  # at step s: flags token s - 1
        else:
            decided = torch.rand(batch, H, context, generator=g, device=device) < rates[i][None, :, None]
        flag = torch.cat([decided[..., 1:], torch.zeros_like(decided[..., :1])], -1)  # the last token's is pending
        kept.append(~flag | (steps >= context - WINDOW))
        flags.append(flag)
    most = max(int(k.sum(-1).max()) for k in kept)
    blocks = [int(((k.sum(-1) + new_tokens + page - 1) // page).sum()) for k in kept]
    state = DecodeState(model, batch, -(-(most + new_tokens) // page), blocks, DMSPolicy(WINDOW), dtype, device, page)
    state.step.fill_(context)
    state.first_pos.fill_(0)
    for i, (live, flag) in enumerate(zip(kept, flags)):
        n = int(live.sum(-1).max())
        order = torch.sort(live.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]  # live positions
        keys = torch.randn(batch, H, n, D, generator=g, device=device, dtype=dtype)
        values = torch.randn(batch, H, n, D, generator=g, device=device, dtype=dtype)
        state.load(i, keys, values, live.gather(-1, order), order.int(), flag.gather(-1, order))
    return state


def kernel_check(state: DecodeState, cfg, device, dtype) -> float:
    """The Triton kernel against the torch op on layer 0's real blocks, in the run's dtype."""
    buf = state.layers[0]
    B, H, _ = buf.table.shape
    q = torch.randn(B, H, cfg.num_attention_heads // H, cfg.head_dim, device=device, dtype=dtype)
    blocks = (buf.top + state.page - 1) // state.page
    fast = paged_decode(q, buf.keys, buf.values, buf.valid, buf.table, blocks, cfg.head_dim ** -0.5, 4)
    slow = paged_decode_torch(q, buf.keys, buf.values, buf.valid, buf.table, blocks, cfg.head_dim ** -0.5)
    return float((fast.float() - slow.float()).abs().max())


PATHS = {"hf-dynamic": run_hf_dynamic, "hf-static": run_hf_static, "dense": run_fixed("dense"),
         "dms-forced": run_fixed("forced"), "dms-trained": run_fixed("trained")}


def plan(args) -> list[tuple[str, int, int, str]]:
    """(shape, context, batch, path) in run order: the bars' points first, hf-static (compiles) after the rest."""
    points = [(s, c, b) for s in args.models for c in args.contexts for b in args.batches]
    points.sort(key=lambda p: BARS.index(p) if p in BARS else len(BARS))
    bars = [p for p in points if p in BARS]
    rest = [p for p in points if p not in BARS]
    cheap = [path for path in args.paths if path != "hf-static"]
    order = []
    for group in (bars, rest):
        order += [(*p, path) for p in group for path in cheap]
        order += [(*p, "hf-static") for p in group if "hf-static" in args.paths]
    return order


def run(args) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch._dynamo.config.recompile_limit = 64  # two models x batch 1 or more x layouts (and hf-static's shapes)
    torch._dynamo.config.accumulated_recompile_limit = 1024
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "decode.jsonl"
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    checks: dict = {}
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
            "bandwidth": bandwidth, "smoke": args.smoke, "budget_s": args.budget, "steps": args.steps, "blocks": args.blocks,
            "compile_backend": args.compile_backend, "checks": checks}
    print(f"{meta['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; budget {args.budget:.0f} s", flush=True)
    args.head_rates = lambda L, H, dev: head_rates(args.rates_from, L, H, dev)
    models, rows = {}, []
    for shape, context, batch, path in plan(args):
        row = {"shape": shape, "context": context, "batch": batch, "path": path}
        left = args.budget - (time.perf_counter() - start)
        if left < args.min_left:
            row.update(status="skipped", note=f"time guard: {left:.0f} s of the budget left")
        else:
            try:
                with time_guard(min(left, args.per_path)):
                    if shape not in models:
                        models[shape] = build(shape, device, dtype, args.smoke)
                    fit = memory_check(models[shape][0].config, context, batch, path, args, device, dtype)
                    if fit:
                        row.update(status="skipped", note=fit)
                    else:
                        seconds, allocated, live, note = PATHS[path](models[shape], context, batch, args, device, dtype, checks)
                        row.update(status="ok", ms=seconds * 1e3, tok_s=batch / seconds, allocated=allocated, live=live,
                                   note=note, **roofline(models[shape][0], batch, live, seconds, bandwidth, dtype))
            except OutOfTime as exc:
                row.update(status="skipped", note=str(exc))
            except torch.OutOfMemoryError:
                row.update(status="skipped", note="out of memory")
            except Exception as exc:  # noqa: BLE001 - one failing path must not cost the rest of the sweep
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        with records.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        write_tables(rows, meta, args, out)
    meta["seconds"] = time.perf_counter() - start
    write_tables(rows, meta, args, out)
    print(f"wrote {out / 'decode.md'} and {records} in {meta['seconds']:.0f} s", flush=True)


def memory_check(cfg, context, batch, path, args, device, dtype) -> str:
    """A note when the path's cache cannot fit in the device's free memory ('' when it can, or on the CPU)."""
    if device.type != "cuda":
        return ""
    tokens = context + WARM + args.blocks * args.steps + 16
    need = kv_bytes(cfg, batch, tokens, dtype) * (0.25 if path == "dms-forced" else 1.0)
    need += 2 * kv_bytes(cfg, batch, context, dtype) / cfg.num_hidden_layers  # one layer's fill, or a growing copy
    free = torch.cuda.mem_get_info()[0]
    return f"memory: needs ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB free" if need > 0.92 * free else ""


def roofline(model, batch, live, seconds, bandwidth, dtype) -> dict:
    weights = weights_read(model)
    read = weights + kv_bytes(model.config, batch, live, dtype)
    return {"bytes_read": read, "weights_read": weights, "roofline": read / bandwidth / seconds}


# -- tables ---------------------------------------------------------------------------------------------

def write_tables(rows, meta, args, out: Path) -> None:
    ok = {(r["shape"], r["context"], r["batch"], r["path"]): r for r in rows if r["status"] == "ok"}
    points = list(dict.fromkeys((r["shape"], r["context"], r["batch"]) for r in rows))
    lines = [f"# Decode at real shapes ({meta['device']}, {args.dtype}{', smoke' if args.smoke else ''})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; HBM copy bandwidth {meta['bandwidth'] / 1e9:,.0f} GB/s; "
             f"time per step: best of {args.blocks} blocks of {args.steps} steps after {WARM} warm-up calls; "
             f"compile: {args.compile_backend}; checks: {json.dumps(meta['checks'])}.", "",
             "Speedups are against the fastest vanilla path at the point; bytes-ideal = (weights + vanilla KV read) / "
             "(weights + DMS KV read); roofline = (bytes read per step / bandwidth) / step time; "
             "alloc = bytes the cache allocates over the vanilla KV of the context.", ""]
    lines += bars(ok, args)
    lines += ["| model | context | batch | HF dynamic tok/s | HF static+compile tok/s | dense (ours) tok/s | DMS-8 forced tok/s "
              "| speedup | bytes-ideal | roofline | alloc | DMS trained tok/s | speedup | bytes-ideal | roofline | alloc |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        cells = [p[0], f"{p[1]:,}", str(p[2])] + [tok_s(ok.get((*p, path))) for path in VANILLA]
        base = best_vanilla(ok, p)
        for path in OURS:
            r = ok.get((*p, path))
            if r is None or base is None:
                cells += [tok_s(r), "—", "—", "—", "—"]
                continue
            vanilla_kv = kv_bytes_of(r, base)
            cells += [tok_s(r), f"{base['ms'] / r['ms']:.2f}x", f"{(r['weights_read'] + vanilla_kv) / r['bytes_read']:.2f}x",
                      f"{r['roofline']:.0%}", f"{r['allocated'] / vanilla_kv:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every path:", "", "| model | context | batch | path | status | ms/step | tok/s | allocated MB | roofline | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['context']:,} | {r['batch']} | {r['path']} | {r['status']} | "
                     + (f"{r['ms']:.2f} | {r['tok_s']:,.1f} | {r['allocated'] / 1e6:,.1f} | {r['roofline']:.0%}" if r["status"] == "ok"
                        else "— | — | — | —") + f" | {r.get('note', '')} |")
    (out / "decode.md").write_text("\n".join(lines) + "\n")


def best_vanilla(ok, point):
    found = [ok[(*point, path)] for path in VANILLA if (*point, path) in ok]
    return min(found, key=lambda r: r["ms"]) if found else None


def kv_bytes_of(r, base) -> float:
    """Vanilla's KV bytes at the point: what every vanilla path reads and holds (its bytes read less weights)."""
    return base["bytes_read"] - base["weights_read"]


def tok_s(r) -> str:
    return f"{r['tok_s']:,.0f}" if r else "—"


def bars(ok, args) -> list[str]:
    """The issue's bars, where their points were measured."""
    def verdict(point, speedup, roof=None, alloc=None):
        r, base = ok.get((*point, "dms-forced")), best_vanilla(ok, point)
        if r is None or base is None:
            return f"- {point[0]} {point[1]:,} batch {point[2]}: not measured"
        got = base["ms"] / r["ms"]
        checks = [f"speedup {got:.2f}x (bar {speedup}x)"]
        met = got >= speedup
        if roof is not None:
            checks.append(f"roofline {r['roofline']:.0%} (bar {roof:.0%})")
            met &= r["roofline"] >= roof
        if alloc is not None:
            share = r["allocated"] / kv_bytes_of(r, base)
            checks.append(f"allocated {share:.3f} of vanilla KV (bar {alloc:.3f})")
            met &= share <= alloc
        return f"- {point[0]} {point[1]:,} batch {point[2]}, DMS-8 forced: {', '.join(checks)}: {'met' if met else 'missed'}"
    if args.smoke:
        return []
    return ["Bars:", "", verdict(BARS[0], 2.0, roof=0.5), verdict(BARS[1], 2.5, alloc=1 / 6), verdict(BARS[2], 1.0),
            verdict(BARS[3], 1.0), ""]
