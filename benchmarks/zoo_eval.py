"""The task zoo's accuracy table: `tiny` vs its DMS retrofits (or any model / NAME@POLICY:CR entry) on
held-out problems of every task, at the default and at harder difficulties.

    python benchmarks/zoo_eval.py [--models tiny tiny-dms4 tiny-dms8] [--problems 200] [--hard-problems 100]
        [--hard arith=10 vt=6 niah=4,5 hops=5,7] [--hard-models tiny] [--work docs/results/zoo-eval] [--max-minutes M] [--report-only]

Held out: evaluation problems are drawn from `TASK/0/D/i`; fine-tuning draws from `finetune/0/i` and the DMS
retrofit's teacher prompts from seed 1,000,000, so no problem is shared. Greedy, one sample per problem,
the same problems for every model (paired against the first model). Every batch is appended to
WORK/records.jsonl as it finishes; rerun the command to resume.

Model cards take their rows from these records: `python benchmarks/cards.py`.

Two compression ratios for DMS models (docs/conventions.md): reads-based (vanilla's KV reads for the same tokens /
the reads the cache made; short answers and the window w keep it below the trained ratio) and flag-based
(1 / (1 - the fraction of eviction decisions over every (layer, KV head, token)), teacher-forced on
prompt + answer: the ratio the cache reaches on long sequences).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from kvshrink.attach import dms_config  # noqa: E402
from kvshrink.dms import TrainSignals  # noqa: E402
from kvshrink.tasks import TASKS, make_problems  # noqa: E402
from kvshrink.prompts import chat_prompt  # noqa: E402
from kvshrink.demo import plot_tasks  # noqa: E402
from kvshrink.evaluation.evaluate import evaluate, wilson_interval  # noqa: E402
from shared import Records, binomial_ci, dtype_stamp, load_entries, paired_ci  # noqa: E402

BATCH = 20
HARD = {"arith": [10], "vt": [6], "niah": [5], "hops": [5]}
BARS = {"tiny-dms4": 3.0, "tiny-dms8": 6.0}  # points below the reference allowed at default difficulty
BAR_PROBLEMS = 200  # a zoo bar is judged on at least this many problems per task


@torch.no_grad()
def flag_rate(model, tok, prompts: list[str], outputs: list[str]) -> float | None:
    """Mean eviction decision over (layer, KV head, token) of prompt + answer, teacher-forced; None if not DMS."""
    if dms_config(model) is None:
        return None
    rates = []
    device = next(model.parameters()).device
    for prompt, output in zip(prompts, outputs):
        ids = chat_prompt(tok, prompt) + tok(output)["input_ids"]
        flags = []
        model(torch.tensor([ids], device=device), use_cache=False, dms_signals=TrainSignals(collect=flags))
        rates.append(float(torch.stack([f["flags"].float().mean() for f in flags]).mean()))
    return sum(rates) / len(rates)


def settings(args) -> list[tuple[str, int, int]]:
    """(task, difficulty, problems): each task's default, then its harder settings."""
    out = [(t, TASKS[t].DEFAULT_DIFFICULTY, args.problems) for t in args.tasks]
    return out + [(t, d, args.hard_problems) for t in args.tasks if args.hard_problems for d in args.hard[t]]


def run(args, rec: Records, deadline: float) -> None:
    entries, tok = load_entries(args.models, args.device, dtype=args.dtype)
    for task, difficulty, n in settings(args):
        hard = difficulty != TASKS[task].DEFAULT_DIFFICULTY
        for name, entry in entries.items():
            if hard and name not in args.hard_models:
                continue
            for first in range(0, n, BATCH):
                part = f"{task}/{difficulty}"
                if (part, name, first) in rec.done or time.time() > deadline:
                    continue
                r = evaluate(entry.model, tok, task, entry.policy, problems=min(BATCH, n - first), first=first,
                             difficulty=difficulty, batch_size=args.batch_size)
                prompts = [p.prompt for p in make_problems(task, len(r["results"]), difficulty=difficulty, first=first)]
                rec.add({"part": part, "model": name, "item": first, "task": task, "difficulty": difficulty,
                         **dtype_stamp(entry.model),
                         "correct": [x["correct"] for x in r["results"]], "kv_reads": r["kv_reads"],
                         "peak_kv_tokens": r["peak_kv_tokens"], "reads_cr": r["compression_ratio"], "seconds": r["seconds"],
                         "flag_rate": flag_rate(entry.model, tok, prompts, [x["output"] for x in r["results"]]),
                         "outputs": [x["output"] for x in r["results"]]})
                print(f"{part} {name} {first}+: {sum(rec.rows[-1]['correct'])}/{len(r['results'])}  "
                      f"CR {r['compression_ratio']:.2f}  {r['seconds']:.0f} s", flush=True)


HEADER = ["| task | difficulty | model | problems | accuracy | vs {ref} (paired) | bar | reads-based CR | flag-based CR | kv_reads | "
          "peak KV tokens | s/problem | precision |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def summaries(rec: Records, args) -> list[dict]:
    """One row per (task, difficulty, model) with records: n, accuracy and its interval, the paired difference to
    the first model, the bar, both CRs and the costs; `line` is the row of the table in zoo.md and the cards."""
    ref_name, out = args.models[0], []
    for task, difficulty, _ in settings(args):
        part, default = f"{task}/{difficulty}", difficulty == TASKS[task].DEFAULT_DIFFICULTY
        per_model = {}
        for name in args.models:
            rows = sorted((r for r in rec.get(part) if r["model"] == name), key=lambda r: r["item"])
            if rows:
                per_model[name] = rows
        ref = {r["item"] + i: ok for r in per_model.get(ref_name, []) for i, ok in enumerate(r["correct"])}
        for name, rows in per_model.items():
            correct = {r["item"] + i: ok for r in rows for i, ok in enumerate(r["correct"])}
            n, k = len(correct), sum(correct.values())
            weights = [len(r["correct"]) for r in rows]
            mean = lambda key: sum(r[key] * w for r, w in zip(rows, weights)) / n  # noqa: E731
            diff, paired, bar = "-", None, "-"
            common = sorted(set(correct) & set(ref))
            if name != ref_name and common:
                paired = paired_ci([ref[i] for i in common], [correct[i] for i in common])
                diff = f"{paired[0]:+.1f} ± {paired[1]:.1f}"
                if name in BARS and default:
                    bar = "met" if paired[0] >= -BARS[name] else "**missed**"
                    bar += "" if len(common) >= BAR_PROBLEMS else f" (n < {BAR_PROBLEMS}: not yet judged)"
            elif name == ref_name and default:
                bar = "met (≥ 70%)" if k / n >= 0.7 else "**missed** (< 70%)"
            elif name == ref_name:
                bar = "met (20-70%)" if 0.2 <= k / n <= 0.7 else "**missed** (not 20-70%)"
            if name == ref_name and n < BAR_PROBLEMS:
                bar += f" (n < {BAR_PROBLEMS}: not yet judged)"
            flags = [r["flag_rate"] for r in rows if r["flag_rate"] is not None]
            flag_cr = f"{1 / (1 - sum(flags) / len(flags)):.2f}" if flags else "-"
            reads_cr = sum(r["reads_cr"] * r["kv_reads"] * w for r, w in zip(rows, weights)) / (n * mean("kv_reads"))
            line = (f"| {task} | {difficulty} | {name} | {n} | {100 * k / n:.1f}% ± {binomial_ci(k, n):.1f} | {diff} | {bar} | "
                    f"{reads_cr:.2f} | {flag_cr} | {mean('kv_reads'):,.0f} | {mean('peak_kv_tokens'):,.0f} | "
                    f"{sum(r['seconds'] for r in rows) / n:.2f} | {', '.join(sorted({r.get('dtype', 'not recorded') for r in rows}))} |")
            out.append({"task": task, "difficulty": difficulty, "default": default, "model": name, "n": n, "k": k,
                        "ci": binomial_ci(k, n), "paired": paired, "reads_cr": reads_cr, "kv_reads": mean("kv_reads"), "line": line})
    return out


def report(rec: Records, args, out_md: Path, command: str) -> list[dict]:
    """zoo.md and zoo.png from the records; returns the rows (`summaries`), which `benchmarks/cards.py` puts in the cards."""
    ref_name = args.models[0]
    rows = summaries(rec, args)
    lines = ["# Task zoo: accuracy, compression and KV-cache cost", "", f"Command: `{command}`", "",
             "Greedy, one sample per problem, held-out seeds; the same problems for every model, so differences to "
             f"`{ref_name}` are paired (95% interval, normal approximation). kv_reads and peak KV tokens are per problem "
             "(definitions: docs/conventions.md). Bars at default difficulty: " + ", ".join(f"`{m}` within {b:g} points" for m, b in BARS.items()) + ". "
             "precision: the dtype the rows ran in (rows can come from runs at different `--dtype`); s/problem: wall time of "
             "the batches, so it includes any time a run was paused.", "",
             *[h.format(ref=ref_name) for h in HEADER], *[r["line"] for r in rows]]
    png = plot_tasks([{"task": r["task"], "model": r["model"], "kv_reads": r["kv_reads"], "accuracy": r["k"] / r["n"],
                       "accuracy_interval": wilson_interval(r["k"], r["n"]), "problems": r["n"]} for r in rows if r["default"]],
                     out_md.with_suffix(".png"))  # the demo's plot, at the table's default difficulties
    lines += ["", f"![accuracy vs KV reads]({png.name})", ""]
    out_md.write_text("\n".join(lines))
    print(f"wrote {out_md}")
    return rows


def arguments(argv: list[str] | None = None):
    """The command line, parsed (also how `benchmarks/cards.py` reads the command zoo.md records)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-dms4", "tiny-dms8"],
                        help="the first is the reference of the paired differences")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--problems", type=int, default=200, help="problems per task at the default difficulty")
    parser.add_argument("--hard-problems", type=int, default=100, help="problems per task at the harder setting (0: none)")
    parser.add_argument("--hard", nargs="*", default=[], metavar="TASK=D[,D]", help=f"harder difficulties (default {HARD})")
    parser.add_argument("--hard-models", nargs="*", default=None,
                        help="models measured at the harder setting (default: the first, the reference)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--work", type=Path, default=ROOT / "docs" / "results" / "zoo-eval",
                        help="records.jsonl lives here (kept beside the report: the raw data behind it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | bfloat16 | float32")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new batches after this long")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "zoo.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.hard_models = args.models[:1] if args.hard_models is None else args.hard_models
    args.hard = {**HARD, **{k: [int(d) for d in v.split(",")] for k, v in (x.split("=") for x in args.hard)}}
    return args


def main():
    args = arguments()
    rec = Records(args.work / "records.jsonl")
    hard = " ".join(t + "=" + ",".join(map(str, ds)) for t, ds in args.hard.items() if t in args.tasks)
    command = (f"python benchmarks/zoo_eval.py --models {' '.join(args.models)} --tasks {' '.join(args.tasks)} "
               f"--problems {args.problems} --hard-problems {args.hard_problems} "
               f"--hard {hard} "
               f"--hard-models {' '.join(args.hard_models)}"
               + (f" --dtype {args.dtype}" if args.dtype != "auto" else ""))
    if not args.report_only:
        run(args, rec, time.time() + 60 * args.max_minutes if args.max_minutes else math.inf)
    report(rec, args, args.out, command)


if __name__ == "__main__":
    main()
