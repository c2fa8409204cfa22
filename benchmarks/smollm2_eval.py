"""Vanilla SmolLM2-135M-Instruct vs its DMS retrofits on held-out Python-docs text (never trained on).

    python benchmarks/smollm2_eval.py --models smollm2-dms4 smollm2-dms8 [--work docs/results/smollm2-eval]
        [--parts ppl agree passkey speed] [--contexts 1024 2048] [--dtype bfloat16] [--device cpu] [--max-minutes M]

(RUNS below lists the invocations behind docs/results/smollm2.md.)

Every result is appended to WORK/records.jsonl as soon as it exists, keyed by (part, model, item), so an
interrupted or time-limited run continues where it stopped and the passkey trials can be split across
runs; `--report` (the default at the end) turns the records into docs/results/smollm2.md + .png.

Parts (vanilla = the same base with no eviction, teacher = vanilla in every comparison):
- ppl: teacher forcing over the whole held-out text cut into 4,096-token windows (51,309 scored tokens):
  perplexity, and mean per-token KL(vanilla || model), by position bucket in the window (contexts up
  to 4k). DMS models run the whole-sequence delayed-eviction mask with their hard decisions, which the
  tests prove equal to the cache; the flag-based CR is reported. `NAME@POLICY:CR` entries (e.g.
  `smollm2@tova:4`) run teacher-forced through the cache in the policy's chunks; reads-based CR.
- agree: 100 prompts of 512 held-out tokens (>= 4 w), 128 greedy tokens each through the kvshrink cache;
  the number of leading tokens identical to vanilla's.
- passkey: a 5-digit key hidden at a random depth of held-out filler, asked for through the chat
  template; context L = prompt + 32 new tokens; 100 trials at 1k and 2k, 30 at 4k and 8k, the same
  trials for every model (paired). Success = the key appears in the answer.
- speed: one 8,128-token prompt (the whole 8k context with the new tokens), 64 greedy tokens: reads-based CR, peak cache bytes, decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from kvshrink.compare import leading_agreement  # noqa: E402
from kvshrink.cache import KVCache  # noqa: E402
from kvshrink.dms import TrainSignals  # noqa: E402
from kvshrink.shims import cache_arg  # noqa: E402
from kvshrink.generation import generate_ids  # noqa: E402
from kvshrink.corpora import passkey_prompt, pydoc_split  # noqa: E402
from shared import Entry, Records, dtype_stamp, load_entries, paired_ci  # noqa: E402

VANILLA = "smollm2"
WINDOW_TOKENS = 4096
BUCKETS = [(0, 1024), (1024, 2048), (2048, 4096)]
PASSKEY_TRIALS = {1024: 100, 2048: 100, 4096: 30, 8192: 30}
PASSKEY_NEW = 32
AGREE_PROMPTS, AGREE_LEN, AGREE_NEW = 100, 512, 128
# the retrofit issue's bars: perplexity within X% of vanilla; passkey within X points of vanilla at 1k
TARGETS = {"smollm2-dms4": {"ppl": 5.0, "passkey": 10.0}, "smollm2-dms8": {"ppl": 10.0, "passkey": 20.0}}
SPEED_PROMPT, SPEED_NEW = 8128, 64  # positions 0 .. 8191: SmolLM2's whole context
# how docs/results/smollm2.md is made. Baselines (TOVA, window at CR 4 and 8): fp32. The DMS models are those
# retrofitted on one GPU (benchmarks/gpu_retrofit.sh): perplexity and 1k passkey in fp32, vanilla's 1k passkey
# re-run in fp32 beside them. Vanilla's 2k-8k passkey rows and the first (CPU-retrofitted) DMS models' rows are
# kept from earlier runs (records-v1-cpu-dms-models.jsonl, records-bf16-vanilla-passkey-1k.jsonl).
DMS, BASELINES = "smollm2-dms4 smollm2-dms8", "smollm2@tova:4 smollm2@tova:8 smollm2@window:4 smollm2@window:8"
RUNS = [f"--models {BASELINES} --parts ppl agree --dtype float32",
        f"--models {BASELINES} --parts passkey --contexts 1024 2048 --dtype float32",
        f"--models {DMS} --parts ppl --dtype float32",
        f"--models {DMS} --parts passkey --contexts 1024 --dtype float32"]


# -- items -----------------------------------------------------------------------------------------------
def ppl_windows(held_ids: list[int]) -> list[list[int]]:
    return [held_ids[i:i + WINDOW_TOKENS] for i in range(0, len(held_ids), WINDOW_TOKENS) if len(held_ids[i:i + WINDOW_TOKENS]) > 1]


def agree_prompts(held_ids: list[int]) -> list[list[int]]:
    stride = (len(held_ids) - AGREE_LEN) // AGREE_PROMPTS
    return [held_ids[i * stride:i * stride + AGREE_LEN] for i in range(AGREE_PROMPTS)]


# -- parts -----------------------------------------------------------------------------------------------
def cached_forward(entry: Entry, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, T, V) through the kvshrink cache in the policy's prefill chunks, and each
    row's reads (B,). Rows are independent sequences of one length: batching them only amortizes the
    per-chunk work (16-token chunks of one row would run the linear layers on 16-row matrices)."""
    cache = KVCache(entry.model, entry.policy)
    chunk = entry.policy.prefill_chunk or 512
    pieces, reads = [], torch.zeros(ids.shape[0], dtype=torch.float64)
    for s in range(0, ids.shape[1], chunk):
        positions = torch.arange(s, min(ids.shape[1], s + chunk), device=ids.device)[None].expand(ids.shape[0], -1)
        pieces.append(entry.model(ids[:, s:s + chunk], position_ids=positions, **cache_arg(cache), use_cache=True).logits)
        reads += cache.accounting.last_reads.sum(-1).double().cpu()
    return torch.cat(pieces, 1), reads


def add_ppl(rec: Records, name: str, w: int, ids: list[int], logp, ref, flags=(), reads_cr: float = 1.0) -> None:
    """One window's record: per position bucket [tokens, sum of NLL, sum of KL(vanilla || model)]."""
    target = torch.tensor(ids[1:], device=logp.device)
    nll = -logp.gather(-1, target[:, None])[:, 0]
    kl = (ref.exp() * (ref - logp)).sum(-1)
    evicted = float(torch.stack([f["flags"].float().mean() for f in flags]).mean()) if flags else 0.0
    sums = [[int(nll[lo:hi].numel()), float(nll[lo:hi].sum()), float(kl[lo:hi].sum())] for lo, hi in BUCKETS]
    rec.add({"part": "ppl", "model": name, "item": w, "buckets": sums, "evict_rate": evicted, "reads_cr": reads_cr})
    print(f"ppl window {w} {name}: ppl {math.exp(float(nll.mean())):.3f} kl {float(kl.mean()):.4f}", flush=True)


def dms_reads_cr(flags: list[dict], window: int) -> float:
    """Reads-based CR of a teacher-forced DMS window (docs/conventions.md): query i reads the i + 1 keys up to itself,
    less those flagged (by the decision at j + 1) more than `window` behind it; averaged over (layer, KV
    head), against vanilla's T (T + 1) / 2."""
    marked = torch.stack([f["flags"][0] for f in flags]).float()[..., 1:]  # (L, Hkv, T-1): the flag marking key j
    gone = F.pad(marked.cumsum(-1), (window + 1, 0))[..., :marked.shape[-1] + 1]  # evicted keys behind query i
    T = marked.shape[-1] + 1
    reads = T * (T + 1) / 2 - gone.sum(-1).mean()
    return float(T * (T + 1) / 2 / reads)


@torch.no_grad()
def run_ppl(entries: dict[str, Entry], held_ids, rec: Records, device, deadline, limit=None, batch: int = 4):
    """Windows go `batch` at a time: vanilla and DMS models one window per forward, cached policies
    (`NAME@POLICY:CR`) the group's windows of equal length as one batch."""
    vanilla = entries[VANILLA].model
    windows = ppl_windows(held_ids)[:limit]
    for first in range(0, len(windows), batch):
        todo = {w: [m for m in entries if ("ppl", m, w) not in rec.done] for w in range(first, min(len(windows), first + batch))}
        todo = {w: names for w, names in todo.items() if names}
        if not todo or time.time() > deadline:
            continue
        ids = {w: torch.tensor([windows[w]], device=device) for w in todo}
        refs = {w: F.log_softmax(vanilla(ids[w], use_cache=False).logits[0, :-1].float(), -1) for w in todo}
        for name, entry in entries.items():
            need = [w for w in todo if name in todo[w]]
            if name == VANILLA:
                for w in need:
                    add_ppl(rec, name, w, windows[w], refs[w], refs[w])
            elif entry.policy.needs_dms:  # the whole-sequence hard mask: equal to the cache (tested)
                for w in need:
                    flags = []
                    logits = entry.model(ids[w], use_cache=False, dms_signals=TrainSignals(collect=flags)).logits[0, :-1]
                    add_ppl(rec, name, w, windows[w], F.log_softmax(logits.float(), -1), refs[w], flags,
                            reads_cr=dms_reads_cr(flags, entry.model.config.dms_window_size))
            else:
                for length in dict.fromkeys(len(windows[w]) for w in need):
                    rows = [w for w in need if len(windows[w]) == length]
                    logits, reads = cached_forward(entry, torch.cat([ids[w] for w in rows]))
                    for i, w in enumerate(rows):
                        add_ppl(rec, name, w, windows[w], F.log_softmax(logits[i, :-1].float(), -1), refs[w],
                                reads_cr=length * (length + 1) / 2 / float(reads[i]))


def run_agree(entries: dict[str, Entry], held_ids, rec: Records, batch: int, deadline, limit=None):
    prompts = agree_prompts(held_ids)[:None if limit is None else limit * batch]
    for name, entry in entries.items():
        for s in range(0, len(prompts), batch):
            if ("agree", name, s) in rec.done or time.time() > deadline:
                continue
            tokens, stats, per_seq = generate_ids(entry.model, prompts[s:s + batch], entry.policy, max_new_tokens=AGREE_NEW)
            cr = (per_seq["vanilla_kv_reads"] / per_seq["kv_reads"]).tolist()
            rec.add({"part": "agree", "model": name, "item": s, "tokens": tokens, "cr": cr})
            print(f"agree {name} prompts {s}-{s + batch}: CR {stats['compression_ratio']:.2f}", flush=True)


def run_passkey(entries: dict[str, Entry], tok, held_ids, rec: Records, contexts, deadline, limit=None):
    for context in contexts:
        batch = max(1, 8192 // context)
        trials = list(range(PASSKEY_TRIALS[context]))[:None if limit is None else limit * batch]
        for name, entry in entries.items():
            for s in range(0, len(trials), batch):
                item = f"{context}:{s}"
                if ("passkey", name, item) in rec.done or time.time() > deadline:
                    continue
                built = [passkey_prompt(tok, held_ids, context, t, answer_tokens=PASSKEY_NEW) for t in trials[s:s + batch]]
                tokens, stats, per_seq = generate_ids(entry.model, [p for p, _ in built], entry.policy, max_new_tokens=PASSKEY_NEW,
                                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
                answers = [tok.decode(t, skip_special_tokens=True) for t in tokens]
                rec.add({"part": "passkey", "model": name, "item": item, "context": context, "trials": trials[s:s + batch],
                         "keys": [k for _, k in built], "answers": answers, "ok": [k in a for (_, k), a in zip(built, answers)],
                         "cr": stats["compression_ratio"]})
                print(f"passkey {context} {name} trials {s}+: {sum(k in a for (_, k), a in zip(built, answers))}/{len(built)}", flush=True)


def run_speed(entries: dict[str, Entry], held_ids, rec: Records, deadline):
    prompt = held_ids[:SPEED_PROMPT]
    for name, entry in entries.items():
        if ("speed", name, 0) in rec.done or time.time() > deadline:
            continue
        _, stats, _ = generate_ids(entry.model, [prompt], entry.policy, max_new_tokens=SPEED_NEW)
        rec.add({"part": "speed", "model": name, "item": 0, "device": str(next(entry.model.parameters()).device), **stats})
        print(f"speed {name}: {json.dumps(stats)}", flush=True)


# -- report ----------------------------------------------------------------------------------------------
def training_curves(names: list[str], out_md: Path) -> list[str]:
    """KL and flag-based vs target CR over training steps, for every model whose metrics are at hand."""
    import matplotlib.pyplot as plt

    runs = {}
    for name in names:
        for folder in (ROOT / "docs" / "results" / "zoo" / name, Path(name)):
            if (folder / "metrics.jsonl").is_file():
                runs[Path(name).name] = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
                break
    if not runs:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        line, = axes[0].plot(steps, [r["flag_cr"] for r in rows], label=f"{name} achieved (flag-based)")
        axes[0].plot(steps, [r["target_cr"] for r in rows], ls="--", color=line.get_color(), label=f"{name} target")
        axes[1].plot(steps, [r["kl"] for r in rows], label=name)
    axes[0].set_title("training: compression ratio")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[1].set_title("training: KL(student || teacher) per token (Gumbel noise on)")
    axes[1].set_xlabel("step")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = out_md.with_name(out_md.stem + "-training.png")
    fig.savefig(png, dpi=110)
    return ["## Training curves", "", f"![training]({png.name})", ""]


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, bool] | None:
    """y at x on a curve given as (x, y) points, linear between the two that bracket x (True), or the
    nearest segment's line when none does (False: an extrapolation, named as such); None below two points."""
    points = sorted(points)
    if len(points) < 2:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), True
    (x0, y0), (x1, y1) = points[:2] if x < points[0][0] else points[-2:]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0), False


def equal_cost_section(rec: Records, names: list[str]) -> list[str]:
    """Each DMS model against each training-free family at DMS's own reads-based CR (docs/conventions.md): perplexity and
    1k passkey read off the family's curve over its measured CRs (achieved reads-based CRs, not nominal)."""
    ppl_rows, pk_rows = rec.get("ppl"), rec.get("passkey")
    if not ppl_rows:
        return []

    def ppl_and_cr(name):
        rows = [r for r in ppl_rows if r["model"] == name]
        if not rows:
            return None
        n = sum(b[0] for r in rows for b in r["buckets"])
        return math.exp(sum(b[1] for r in rows for b in r["buckets"]) / n), sum(r["reads_cr"] for r in rows) / len(rows)

    def passkey_1k(name):
        rows = [r for r in (pk_rows or []) if r["model"] == name and r["context"] == 1024]
        trials = [ok for r in rows for ok in r["ok"]]
        return (100 * sum(trials) / len(trials), sum(r["cr"] for r in rows) / len(rows)) if trials else None

    families = sorted({n.split("@")[1].split(":")[0] for r in ppl_rows for n in [r["model"]] if "@" in n})
    lines = ["## DMS against each baseline at DMS's own cost", "",
             "Each baseline family's perplexity (all windows) and 1k passkey accuracy, read off its curve over the CRs "
             "measured (achieved reads-based CR) at the DMS model's own reads-based CR: linear between the two "
             "measured points that bracket it, else an extrapolation from the nearest two (marked *).", "",
             "| DMS model | its reads-based CR (ppl / passkey) | its ppl | its 1k passkey | baseline | baseline ppl at that CR | baseline 1k passkey at that CR |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        if "@" in name or name == VANILLA:
            continue
        mine, mine_pk = ppl_and_cr(name), passkey_1k(name)
        if mine is None:
            continue
        for family in families:
            curve = [v for n in names if n.startswith(f"{VANILLA}@{family}:") for v in [ppl_and_cr(n)] if v]
            at = interpolate([(cr, p) for p, cr in curve], mine[1])
            pk_curve = [v for n in names if n.startswith(f"{VANILLA}@{family}:") for v in [passkey_1k(n)] if v]
            pk_at = interpolate([(cr, a) for a, cr in pk_curve], mine_pk[1]) if mine_pk else None
            fmt = lambda v, f: "-" if v is None else f.format(v[0]) + ("" if v[1] else "*")  # noqa: E731
            lines.append(f"| {name} | {mine[1]:.2f} / {mine_pk[1] if mine_pk else float('nan'):.2f} | {mine[0]:.3f} | "
                         f"{'-' if not mine_pk else f'{mine_pk[0]:.0f}%'} | {family} ({len(curve)} CRs) | {fmt(at, '{:.3f}')} | {fmt(pk_at, '{:.0f}%')} |")
    return lines + [""]


def report(rec: Records, names: list[str], out_md: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# SmolLM2-135M-Instruct: vanilla vs DMS retrofits and training-free baselines on held-out text", "",
             "Commands (each resumable; run in this order, then the report is rewritten from all records):", "",
             *[f"    python benchmarks/smollm2_eval.py {run}" for run in RUNS], "",
             "Held-out text: odd-indexed topics of CPython's `pydoc_data.topics` (`kvshrink.corpora`), never seen in "
             "training. Vanilla is the base model with no eviction.", ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    targets = []  # (model, what, measured, target, met)
    ppl_rows = rec.get("ppl")
    if ppl_rows:
        lines += ["## Teacher-forced perplexity and KL(vanilla || model)", "",
                  "4,096-token windows over the whole held-out text; columns by the scored token's position in its window. "
                  "'vs vanilla' compares with vanilla on the same windows.", "",
                  "| model | tokens | ppl | ppl vs vanilla | KL | ppl 0-1k | ppl 1k-2k | ppl 2k-4k | KL 2k-4k | flag-based CR (DMS) | reads-based CR |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        def bucket_sums(name, items=None):
            rows = [r for r in ppl_rows if r["model"] == name and (items is None or r["item"] in items)]
            return rows, [[sum(r["buckets"][b][i] for r in rows) for i in range(3)] for b in range(len(BUCKETS))]

        def totals(per_bucket):  # tokens, perplexity, mean KL
            n_tok = sum(b[0] for b in per_bucket)
            return n_tok, math.exp(sum(b[1] for b in per_bucket) / n_tok), sum(b[2] for b in per_bucket) / n_tok

        for name in names:
            rows, per_bucket = bucket_sums(name)
            if not rows:
                continue
            n_tok, ppl, mean_kl = totals(per_bucket)
            # vanilla over the same windows, so that a run still under way compares like with like
            base_rows, base_bucket = bucket_sums(VANILLA, {r["item"] for r in rows})
            base_ppl = totals(base_bucket)[1] if base_rows else None
            by = [math.exp(b[1] / b[0]) if b[0] else float("nan") for b in per_bucket]
            kl_far = per_bucket[-1][2] / max(1, per_bucket[-1][0])
            evict = sum(r["evict_rate"] for r in rows) / len(rows)
            reads_cr = sum(r.get("reads_cr", 1.0) for r in rows) / len(rows)
            change = 100 * (ppl / base_ppl - 1) if base_ppl else None
            rel = "-" if change is None else f"{change:+.2f}%"
            reads_text = f"{reads_cr:.2f}" if "reads_cr" in rows[0] or not evict else "-"  # old DMS rows: not recorded
            if change is not None and "ppl" in TARGETS.get(name, {}):
                bar = TARGETS[name]["ppl"]
                targets.append((name, "perplexity vs vanilla", f"{change:+.2f}%", f"<= +{bar:g}%", change <= bar))
            lines.append(f"| {name} | {n_tok:,} | {ppl:.3f} | {rel} | {mean_kl:.4f} | {by[0]:.3f} | {by[1]:.3f} | "
                         f"{by[2]:.3f} | {kl_far:.4f} | {1 / max(1e-9, 1 - evict):.2f} | {reads_text} |")
            axes[0].plot([f"{lo // 1024}-{hi // 1024}k" for lo, hi in BUCKETS], by, marker="o", label=name)
        axes[0].set_title("held-out perplexity by context position")
        axes[0].set_ylabel("perplexity")
        axes[0].legend()
        lines.append("")
        covered = [{r["item"] for r in ppl_rows if r["model"] == name} for name in names]
        common = set.intersection(*[c for c in covered if c])
        if any(c and c != common for c in covered):  # a run still under way: every model on the same windows too
            lines += [f"The same, on the {len(common)} windows every model has:", "",
                      "| model | tokens | ppl | ppl vs vanilla | KL |", "|---|---|---|---|---|"]
            base = None
            for name in names:
                rows, per_bucket = bucket_sums(name, common)
                if rows:
                    n_tok, ppl, mean_kl = totals(per_bucket)
                    base = ppl if name == VANILLA else base
                    rel = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
                    lines.append(f"| {name} | {n_tok:,} | {ppl:.3f} | {rel} | {mean_kl:.4f} |")
            lines.append("")
    lines += equal_cost_section(rec, names)
    agree_rows = rec.get("agree")
    if agree_rows:
        lines += ["## Greedy agreement with vanilla", "",
                  f"{AGREE_PROMPTS} held-out prompts of {AGREE_LEN} tokens, {AGREE_NEW} greedy tokens each, kvshrink cache.", "",
                  "| model | prompts | mean leading tokens identical to vanilla | all 128 identical | reads-based CR |", "|---|---|---|---|---|"]
        ref = {s: t for r in agree_rows if r["model"] == VANILLA for s, t in zip(range(r["item"], r["item"] + len(r["tokens"])), r["tokens"])}
        for name in names:
            got = {s: (t, c) for r in agree_rows if r["model"] == name
                   for s, t, c in zip(range(r["item"], r["item"] + len(r["tokens"])), r["tokens"], r["cr"])}
            common = sorted(set(got) & set(ref))
            if not common:
                continue
            lead = [leading_agreement(ref[i], got[i][0]) for i in common]
            lines.append(f"| {name} | {len(common)} | {sum(lead) / len(lead):.1f} | {sum(x == AGREE_NEW for x in lead)} | "
                         f"{sum(got[i][1] for i in common) / len(common):.2f} |")
        lines.append("")
    pk_rows = rec.get("passkey")

    def passkey_trials(name, context):  # trial -> key found, for one model at one context
        return {t: ok for r in pk_rows if r["model"] == name and r["context"] == context for t, ok in zip(r["trials"], r["ok"])}

    if pk_rows:
        lines += ["## Passkey retrieval", "",
                  "A 5-digit key at a random depth of held-out filler, asked through the chat template; the same trials for every "
                  "model. Difference to vanilla in points with a paired 95% interval (normal approximation).", "",
                  "| context | model | trials | accuracy | vs vanilla (paired) | reads-based CR | dtype |", "|---|---|---|---|---|---|---|"]
        for context in PASSKEY_TRIALS:
            base = passkey_trials(VANILLA, context)
            for name in names:
                mine = passkey_trials(name, context)
                if not mine:
                    continue
                at_context = [r for r in pk_rows if r["model"] == name and r["context"] == context]
                cr, dtypes = [r["cr"] for r in at_context], sorted({r["dtype"] for r in at_context})
                common = sorted(set(mine) & set(base))
                diff = "-"
                if name != VANILLA and common:
                    m, h = paired_ci([base[t] for t in common], [mine[t] for t in common])
                    diff = f"{m:+.1f} ± {h:.1f} (n={len(common)})"
                    if context == 1024 and "passkey" in TARGETS.get(name, {}):
                        bar = TARGETS[name]["passkey"]
                        targets.append((name, f"passkey at {context} vs vanilla (points, paired 95% CI)", diff, f">= -{bar:g}", m >= -bar))
                lines.append(f"| {context} | {name} | {len(mine)} | {100 * sum(mine.values()) / len(mine):.0f}% | {diff} | "
                             f"{sum(cr) / len(cr):.2f} | {', '.join(dtypes)} |")
        for name in names:
            pts = [(c, 100 * sum(found.values()) / len(found)) for c in PASSKEY_TRIALS if (found := passkey_trials(name, c))]
            if pts:
                axes[1].plot([c for c, _ in pts], [a for _, a in pts], marker="o", label=name)
        axes[1].set_xscale("log", base=2)
        axes[1].set_title("passkey accuracy")
        axes[1].set_xlabel("context tokens")
        axes[1].set_ylabel("% correct")
        axes[1].legend()
        lines.append("")
    speed_rows = rec.get("speed")
    if speed_rows:
        lines += ["## 8k context: cache and speed", "",
                  f"One {SPEED_PROMPT:,}-token held-out prompt, {SPEED_NEW} greedy tokens, batch 1.", "",
                  "| model | device | reads-based CR | peak cache bytes | peak KV tokens | decode tokens/s | prefill s |", "|---|---|---|---|---|---|---|"]
        for name in names:
            for r in speed_rows:
                if r["model"] == name:
                    lines.append(f"| {name} | {r['device']} | {r['compression_ratio']:.2f} | {r['cache_bytes'] / 2**20:.1f} MiB | "
                                 f"{r['peak_kv_tokens']:.0f} | {r['decode_tokens_per_second']:.1f} | {r['prefill_seconds']:.1f} |")
        lines.append("")
    fig.tight_layout()
    fig.savefig(out_md.with_suffix(".png"), dpi=120)
    lines += [f"![perplexity and passkey]({out_md.with_suffix('.png').name})", ""]
    missing = [f"{part} {name}" for part in ("ppl", "agree") for name in names if not any(r["model"] == name for r in rec.get(part))]
    for c, wanted in PASSKEY_TRIALS.items():
        for name in names:
            done = len(passkey_trials(name, c))
            if done < wanted:
                missing.append(f"passkey at {c} {name}" + (f" ({done} of {wanted} trials)" if done else ""))
    if missing:
        lines += ["Not measured yet: " + "; ".join(missing) + ".", ""]
    if targets:
        lines += ["## Targets", "", "| model | measure | measured | target | met |", "|---|---|---|---|---|",
                  *[f"| {m} | {what} | {got} | {bar} | {'yes' if ok else '**no**'} |" for m, what, got, bar, ok in targets], "",
                  "Missed targets: the training curves are below; `smollm2-analysis.md` says what was tried and what would reach them.", ""]
    lines += training_curves(names, out_md)
    out_md.write_text("\n".join(lines))
    print(f"wrote {out_md}")
    return targets


def model_names(rec: Records, models: list[str]) -> list[str]:
    """Vanilla, the models asked for, then every other model with records: the report covers them all, so runs over
    different model lists add up."""
    return list(dict.fromkeys([VANILLA, *models, *(r["model"] for r in rec.rows)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-dms4", "smollm2-dms8"], help="DMS models (names or folders)")
    parser.add_argument("--work", type=Path, default=ROOT / "docs" / "results" / "smollm2-eval",
                        help="records.jsonl lives here (kept beside the report: the raw data behind it)")
    parser.add_argument("--parts", nargs="+", default=["ppl", "agree", "passkey", "speed"])
    parser.add_argument("--contexts", type=int, nargs="+", default=list(PASSKEY_TRIALS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="weights and cache dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--agree-batch", type=int, default=25)
    parser.add_argument("--ppl-batch", type=int, default=4, help="held-out windows per cached-policy forward")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new items after this long")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "smollm2.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="smoke test: at most N windows/batches per part")
    args = parser.parse_args()
    if args.ppl_batch < 1 or args.agree_batch < 1:
        parser.error("--ppl-batch and --agree-batch must be >= 1")
    rec = Records(args.work / "records.jsonl")
    names = model_names(rec, args.models)
    if not args.report_only:
        deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
        entries, tok = load_entries(args.models, args.device, always=(VANILLA,), dtype=args.dtype)
        device, rec.stamp = next(entries[VANILLA].model.parameters()).device, dtype_stamp(entries[VANILLA].model)
        _, held = pydoc_split()
        held_ids = tok(held)["input_ids"]
        if "ppl" in args.parts:
            run_ppl(entries, held_ids, rec, device, deadline, args.limit, args.ppl_batch)
        if "agree" in args.parts:
            run_agree(entries, held_ids, rec, args.agree_batch, deadline, args.limit)
        if "passkey" in args.parts:
            run_passkey(entries, tok, held_ids, rec, args.contexts, deadline, args.limit)
        if "speed" in args.parts:
            run_speed(entries, held_ids, rec, deadline)
    report(rec, names, args.out)  # the model cards take their bars from the same records: python benchmarks/cards.py


if __name__ == "__main__":
    main()
