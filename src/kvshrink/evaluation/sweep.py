"""`kvshrink sweep`: the hyper-scaling grid and its Pareto frontiers.

Grid: tasks x policies x CR x L (max new tokens) x W (samples per problem, majority vote). `none` runs
at CR 1 only; every other policy at CR > 1; `dms` uses the DMS model trained for that CR (the config's
`dms_models`), `dms-immediate` the w = 0 model, the training-free policies the base model with `--cr`.
W = 1 is greedy, W > 1 samples at the config's temperature and top-p. With `nested = true`, each (task,
policy, CR) runs once, at the largest L and W, every W sampled, and the smaller L and W are read off that run
(`evaluate.nested_points`: a generation stopped at L tokens is the run's first L tokens; the first W samples
are W samples), each point keeping its per-problem results for paired intervals. A problem's W samples
share one read of its prompt. Each finished point is appended to
`<results>.points.jsonl`, so an interrupted sweep resumes where it stopped. The report has, per task,
every point and each policy's Pareto frontier (highest accuracy for at most that many reads, or peak
tokens), plotted as accuracy vs kv_reads and accuracy vs peak_kv_tokens.

Config (TOML):

    [sweep]
    base = "tiny"                 # model for none and the training-free policies
    tasks = ["arith", "vt"]
    policies = ["none", "dms", "tova", "h2o", "window", "quest"]
    crs = [1, 4, 8]
    lengths = [64, 128]           # L
    widths = [1, 4]               # W
    problems = 50
    seed = 0
    temperature = 0.7
    top_p = 0.95
    [sweep.dms_models]            # CR -> DMS model
    "4" = "tiny-dms4"
    "8" = "tiny-dms8"
    [sweep.immediate_models]      # CR -> DMS model retrofitted with w = 0
    "8" = "tiny-dms8-w0"
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from ..errors import KVShrinkError
from ..jsonl import append_jsonl, read_jsonl
from ..loading import load
from ..policies import BUDGETED, check_name
from ..progress import advance, progress_bar, stop
from ..tasks import task_module
from .evaluate import evaluate

POINT_FIELDS = ("accuracy", "pass_at_w", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes",
                "compression_ratio", "seconds")


@dataclass
class SweepConfig:
    base: str
    tasks: list[str]
    policies: list[str]
    crs: list[float]
    lengths: list[int]
    widths: list[int]
    problems: int = 50
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 8
    nested: bool = False
    dms_models: dict = field(default_factory=dict)
    immediate_models: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> "SweepConfig":
        try:
            raw = tomllib.loads(Path(path).read_text())["sweep"]
        except FileNotFoundError as exc:
            raise KVShrinkError(f"sweep config {path} not found") from exc
        except (tomllib.TOMLDecodeError, KeyError) as exc:
            raise KVShrinkError(f"{path}: not a sweep config ({exc}); it needs a [sweep] table, see `kvshrink sweep --help`") from exc
        try:
            return cls(**raw)
        except TypeError as exc:
            raise KVShrinkError(f"{path}: {exc}") from exc

    def points(self) -> list[dict]:
        """Every grid point that can run, in a stable order: (task, policy, cr, model, L, W)."""
        out = []
        for task in self.tasks:
            task_module(task)
            for policy in self.policies:
                check_name(policy)
                for cr in self.crs:
                    model = self._model(policy, cr)
                    if model is None:
                        continue
                    for length in self.lengths:
                        for width in self.widths:
                            out.append({"task": task, "policy": policy, "cr": cr, "model": model, "L": length, "W": width,
                                        **self._sampling(width)})
        return out

    def _sampling(self, width: int) -> dict:
        """What else decides a point's result: its problems and, for W > 1, how samples are drawn."""
        greedy = width == 1 and not self.nested
        return {"problems": self.problems, "seed": self.seed, "temperature": 0.0 if greedy else self.temperature,
                "top_p": 1.0 if greedy else self.top_p}

    def _model(self, policy: str, cr: float) -> str | None:
        if policy == "none":
            return self.base if cr == 1 else None
        if cr == 1:
            return None
        if policy == "dms":
            return self.dms_models.get(f"{cr:g}")
        if policy == "dms-immediate":
            return self.immediate_models.get(f"{cr:g}")
        return self.base


def point_key(p: dict) -> str:
    """A finished point is reused only if everything that decides its result is the same."""
    return json.dumps([p.get(k) for k in ("task", "policy", "cr", "model", "L", "W", "problems", "seed", "temperature", "top_p")])


def run_sweep(cfg: SweepConfig, points_file: Path, progress: bool = True, device: str = "auto", dtype: str = "auto") -> list[dict]:
    """Run the missing points (grouped by model, loaded once each); return all points' results."""
    done = {point_key(row): row for row in read_jsonl(points_file)}
    todo = [p for p in cfg.points() if point_key(p) not in done]
    bar = progress_bar(progress, "sweep", len(cfg.points()), len(cfg.points()) - len(todo))
    points_file.parent.mkdir(parents=True, exist_ok=True)
    for model_name in dict.fromkeys(p["model"] for p in todo):
        model, tok = load(model_name, device=device, dtype=dtype)
        runs = [[q] for q in todo if q["model"] == model_name]
        if cfg.nested:  # one run per (task, policy, CR) covers its every L and W
            runs = [[q for q in todo if _run_of(q) == key] for key in dict.fromkeys(_run_of(q) for q in todo if q["model"] == model_name)]
        for run in runs:
            for row in _measure(model, tok, run, cfg):
                append_jsonl(points_file, row)
                done[point_key(row)] = row
                advance(bar, info=f"{row['task']} {row['policy']} CR {row['cr']:g} L {row['L']} W {row['W']}: acc {row['accuracy']:.2f}")
    stop(bar)
    return [done[point_key(p)] for p in cfg.points()]


def _run_of(p: dict) -> tuple:
    return p["task"], p["policy"], p["cr"], p["model"]


def _measure(model, tok, run: list[dict], cfg: SweepConfig) -> list[dict]:
    """Finished rows for the points of `run`: one evaluation, at its largest L and W (nested) or its one point."""
    p = run[0]
    length, width = max(q["L"] for q in run), max(q["W"] for q in run)
    nested = {"lengths": sorted({q["L"] for q in run}), "widths": sorted({q["W"] for q in run})} if cfg.nested else {}
    result = evaluate(model, tok, p["task"], p["policy"], cr=p["cr"] if p["policy"] in BUDGETED else None,
                      problems=p["problems"], seed=p["seed"], width=width, max_new_tokens=length, temperature=p["temperature"],
                      top_p=p["top_p"], batch_size=max(1, cfg.batch_size // width), **nested)
    if not cfg.nested:
        return [{**p, **{k: result[k] for k in POINT_FIELDS}, "finished": time.time()}]
    grid = {(g["L"], g["W"]): g for g in result["grid"]}
    return [{**q, **grid[(q["L"], q["W"])], "cache_bytes": result["cache_bytes"], "seconds": result["seconds"],
             "run": f"L {length}, W {width}", "finished": time.time()} for q in run]


def pareto(points: list[dict], cost: str) -> list[dict]:
    """Points no other point beats on both axes (fewer `cost`, higher accuracy), cheapest first."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda r: (r[cost], -r["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def best_within(points: list[dict], cost: str, budget: float) -> float | None:
    """Highest accuracy among points costing at most `budget` (None if every point costs more)."""
    fits = [p["accuracy"] for p in points if p[cost] <= budget]
    return max(fits) if fits else None


def difference_ci(a: dict, b: dict) -> float:
    """95% half-width of accuracy(a) - accuracy(b), normal approximation for two independent proportions.

    The points share their problems, so the paired interval would be narrower: this one is conservative."""
    var = sum(p["accuracy"] * (1 - p["accuracy"]) / p["problems"] for p in (a, b))
    return 1.96 * math.sqrt(var)


def paired_gains(rows: list[dict], a: str, b: str, cr: float) -> list[tuple[dict, dict]]:
    """(point of policy `a`, point of policy `b`) at compression `cr` for every (L, W) both ran."""
    theirs = {(r["L"], r["W"]): r for r in rows if r["policy"] == b and r["cr"] == cr}
    return [(r, theirs[(r["L"], r["W"])]) for r in rows if r["policy"] == a and r["cr"] == cr and (r["L"], r["W"]) in theirs]


def findings(rows: list[dict]) -> list[str]:
    """The study's four questions answered from the points, one line per task and question."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        by = {policy: [r for r in mine if r["policy"] == policy] for policy in dict.fromkeys(r["policy"] for r in mine)}
        if by.get("dms") and by.get("none"):
            for cost in ("kv_reads", "peak_kv_tokens"):
                front = pareto(by["none"], cost)
                gains = [(best_within(by["dms"], cost, v[cost]), v["accuracy"]) for v in front]
                pairs = [(g, a) for g, a in gains if g is not None]
                ahead = sum(g >= a for g, a in pairs)
                mean = f"{sum(g - a for g, a in pairs) / len(pairs):+.3f}" if pairs else "n/a"
                lines.append(f"- `{task}`, DMS vs vanilla at equal {cost}: vanilla's frontier has {len(front)} "
                             f"point{'s' * (len(front) != 1)}; within "
                             f"each one's cost DMS reaches at least its accuracy at {ahead} (mean DMS - vanilla {mean}); "
                             f"{len(front) - len(pairs)} cost less than any DMS point.")
        for base in ("tova", "h2o", "window", "quest", "dms-immediate"):
            pairs = paired_gains(mine, "dms", base, 8)
            if pairs:
                each = "; ".join(f"L {d['L']}, W {d['W']}: {d['accuracy'] - o['accuracy']:+.3f} \u00b1 {difference_ci(d, o):.3f}"
                                 for d, o in pairs)
                mean = sum(d["accuracy"] - o["accuracy"] for d, o in pairs) / len(pairs)
                lines.append(f"- `{task}`, CR 8: DMS minus {base}: {mean:+.3f} accuracy (mean over {len(pairs)} (L, W) pairs; "
                             f"{each}; 95% CI, {pairs[0][0]['problems']} problems).")
        vanilla = {(r["L"], r["W"]): r for r in by.get("none", [])}
        for cr in sorted({r["cr"] for r in by.get("quest", [])}):
            matched = [(q, vanilla[(q["L"], q["W"])]) for q in by["quest"] if q["cr"] == cr and (q["L"], q["W"]) in vanilla]
            if matched:
                reads = sum(q["compression_ratio"] for q, _ in matched) / len(matched)
                memory = sum(q["cache_bytes"] / v["cache_bytes"] for q, v in matched) / len(matched)
                gain = sum(q["accuracy"] - v["accuracy"] for q, v in matched) / len(matched)
                lines.append(f"- `{task}`, Quest at CR {cr:g} vs vanilla (same L, W): {reads:.2f}x fewer reads (achieved CR), "
                             f"{memory:.2f}x vanilla's cache bytes, accuracy {gain:+.3f}.")
    return lines


def matched_budgets(rows: list[dict], cr: float = 8) -> list[str]:
    """A table: at each DMS point's cost at `cr` (reads, then peak tokens), the best accuracy vanilla (any L, W)
    and each baseline at the same CR reach within that cost ('-': every point of theirs costs more)."""
    rivals = [("vanilla", lambda r: r["policy"] == "none")] + [
        (f"{p} {cr:g}x", lambda r, p=p: r["policy"] == p and r["cr"] == cr) for p in ("tova", "h2o", "window", "quest")]
    rivals = [(name, keep) for name, keep in rivals if any(keep(r) for r in rows)]
    lines = [f"| task | cost | DMS {cr:g}x point (L, W) | its cost | DMS | " + " | ".join(n for n, _ in rivals) + " |",
             "|---|---|---|---|---|" + "---|" * len(rivals)]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        for cost in ("kv_reads", "peak_kv_tokens"):
            for d in (r for r in mine if r["policy"] == "dms" and r["cr"] == cr):
                best = [best_within([r for r in mine if keep(r)], cost, d[cost]) for _, keep in rivals]
                lines.append(f"| {task} | {cost} | ({d['L']}, {d['W']}) | {d[cost]:,.0f} | {d['accuracy']:.3f} | "
                             + " | ".join("-" if b is None else f"{b:.3f}" for b in best) + " |")
    return lines if len(lines) > 2 else []


def write_report(rows: list[dict], out_md: Path, command: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []
    lines = ["# Hyper-scaling: accuracy against KV-cache reads and peak memory", "", f"Command: `{command}`", "",
             "Per-problem means: `kv_reads` over generated tokens (prompt reads separately), `peak_kv_tokens` = a problem's "
             "W samples' live tokens summed at their peak. Frontier = best accuracy at or below that cost.", "",
             "## Findings (computed from the points below)", "", *findings(rows), "",
             "### At DMS-8x's cost: the best accuracy each method reaches for the same reads or peak memory", "",
             *matched_budgets(rows), ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        lines += [f"## {task}", "", "| policy | CR | model | L | W | problems | accuracy | pass@W | kv_reads | peak_kv_tokens | achieved CR |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            lines.append(f"| {r['policy']} | {r['cr']:g} | {r['model']} | {r['L']} | {r['W']} | {r['problems']} | {r['accuracy']:.3f} | "
                         f"{r['pass_at_w']:.3f} | {r['kv_reads']:,.0f} | {r['peak_kv_tokens']:,.0f} | {r['compression_ratio']:.2f} |")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, cost in zip(axes, ("kv_reads", "peak_kv_tokens")):
            for policy in dict.fromkeys(r["policy"] for r in mine):
                pts = [r for r in mine if r["policy"] == policy]
                line, = ax.plot([p[cost] for p in pareto(pts, cost)], [p["accuracy"] for p in pareto(pts, cost)],
                                marker="o", drawstyle="steps-post", label=policy)
                ax.scatter([p[cost] for p in pts], [p["accuracy"] for p in pts], s=12, alpha=0.35, color=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel(f"{cost} per problem")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{task}: accuracy vs {cost}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = out_md.with_name(f"{out_md.stem}-{task}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pngs.append(png)
        lines += ["", f"![{task}]({png.name})", ""]
    out_md.write_text("\n".join(lines))
    return pngs
