"""The hyper-scaling precondition on more problems: does the plain model gain from longer chains (L) and from votes (W)?

    python benchmarks/precondition.py [--points docs/results/hyperscaling.points.jsonl
        docs/results/hyperscaling-precondition-vt.points.jsonl] [--out docs/results/hyperscaling-precondition.md]

The grid's 100 problems per point show W's gain on `vt` (+0.06) but cannot tell it from 0. A second sweep over
*other* problems (benchmarks/sweep-precondition.toml: seeds 100-299, same sampling) adds to them: this pools every
vanilla point of the same task, level, L, W and sampling over disjoint problem ranges, so each paired interval is
over all the problems, and writes the precondition table per task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvshrink.evaluation.frontiers import precondition_table
from kvshrink.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
POINTS = [ROOT / "docs/results/hyperscaling.points.jsonl", ROOT / "docs/results/hyperscaling-precondition-vt.points.jsonl"]
SAME = ("task", "difficulty", "model", "weights", "L", "W", "temperature", "top_p")


def pooled(rows: list[dict]) -> list[dict]:
    """One row per vanilla (task, level, L, W, sampling): the per-problem results of every disjoint problem range."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["policy"] == "none" and "correct" in r:
            groups.setdefault(tuple(r.get(k) for k in SAME), []).append(r)
    out = []
    for parts in groups.values():
        parts.sort(key=lambda r: r["seed"])
        for a, b in zip(parts, parts[1:]):
            if a["seed"] + a["problems"] > b["seed"]:
                raise SystemExit(f"{a['task']} L {a['L']} W {a['W']}: problem ranges from seeds {a['seed']} and "
                                 f"{b['seed']} overlap; pool only sweeps over different problems")
        correct = [c for r in parts for c in r["correct"]]
        out.append({**parts[0], "correct": correct, "problems": len(correct), "accuracy": sum(correct) / len(correct),
                    "seeds": [(r["seed"], r["seed"] + r["problems"] - 1) for r in parts]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", type=Path, default=POINTS)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/hyperscaling-precondition.md")
    args = ap.parse_args()
    rows = pooled([r for p in args.points if p.exists() for r in read_jsonl(p)])
    lines = ["# Hyper-scaling precondition: vanilla `tiny`, pooled over problem ranges", "",
             "Made by `python benchmarks/precondition.py` from " + ", ".join(f"`{p.name}`" for p in args.points) + ".",
             "Accuracy at each (L, W), T 0.7, top-p 0.95, one run per problem range read off at every (L, W); intervals "
             "are paired over every problem.", ""]
    for key in sorted({(r["task"], r.get("difficulty") or 0) for r in rows}):
        part = [r for r in rows if (r["task"], r.get("difficulty") or 0) == key]
        ranges = sorted({s for r in part for s in r["seeds"]})
        part = [r for r in part if sorted(r["seeds"]) == ranges]  # every (L, W) over the same problems: paired
        n = part[0]["problems"]
        level = f" at {key[1]}" if key[1] else ""
        lines += [f"## `{key[0]}`{level}: {n} problems (seeds " + ", ".join(f"{a}-{b}" for a, b in ranges) + ")", ""]
        lines += precondition_table(part) + [""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
