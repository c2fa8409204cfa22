"""Ways to attend over Quest's chosen pages on a CPU, timed at the decode-bar shape.

    python benchmarks/quest_kernels.py            # -> docs/results/quest-kernels.md

Quest's decode speed bar (1.5x vanilla at 4k context, batch 8, CR 4) needs attention over the chosen
quarter of the cache to cost well under a quarter of dense attention. Quest first copied the chosen
pages' rows out, then ran SDPA on the copy; the copy costs about as much as the read. This times that
against ways of reading the chosen rows in place, one layer of the benchmark model
(8 sequences x 2 KV heads x 4 query heads x 64 dims, 4,096 tokens, 64 of 256 pages of 16 chosen at
random per (sequence, KV head)):

- copy K and V, then SDPA: `index_select` of the chosen K and V rows into reused buffers, then SDPA;
- copy K, weighted V rows (what `policies.quest.read_slots` does): scores on the copied keys, then
  `embedding_bag` sums the chosen V rows with the attention weights in place (no V copy);
- sampled scores, weighted V rows: `torch.sparse.sampled_addmm` computes q . k only at the chosen
  (query, token) pairs of a CSR pattern, so neither K nor V is copied;
- flex_attention: `torch.compile`d FlexAttention with a block mask of the chosen 16-token pages, which
  skips the other blocks (needs a C++ compiler; reported as unavailable otherwise);
- dense SDPA over all 4,096 tokens, for scale.

Each variant's output is checked against SDPA on the gathered rows. Times: best of --rounds blocks of
--calls calls, the variants taking turns block by block (a slow spell of the machine hits all alike).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "quest-kernels.md"
B, HKV, G, D, PAGE = 8, 2, 4, 64, 16


def variants(context: int, cr: int):
    torch.manual_seed(0)
    k, v = torch.randn(B, HKV, context, D), torch.randn(B, HKV, context, D)
    q = torch.randn(B, HKV, G, D)
    pages, chosen = context // PAGE, context // cr // PAGE
    picked = torch.stack([torch.randperm(pages)[:chosen].sort().values for _ in range(B * HKV)]).view(B, HKV, chosen)
    slots = (picked[..., None] * PAGE + torch.arange(PAGE)).flatten(2)  # (B, HKV, n), sorted per row
    n = slots.shape[-1]
    rows = (torch.arange(B * HKV).view(B, HKV, 1) * context + slots).flatten()  # rows of the flat (B*HKV*S, D) storage
    k_flat, v_flat = k.view(-1, D), v.view(-1, D)
    k_buf, v_buf = torch.empty(rows.numel(), D), torch.empty(rows.numel(), D)
    scale = D ** -0.5
    per_query = rows.view(B * HKV, 1, n).expand(-1, G, -1).reshape(-1)  # the V rows each query head sums
    offsets = torch.arange(0, per_query.numel(), n)

    def copy_sdpa():
        kc = torch.index_select(k_flat, 0, rows, out=k_buf).view(B, HKV, n, D)
        vc = torch.index_select(v_flat, 0, rows, out=v_buf).view(B, HKV, n, D)
        return F.scaled_dot_product_attention(q, kc, vc, scale=scale)

    def weighted_rows(probs):
        return F.embedding_bag(per_query, v_flat, offsets, mode="sum", per_sample_weights=probs.reshape(-1)).view(B, HKV, G, D)

    def copy_k_weighted_v():
        kc = torch.index_select(k_flat, 0, rows, out=k_buf).view(B, HKV, n, D)
        return weighted_rows(torch.softmax(q @ kc.mT * scale, -1))

    crow = torch.arange(0, (G + 1) * n, n).expand(B * HKV, -1).contiguous()
    cols = slots.view(B * HKV, 1, n).expand(-1, G, -1).reshape(B * HKV, G * n).contiguous()
    zeros = torch.zeros(B * HKV, G * n)
    k_t = k.view(B * HKV, context, D).mT

    def sampled_scores_weighted_v():
        pattern = torch.sparse_csr_tensor(crow, cols, zeros, size=(B * HKV, G, context))
        scores = torch.sparse.sampled_addmm(pattern, q.view(B * HKV, G, D), k_t, beta=0.0, alpha=scale)
        return weighted_rows(torch.softmax(scores.values().view(B * HKV, G, n), -1))

    def dense_sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    runs = {"copy K and V, then SDPA (Quest before)": copy_sdpa, "copy K, weighted V rows (Quest now)": copy_k_weighted_v,
            "sampled scores, weighted V rows": sampled_scores_weighted_v}
    flex, why = flex_variant(q, k, v, picked, scale)
    if flex is not None:
        runs["flex_attention, 16-token block mask"] = flex
    runs["dense SDPA, all tokens"] = dense_sdpa
    return runs, copy_sdpa(), why


def flex_variant(q, k, v, picked, scale):
    """FlexAttention over the chosen pages as 'full' blocks (no mask function inside them), or (None, why)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        context, chosen = k.shape[2], picked.shape[-1]
        heads = HKV * G
        full = torch.zeros(B, heads, 1, context // PAGE, dtype=torch.int32)
        full[..., :chosen] = picked.repeat_interleave(G, 1)[:, :, None].int()
        counts = torch.full((B, heads, 1), chosen, dtype=torch.int32)
        mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(full), counts, full,
                                        BLOCK_SIZE=(1, PAGE), seq_lengths=(1, context))
        compiled = torch.compile(flex_attention, dynamic=False)
        q_heads = q.reshape(B, heads, 1, D)

        def run():
            return compiled(q_heads, k, v, block_mask=mask, enable_gqa=True, scale=scale).view(B, HKV, G, D)

        run()  # compile once, outside the timing
        return run, ""
    except Exception as error:  # no C++ compiler, or an inductor without CPU FlexAttention
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--cr", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    runs, reference, flex_why = variants(args.context, args.cr)
    errors = {name: float((f() - reference).abs().max()) for name, f in runs.items() if not name.startswith("dense")}
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, f in runs.items():
            for _ in range(3):
                f()
            start = time.perf_counter()
            for _ in range(args.calls):
                f()
            best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
    base = best["copy K and V, then SDPA (Quest before)"]
    lines = ["# Attending over Quest's chosen pages on a CPU", "",
             f"Command: `python benchmarks/quest_kernels.py {' '.join(sys.argv[1:])}`. One layer: {B} sequences x {HKV} KV "
             f"heads x {G} query heads x {D} dims, {args.context:,} tokens, CR {args.cr} ({args.context // args.cr:,} tokens "
             f"in {args.context // args.cr // PAGE} pages of {PAGE} chosen per sequence and KV head), fp32, "
             f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}. Best of {args.rounds} "
             f"blocks of {args.calls} calls, the variants taking turns.", "",
             "| variant | ms per layer | vs copy + SDPA | max abs diff to copy + SDPA |", "|---|---|---|---|"]
    for name, t in best.items():
        diff = f"{errors[name]:.1e}" if name in errors else "-"
        lines.append(f"| {name} | {1e3 * t:.2f} | {base / t:.2f}x | {diff} |")
    if flex_why:
        lines += ["", f"flex_attention unavailable here: {flex_why}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        OUT.write_text(text)
        print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
