"""KVTC codec throughput on a SmolLM2-135M-shaped cache, with a per-stage breakdown.

    python benchmarks/kvtc_speed.py --threads 2 --write    # -> docs/results/kvtc-speed.md
    python benchmarks/kvtc_speed.py --threads 2 --write --tag avx2    # another CPU -> kvtc-speed-avx2.md

No model is loaded. The calibration is synthetic but has SmolLM2-135M's shape (30 layers, 3 KV heads,
head_dim 64: p = 5,760 features a stream): a random orthonormal basis, and the plans the real DP
(`allocate`) chooses for projections with an assumed decaying spectrum (keys decaying faster than
values, as RoPE-free keys do), so the plan ranks, group sizes and kinds (hence the matmul, quantizer
and packing work, which the plan ranks dominate) look like a real calibration's. It is built once (the
DP takes ~30 s) and kept in the temp directory; --calibration reads a real one instead (e.g. from
`kvshrink kvtc calibrate`), in which case the timings are real but the reported errors are not, since
the cache stays synthetic.

The cache: --tokens tokens (default 4,096) drawn from the same spectrum plus a small isotropic tail,
RoPE applied with SmolLM2's tables (theta 100,000), fp16. Throughput is fp16-equivalent bytes of the whole
cache (2 * L * H * T * D * 2) over the best of --repeats timed runs after a warm-up. The breakdown comes
from one extra cProfile'd run (cumulative time of the codec functions that make up each stage).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvshrink.kvtc import Calibration, ModelIdentity, PCABasis, allocate, budget_bits, compress, decompress, redo_rope
from kvshrink.kvtc import codec
from kvshrink.kvtc.codec import blob_stats
from kvshrink.kvtc.pca import from_features
from kvshrink.loading import cpu_has_fast_bf16
from shared import best_of

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "kvtc-speed.md"
LAYERS, KV_HEADS, HEAD_DIM, ROPE_THETA = 30, 3, 64, 100_000.0  # SmolLM2-135M
SPECTRUM = {"keys": 1.0, "values": 0.6}  # component j has scale 4 * (1 + j) ** -alpha
DP_ROWS = 256

# stage -> codec functions whose cumulative times add up to it ("f<g": only f's calls from g); none nests in another
COMPRESS_STAGES = [
    ("sinks (fp8) and window", ("_stack", "_encode_sinks")),
    ("token-major fp32 copy", ("_gather",)),
    ("RoPE undo + centring", ("_undo_rope",)),
    ("projection matmul", ("_project",)),
    ("quantize", ("quantize<_encode_middle",)),
    ("pack", ("pack",)),
    ("shift/scale to bytes", ("to_bytes<_encode_middle",)),
    ("entropy coding", ("_entropy_encode",)),
    ("checksum", ("checksum",)),
]
DECOMPRESS_STAGES = [
    ("checksum", ("checksum",)),
    ("sinks (fp8) and window", ("_decode_sinks", "from_bytes<decompress")),
    ("entropy decoding", ("_entropy_decode",)),
    ("shift/scale from bytes", ("from_bytes<_decode_middle",)),
    ("unpack", ("unpack",)),
    ("dequantize", ("dequantize<_decode_middle",)),
    ("reconstruct matmul", ("_reconstruct",)),
    ("RoPE redo", ("_redo_rope",)),
    ("copy to the cache layout", ("_scatter",)),
]

def rope(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2's (Llama default) rotary tables: cos, sin (1, T, D) fp32."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos()[None], emb.sin()[None]


class Source:
    """Rows with a decaying spectrum on a random orthonormal basis of `rank` components, plus a tail."""

    def __init__(self, p: int, rank: int, alpha: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.components, _ = torch.linalg.qr(torch.randn(p, rank, generator=g))
        self.scales = 4.0 * (1 + torch.arange(rank, dtype=torch.float32)) ** -alpha
        self.mean = torch.randn(p, generator=g)
        self.tail = self.scales[-1].item()

    def coordinates(self, n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, len(self.scales), generator=torch.Generator().manual_seed(seed)) * self.scales

    def rows(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 1)
        tail = torch.randn(n, self.components.shape[0], generator=g) * self.tail
        return torch.addmm(tail + self.mean, self.coordinates(n, seed), self.components.T)


def sources(identity: ModelIdentity, crs) -> dict[str, Source]:
    rank = min(identity.features, budget_bits(identity.features, min(crs)) // 2)  # no plan can use more (int2 + overhead)
    return {name: Source(identity.features, rank, alpha, seed) for seed, (name, alpha) in enumerate(SPECTRUM.items())}


def synthetic_calibration(identity: ModelIdentity, crs, srcs: dict[str, Source]) -> Calibration:
    """The real DP's plans on synthetic projections, over a random basis; cached in the temp directory."""
    path = Path(tempfile.gettempdir()) / f"kvtc-speed-{identity.layers}x{identity.kv_heads}x{identity.head_dim}-" \
        f"{'-'.join(f'{cr:g}' for cr in crs)}.safetensors"
    if path.exists():
        return Calibration.load(path, expect=identity)
    bases, plans = [], []
    for name, src in srcs.items():
        t0 = time.perf_counter()
        plans.append(allocate(src.coordinates(DP_ROWS, 1), [budget_bits(identity.features, cr) for cr in crs]))
        bases.append(PCABasis(src.mean, src.components.contiguous()))
        print(f"DP for {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    used = max(p.rank for stream in plans for p in stream)
    calib = Calibration(identity, bases[0].truncate(used), bases[1].truncate(used),
                        {float(cr): (k, v) for cr, k, v in zip(crs, *plans)})
    calib.save(path)
    return Calibration.load(path, expect=identity)  # what a saved calibration decodes with


def cache(srcs: dict[str, Source], tokens: int, cos, sin):
    K = redo_rope(from_features(srcs["keys"].rows(tokens, 100), LAYERS, KV_HEADS, HEAD_DIM), cos, sin)
    V = from_features(srcs["values"].rows(tokens, 101), LAYERS, KV_HEADS, HEAD_DIM)
    return list(K.half().split(1)), list(V.half().split(1))


def breakdown(fn, stages) -> tuple[list[tuple[str, float]], float]:
    """Seconds per stage (cProfile cumulative times of the stage's functions) and the profiled total."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, self, cumulative, callers)
    times = {}
    for (file, _, name), (_, _, _, cum, callers) in stats.items():
        if "kvshrink" in file:
            times[name] = times.get(name, 0.0) + cum
            for (_, _, caller), (_, _, _, caller_cum) in callers.items():
                times[f"{name}<{caller}"] = times.get(f"{name}<{caller}", 0.0) + caller_cum
    rows = [(label, sum(times.get(n, 0.0) for n in names)) for label, names in stages]
    return rows + [("other (Python, concatenation, casts)", total - sum(t for _, t in rows))], total


def rel_error(a: list, b: list, part: slice) -> float:
    a, b = torch.cat(a)[:, :, part].float(), torch.cat(b)[:, :, part].float()
    return ((a - b).norm() / a.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cr", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32", action="store_true", help="fp32 matmuls only (what CPUs without native bf16 get)")
    parser.add_argument("--calibration", type=Path, help="a real calibration for SmolLM2-135M's shape")
    parser.add_argument("--write", action="store_true", help=f"write the table to {OUT.relative_to(ROOT)}")
    parser.add_argument("--tag", default="", help="write kvtc-speed-TAG.md instead (another CPU's table beside the first)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    if args.fp32:
        codec.BF16_MATMUL = False

    identity = ModelIdentity(LAYERS, KV_HEADS, HEAD_DIM, "synthetic-smollm2-135m")
    srcs = sources(identity, (args.cr,))
    if args.calibration:
        calib = Calibration.load(args.calibration)
        identity = calib.identity
    else:
        calib = synthetic_calibration(identity, (args.cr,), srcs)
    cos, sin = rope(args.tokens)
    keys, values = cache(srcs, args.tokens, cos, sin)
    fp16_bytes = 2 * LAYERS * KV_HEADS * args.tokens * HEAD_DIM * 2

    blob = compress(keys, values, calib, args.cr, cos, sin)  # warm-up (and the per-plan tables)
    out = decompress(blob, calib, cos, sin)
    t_c = best_of(lambda: compress(keys, values, calib, args.cr, cos, sin), args.repeats)
    t_d = best_of(lambda: decompress(blob, calib, cos, sin), args.repeats)
    c_stages, c_total = breakdown(lambda: compress(keys, values, calib, args.cr, cos, sin), COMPRESS_STAGES)
    d_stages, d_total = breakdown(lambda: decompress(blob, calib, cos, sin), DECOMPRESS_STAGES)

    stats = blob_stats(blob)
    middle = slice(4, args.tokens - 128)
    key_plan, value_plan = calib.plan(args.cr)
    # each middle token is projected onto every planned component and back: 2 flops per multiply-add
    gflop = 2 * (args.tokens - 4 - 128) * identity.features * (key_plan.rank + value_plan.rank) / 1e9
    project = dict(c_stages)["projection matmul"]
    lines = [
        f"# KVTC codec speed (CPU, {args.threads} thread{'s' * (args.threads != 1)})", "",
        f"Command: `python benchmarks/kvtc_speed.py {' '.join(Path(a).name if a.endswith('.safetensors') else a for a in sys.argv[1:])}`", "",
        f"SmolLM2-135M's shape ({LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM}, p = {identity.features:,}), "
        f"{args.tokens:,} tokens, fp16 cache of {fp16_bytes / 1e6:.1f} MB; "
        f"{'calibration ' + args.calibration.name if args.calibration else 'synthetic calibration'}, cr {args.cr:g}, "
        f"{'bf16' if codec.BF16_MATMUL else 'fp32'} matmuls: "
        f"key plan rank {key_plan.rank} ({len(key_plan.groups)} groups), value plan rank {value_plan.rank} "
        f"({len(value_plan.groups)} groups). Blob {stats['bytes'] / 1e6:.2f} MB (ratio {stats['ratio']:.1f}, middle "
        f"{stats['middle_ratio']:.1f}, {stats['coder']}); middle's relative error: keys "
        f"{rel_error(keys, out.keys, middle):.4f}, values {rel_error(values, out.values, middle):.4f}. "
        f"Load average when it started: {load:.1f} on {os.cpu_count()} CPUs. CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}{'' if cpu_has_fast_bf16() else ' (no native bf16)'}. "
        f"The projection is {gflop:.0f} GFLOP each way; compress ran it at {gflop / project:.0f} GFLOP/s.", "",
        "| | seconds (best of {}) | MB/s (fp16-equivalent) |".format(args.repeats), "|---|---|---|",
        f"| compress | {t_c:.3f} | {fp16_bytes / t_c / 1e6:.0f} |",
        f"| decompress | {t_d:.3f} | {fp16_bytes / t_d / 1e6:.0f} |", "",
    ]
    for name, rows, total in (("compress", c_stages, c_total), ("decompress", d_stages, d_total)):
        lines += [f"Stages of one profiled {name} ({total:.3f} s):", "", "| stage | ms | share |", "|---|---|---|"]
        lines += [f"| {label} | {1e3 * t:.1f} | {100 * t / total:.0f}% |" for label, t in rows] + [""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = OUT.with_name(f"kvtc-speed-{args.tag}.md") if args.tag else OUT
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
