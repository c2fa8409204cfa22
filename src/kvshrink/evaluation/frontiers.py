"""Hyper-scaling read off a sweep's points: does spending the memory and reads DMS saves on longer (L) or more
(W) samples answer more than vanilla within the same budget? (Łańcucki et al., 2025, Figures 1 and 4.)

Every comparison is paired: the points of one task share their problems (same seed and difficulty), so the
difference of two points is the mean of per-problem differences of their `correct` lists, with a 95% normal
interval on those differences. A method is a (policy, CR); its frontier at a cost (`kv_reads` or
`peak_kv_tokens` per problem) is its best accuracy among the points costing at most that much.
"""

from __future__ import annotations

import math

COSTS = {"peak_kv_tokens": "peak KV tokens per problem", "kv_reads": "KV reads per problem"}
TRAINING_FREE = ("tova", "h2o", "window", "quest")


def method(row: dict) -> str:
    """A point's method as the tables name it: vanilla, DMS-8, DMS-8 w=0, TOVA-8, ..."""
    policy, cr = row["policy"], f"{row['cr']:g}"
    if policy == "none":
        return "vanilla"
    if policy == "dms":
        return f"DMS-{cr}"
    if policy == "dms-immediate":
        return f"DMS-{cr} w=0"
    return f"{policy.upper() if policy in ('tova', 'h2o') else policy.capitalize()}-{cr}"


def methods(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(method(r), []).append(r)
    return out


def paired_difference(a: dict, b: dict) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) over the same problems and its 95% interval (normal, on per-problem differences).
    Points from before per-problem results were kept get the wider interval of two independent proportions."""
    if "correct" not in a or "correct" not in b:
        diff = a["accuracy"] - b["accuracy"]
        half = 1.96 * math.sqrt(sum(p["accuracy"] * (1 - p["accuracy"]) / p["problems"] for p in (a, b)))
        return diff, diff - half, diff + half
    d = [x - y for x, y in zip(a["correct"], b["correct"], strict=True)]
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def best_within(points: list[dict], cost: str, budget: float) -> dict | None:
    """The most accurate point costing at most `budget` (the cheaper one on ties); None if all cost more."""
    fits = [p for p in points if p[cost] <= budget * (1 + 1e-9)]
    return max(fits, key=lambda p: (p["accuracy"], -p[cost])) if fits else None


def frontier(points: list[dict], cost: str) -> list[dict]:
    """Points no cheaper point matches in accuracy, cheapest first: the method's Pareto frontier."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda r: (r[cost], -r["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def gains(mine: list[dict], theirs: list[dict], cost: str) -> list[dict]:
    """`mine`'s best minus `theirs`' best within every budget where both have a point, the budgets being the
    costs of either method's points (between two of them neither best changes): [{budget, mine, theirs, diff,
    low, high}], cheapest first."""
    out = []
    for budget in sorted({p[cost] for p in mine + theirs}):
        a, b = best_within(mine, cost, budget), best_within(theirs, cost, budget)
        if a is not None and b is not None:
            diff, low, high = paired_difference(a, b)
            out.append({"budget": budget, "mine": a, "theirs": b, "diff": diff, "low": low, "high": high})
    return out


def meets_bar(gain: dict) -> bool:
    """The issue's bar: at least 5 points above, with the paired 95% interval above 0."""
    return gain["diff"] >= 0.05 and gain["low"] > 0


def budget_ranges(steps: list[dict], holds) -> str:
    """The budgets where `holds(step)` is true, as ranges: a step's verdict stands until the next step's budget."""
    ranges, start = [], None
    for i, step in enumerate(steps):
        if holds(step) and start is None:
            start = step["budget"]
        if start is not None and i + 1 == len(steps):
            ranges.append(f"from {start:,.0f} on")
        elif start is not None and not holds(steps[i + 1]):
            ranges.append(f"from {start:,.0f} up to {steps[i + 1]['budget']:,.0f}")
            start = None
    return "; ".join(ranges) if ranges else "none"


def dominated_by(mine: list[dict], theirs: list[dict], cost: str) -> tuple[int, int]:
    """(how many of `theirs`' points `mine` matches or beats within that point's cost, how many it has a point for)."""
    covered = [(best_within(mine, cost, p[cost]), p) for p in theirs]
    covered = [(a, p) for a, p in covered if a is not None]
    return sum(a["accuracy"] >= p["accuracy"] for a, p in covered), len(covered)


def where(p: dict | None) -> str:
    return "-" if p is None else f"{p['accuracy']:.2f} (L {p['L']}, W {p['W']})"


def precondition_table(rows: list[dict]) -> list[str]:
    """Vanilla's accuracy at every (L, W) with its spread: does spending more help the plain model at all?"""
    van = [r for r in rows if r["policy"] == "none"]
    if not van:
        return []
    lengths, widths = sorted({r["L"] for r in van}), sorted({r["W"] for r in van})
    at = {(r["L"], r["W"]): r for r in van}
    lines = ["| L \\ W | " + " | ".join(str(w) for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for length in lengths:
        lines.append(f"| {length} | " + " | ".join(f"{at[(length, w)]['accuracy']:.2f}" if (length, w) in at else "-"
                                                 for w in widths) + " |")
    lo, hi, w1, wmax = lengths[0], lengths[-1], widths[0], widths[-1]
    notes = []
    if (lo, w1) in at and (hi, w1) in at:
        d, a, b = paired_difference(at[(hi, w1)], at[(lo, w1)])
        notes.append(f"longer chains: L {hi} minus L {lo} at W {w1}: {d:+.3f} (95% paired interval {a:+.3f} to {b:+.3f})")
    if (hi, w1) in at and (hi, wmax) in at:
        d, a, b = paired_difference(at[(hi, wmax)], at[(hi, w1)])
        notes.append(f"more votes: W {wmax} minus W {w1} at L {hi}: {d:+.3f} (95% paired interval {a:+.3f} to {b:+.3f})")
    return lines + [""] + [f"- {n}." for n in notes]


def budget_view(rows: list[dict], cost: str, budgets: list[float]) -> list[str]:
    """At each budget: every method's best accuracy within it and at which (L, W); DMS's best minus vanilla's."""
    by = methods(rows)
    names = list(by)
    lines = [f"| {COSTS[cost]} at most | " + " | ".join(names) + " | best DMS minus vanilla (95% paired) |",
             "|---|" + "---|" * (len(names) + 1)]
    for budget in budgets:
        best = {n: best_within(by[n], cost, budget) for n in names}
        dms = [best[n] for n in names if n.startswith("DMS-") and "w=0" not in n and best[n] is not None]
        top = max(dms, key=lambda p: p["accuracy"]) if dms else None
        gap = "-"
        if top is not None and best.get("vanilla") is not None:
            d, a, b = paired_difference(top, best["vanilla"])
            gap = f"{d:+.3f} ({a:+.3f} to {b:+.3f}), {method(top)}"
        lines.append(f"| {budget:,.0f} | " + " | ".join(where(best[n]) for n in names) + f" | {gap} |")
    return lines


def budgets_for(rows: list[dict], cost: str, count: int = 5) -> list[float]:
    """`count` budgets spaced evenly in log between the cheapest DMS point and the costliest vanilla point."""
    dms = [r[cost] for r in rows if r["policy"] == "dms"]
    van = [r[cost] for r in rows if r["policy"] == "none"]
    if not dms or not van:
        return []
    lo, hi = min(dms), max(van)
    return [lo * (hi / lo) ** (i / (count - 1)) for i in range(count)] if hi > lo else [lo]


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's three questions for one task's points, each answered with its figures."""
    by = methods(rows)
    lines = []
    dms = {n: pts for n, pts in by.items() if n.startswith("DMS-") and "w=0" not in n}
    if not dms:
        lines.append("- No DMS point measured yet.")
    for cost in COSTS:
        if "vanilla" not in by or not dms:
            break
        steps = {n: gains(pts, by["vanilla"], cost) for n, pts in dms.items()}
        steps = {n: s for n, s in steps.items() if s}
        if not steps:
            lines.append(f"- {COSTS[cost]}: vanilla has no point within any DMS point's budget.")
            continue
        n, g = max(((n, g) for n, s in steps.items() for g in s), key=lambda x: (x[1]["low"], x[1]["diff"]))
        lines.append(f"- DMS vs vanilla, {COSTS[cost]}: largest gain within one budget ({g['budget']:,.0f}): {n} "
                     f"{where(g['mine'])} against vanilla's best {where(g['theirs'])}: {g['diff']:+.3f} (95% paired "
                     f"{g['low']:+.3f} to {g['high']:+.3f}); {'meets' if meets_bar(g) else 'misses'} the bar (+0.05, interval "
                     f"above 0). Budgets where it holds: " + "; ".join(f"{m}: {budget_ranges(s, meets_bar)}" for m, s in steps.items())
                     + f" (vanilla's cheapest point: {min(p[cost] for p in by['vanilla']):,.0f}).")
    vanilla = {(r["L"], r["W"]): r for r in by.get("vanilla", [])}
    for name, pts in by.items():
        matched = [(q, vanilla[(q["L"], q["W"])]) for q in pts if name.startswith("Quest") and (q["L"], q["W"]) in vanilla]
        if matched:
            reads = sum(q["compression_ratio"] for q, _ in matched) / len(matched)
            memory = sum(q["cache_bytes"] / v["cache_bytes"] for q, v in matched) / len(matched)
            gain = sum(q["accuracy"] - v["accuracy"] for q, v in matched) / len(matched)
            lines.append(f"- {name} against vanilla at the same (L, W): {reads:.2f}x fewer reads (achieved CR), {memory:.2f}x "
                         f"vanilla's cache bytes (it selects what to read and frees nothing), accuracy {gain:+.3f} on average.")
    for mine, ours in dms.items():  # each DMS model against the training-free policies at its nominal CR, at equal cost
        for name, pts in by.items():
            if name.split("-")[0].lower() in TRAINING_FREE and name.endswith(mine[mine.index("-"):]):
                for cost in COSTS:
                    ok, n = dominated_by(ours, pts, cost)
                    lines.append(f"- {mine} vs {name}, {COSTS[cost]}: {mine}'s frontier matches or beats {ok} of {n} {name} "
                                 f"points it has a point within the cost of ({'at or above' if ok == n else 'below at some'}).")
    for name, pts in by.items():
        if name.endswith("w=0") and name.replace(" w=0", "") in by:
            ref = by[name.replace(" w=0", "")]
            for cost in COSTS:
                ok, n = dominated_by(ref, pts, cost)
                strict = sum(best_within(ref, cost, p[cost]) is not None and best_within(ref, cost, p[cost])["accuracy"] > p["accuracy"]
                             for p in pts)
                lines.append(f"- {name} vs {name.replace(' w=0', '')}, {COSTS[cost]}: the delayed model matches or beats "
                             f"{ok} of {n} w = 0 points within their cost, strictly {strict}.")
    return lines


def plot(rows: list[dict], title: str, png) -> None:
    """Accuracy against each cost (log scale), one frontier per method with 95% intervals at its points, one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import wilson_interval

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, cost in zip(axes, COSTS):
        for name, pts in methods(rows).items():
            front = frontier(pts, cost)
            bars = [wilson_interval(round(p["accuracy"] * p["problems"]), p["problems"]) for p in front]
            line, = ax.plot([p[cost] for p in front], [p["accuracy"] for p in front], drawstyle="steps-post", marker="o", label=name)
            ax.errorbar([p[cost] for p in front], [p["accuracy"] for p in front], fmt="none", color=line.get_color(), alpha=0.5,
                        yerr=[[p["accuracy"] - b[0] for p, b in zip(front, bars)], [b[1] - p["accuracy"] for p, b in zip(front, bars)]])
            ax.scatter([p[cost] for p in pts], [p["accuracy"] for p in pts], s=10, alpha=0.3, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel(f"{COSTS[cost]} (log scale)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(len(labels), 8)  # eight fit one row at this width
    rows_of_legend = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    fig.suptitle(f"{title}: each method's frontier (points: every (L, W); bars: 95% intervals)")
    fig.tight_layout(rect=(0, 0.04 + 0.06 * rows_of_legend, 1, 0.95))  # the legend below the axis labels, apart
    fig.savefig(png, dpi=110)
    plt.close(fig)
