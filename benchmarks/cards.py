"""Every shipped model's card, and the headline `kvshrink models` shows, rebuilt from docs/results: how it was made
from its run's logs (docs/results/zoo/NAME/), its accuracy from the records of the study that measured it (n and
95% intervals), its diagnostics from docs/results/diagnostics/. Nothing in a card is written by hand.

    python benchmarks/cards.py            # rewrite src/kvshrink/zoo/models/*/README.md and each model.json's headline
    python benchmarks/cards.py --check    # exit 1 where a shipped card or headline differs (tests/test_zoo.py checks this)

Sources: `tiny`, `tiny-dms4`, `tiny-dms8`: docs/results/zoo-eval/records.jsonl, read with the command that made
docs/results/zoo.md; `smollm2-dms4`, `smollm2-dms8`: docs/results/smollm2-eval/records.jsonl (smollm2.md's bars);
`tiny-dms8-w0`: the points of the hyper-scaling sweep (docs/results/hyperscaling.points.jsonl).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import smollm2_eval  # noqa: E402
import zoo_eval  # noqa: E402
from diagnostics_report import COMMANDS, RECORDS  # noqa: E402
from shared import Records  # noqa: E402

from kvshrink.evaluation.evaluate import wilson_interval  # noqa: E402
from kvshrink.jsonl import read_jsonl  # noqa: E402
from kvshrink.train.cards import ACCURACY, DIAGNOSTICS, diagnostics_section, finetune_card, retrofit_card, with_section  # noqa: E402
from kvshrink.zoo import MANIFEST, MODELS_DIR, adapter_names, adapter_spec, weights_id  # noqa: E402

RESULTS = ROOT / "docs" / "results"
SWEEP = RESULTS / "hyperscaling.points.jsonl"


def zoo_accuracy() -> dict[str, tuple[str, str]]:
    """{model: (its accuracy section, its headline)} from the zoo's records, as zoo.md's command reads them."""
    command = re.search(r"^Command: `(.*)`$", (RESULTS / "zoo.md").read_text(), re.M)[1]
    args = zoo_eval.arguments(shlex.split(command)[2:])
    rows = zoo_eval.summaries(Records(args.work / "records.jsonl"), args)
    ref, out = args.models[0], {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        section = "\n".join([f"Held-out problems, greedy: `{command}` (full table: docs/results/zoo.md). accuracy: % of n problems "
                             f"± its 95% interval; vs {ref}: the paired difference in points on the same problems.", "",
                             *[h.format(ref=ref) for h in zoo_eval.HEADER], *[r["line"] for r in mine]])
        default = [r for r in mine if r["default"]]
        n = ", ".join(sorted({str(r["n"]) for r in default}))
        if name == ref:
            figures = ", ".join(f"{r['task']} {100 * r['k'] / r['n']:.1f}% ± {r['ci']:.1f}" for r in default)
            headline = f"held-out accuracy {figures} (n = {n} each)"
        else:
            figures = ", ".join(f"{r['task']} {r['paired'][0]:+.1f} ± {r['paired'][1]:.1f}" for r in default)
            crs = sorted(r["reads_cr"] for r in default)
            headline = f"accuracy vs {ref}, paired points: {figures} (n = {n} each), at reads-based CR {crs[0]:.1f}-{crs[-1]:.1f}"
        out[name] = (section, headline)
    return out


def smollm2_accuracy() -> dict[str, tuple[str, str]]:
    """{model: (its accuracy section, its headline)}: smollm2.md's bars and equal-cost rows, from its records."""
    rec = Records(RESULTS / "smollm2-eval" / "records.jsonl")
    names = smollm2_eval.model_names(rec, list(smollm2_eval.TARGETS))
    with tempfile.TemporaryDirectory() as tmp:  # the report's own figures; only its bars are kept
        targets = smollm2_eval.report(rec, names, Path(tmp) / "smollm2.md")
    cost = smollm2_eval.equal_cost_section(rec, names)
    out = {}
    for name in smollm2_eval.TARGETS:
        mine = [t for t in targets if t[0] == name]
        windows = len([r for r in rec.get("ppl") if r["model"] == name])
        section = "\n".join([
            f"From `docs/results/smollm2.md` (held-out Python docs, fp32; `python benchmarks/smollm2_eval.py --report-only`): perplexity "
            f"over all {windows} held-out windows of up to {smollm2_eval.WINDOW_TOKENS:,} tokens (one pass, no interval); "
            "passkey: paired difference to vanilla in points with its 95% interval, n trials.", "",
            "| measure | measured | target | met |", "|---|---|---|---|",
            *[f"| {what} | {got} | {bar} | {'yes' if ok else '**no**'} |" for _, what, got, bar, ok in mine], "",
            *cost[4:6], *[line for line in cost[6:] if line.startswith(f"| {name} |")]])
        headline = "; ".join(f"{'perplexity' if what.startswith('perplexity') else '1k passkey'} {got} vs smollm2 "
                             f"(bar {bar}: {'met' if ok else 'missed'})" for _, what, got, bar, ok in mine)
        out[name] = (section, headline)
    return out


def sweep_accuracy(name: str) -> tuple[str, str]:
    """A model measured only in the hyper-scaling sweep: its points at the longest chain, made with the weights shipped
    now, each with n and its 95% (Wilson) interval."""
    shipped = weights_id(name)
    mine = [p for p in read_jsonl(SWEEP) if p["model"] == name and p.get("weights") == shipped]
    longest = max(p["L"] for p in mine)
    points = sorted((p for p in mine if p["L"] == longest), key=lambda p: (p["task"], p.get("difficulty") or 0, p["W"]))
    lines = ["From the hyper-scaling sweep (`kvshrink sweep --config benchmarks/sweep-hyperscaling.toml`, "
             "docs/results/hyperscaling.md; delayed against immediate eviction: docs/results/hyperscaling-analysis.md). "
             f"Held-out problems, the same for every method; chains of at most {longest} tokens; W samples at T = "
             f"{points[0]['temperature']:g}, top-p {points[0]['top_p']:g}, majority vote.", "",
             "| task | policy | CR | L | W | problems | accuracy [95% interval] | pass@W | reads-based CR | kv_reads | peak KV tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        k = round(p["accuracy"] * p["problems"])
        low, high = wilson_interval(k, p["problems"])
        lines.append(f"| {task_label(p)} | {p['policy']} | {p['cr']:g} | {p['L']} | {p['W']} | {p['problems']} | {k}/{p['problems']} "
                     f"[{low:.2f}, {high:.2f}] | {p['pass_at_w']:.3f} | {p['compression_ratio']:.2f} | {p['kv_reads']:,.0f} | "
                     f"{p['peak_kv_tokens']:,.0f} |")
    single = [p for p in points if p["W"] == 1]
    crs = sorted(p["compression_ratio"] for p in single)
    trained = read_jsonl(RESULTS / "zoo" / name / "metrics.jsonl")[-1]
    headline = (f"sweep, W = 1, L {longest}: " + ", ".join(f"{task_label(p)} {round(p['accuracy'] * p['problems'])}/{p['problems']}"
                                                           for p in single)
                + f" right, at reads-based CR {crs[0]:.1f}-{crs[-1]:.1f} (trained for {adapter_spec(name)['dms']['target_cr']:g}, "
                f"its training ended at a flag-based CR of {trained['flag_cr']:.1f})")
    return "\n".join(lines), headline


def task_label(point: dict) -> str:
    return point["task"] if point.get("difficulty") is None else f"{point['task']} at {point['difficulty']}"


def build() -> dict[str, tuple[str, str]]:
    """{shipped adapter: (its card, its headline)}, from docs/results alone."""
    accuracy = {**zoo_accuracy(), **smollm2_accuracy()}
    figures = {}
    for record in COMMANDS:
        if (RECORDS / f"{record}.json").is_file():
            f = json.loads((RECORDS / f"{record}.json").read_text())
            figures.setdefault(f["model"], []).append(f)
    out = {}
    for name in adapter_names():
        logs, base = RESULTS / "zoo" / name, adapter_spec(name)["base"]
        card = retrofit_card(name, logs, base) if (logs / "retrofit.json").is_file() else finetune_card(name, logs)
        section, headline = accuracy[name] if name in accuracy else sweep_accuracy(name)
        card = with_section(card, ACCURACY, section)
        if name in figures:
            card = with_section(card, DIAGNOSTICS, diagnostics_section(*figures[name]), after=ACCURACY)
        elif DIAGNOSTICS in card:  # no inspect record: say so rather than leave the placeholder's promise
            card = with_section(card, DIAGNOSTICS, f"Not measured: no `kvshrink inspect {name}` record in docs/results/diagnostics/.")
        out[name] = (card, headline)
    return out


def differences(built: dict[str, tuple[str, str]]) -> list[str]:
    """The shipped cards and headlines that differ from what the records give."""
    wrong = []
    for name, (card, headline) in built.items():
        if (MODELS_DIR / name / "README.md").read_text() != card:
            wrong.append(f"{name}: README.md")
        if adapter_spec(name).get("headline") != headline:
            wrong.append(f"{name}: headline in {MANIFEST}")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a shipped card or headline differs")
    args = parser.parse_args()
    built = build()
    if args.check:
        wrong = differences(built)
        print("\n".join(wrong) if wrong else f"{len(built)} cards match their records")
        sys.exit(1 if wrong else 0)
    for name, (card, headline) in built.items():
        (MODELS_DIR / name / "README.md").write_text(card)
        manifest = MODELS_DIR / name / MANIFEST
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "headline": headline}, indent=1))
    print(f"wrote the cards and headlines of {', '.join(built)}")


if __name__ == "__main__":
    main()
