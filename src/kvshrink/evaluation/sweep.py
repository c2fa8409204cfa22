"""`kvshrink sweep`: the hyper-scaling grid and its Pareto frontiers.

Grid: tasks x policies x CR x L (max new tokens) x W (samples per problem, majority vote). `none` runs
at CR 1 only; every other policy at CR > 1; `dms` uses the DMS model trained for that CR (the config's
`dms_models`), `dms-immediate` the w = 0 model, the training-free policies the base model with `--cr`.
W = 1 is greedy, W > 1 samples at the config's temperature and top-p. With `nested = true`, each (task,
policy, CR) runs once, at the largest L and W, every W sampled, and the smaller L and W are read off that run
(`evaluate.nested_points`: a generation stopped at L tokens is the run's first L tokens; the first W samples
are W samples), each point keeping its per-problem results for paired intervals. A problem's W samples
share one read of its prompt. Each finished point, stamped with its model's `zoo.weights_id`, is appended to
`<results>.points.jsonl`, so an interrupted sweep resumes where it stopped. The report has, per task,
every point and each policy's Pareto frontier (highest accuracy for at most that many reads, or peak
tokens), plotted as accuracy vs kv_reads and accuracy vs peak_kv_tokens.

Config (TOML):

    [sweep]
    base = "tiny"                 # model for none and the training-free policies
    tasks = ["arith", "vt"]
    difficulties = {arith = [8, 12]}  # optional, per task: one level or a list (default: the task's own)
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
    [[sweep.cuts]]                # optional, repeatable: points left out of the grid, and why (the report lists them)
    task = "arith"                # any of task, difficulty, policy, cr: a point matching all given is cut
    difficulty = 12
    policy = "dms-immediate"
    why = "DMS-8 answers no 12-step chain, so w = 0 has nothing to lose"
"""

from __future__ import annotations

import json
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
from ..zoo import weights_id
from . import frontiers
from .evaluate import evaluate, wilson_interval

CUT_KEYS = ("task", "difficulty", "policy", "cr")
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
    difficulties: dict = field(default_factory=dict)
    dms_models: dict = field(default_factory=dict)
    immediate_models: dict = field(default_factory=dict)
    cuts: list = field(default_factory=list)

    def __post_init__(self):
        for cut in self.cuts:
            if not isinstance(cut, dict):
                raise KVShrinkError(f"sweep cut {cut!r}: each cut is a table, [[sweep.cuts]]")
            unknown = set(cut) - {*CUT_KEYS, "why"}
            if unknown or "why" not in cut or not set(cut) & set(CUT_KEYS):
                raise KVShrinkError(f"sweep cut {cut}: give some of {', '.join(CUT_KEYS)} and a `why` (unknown: "
                                    f"{', '.join(sorted(unknown)) or 'none'})")

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
        out, used = [], []
        for task in self.tasks:
            task_module(task)
            for level in self._levels(task):
                for policy in self.policies:
                    check_name(policy)
                    for cr in self.crs:
                        model = self._model(policy, cr)
                        if model is None:
                            continue
                        cut = self.cut_for({"task": task, "policy": policy, "cr": cr, **level})
                        if cut is not None:
                            used.append(cut)
                            continue
                        for length in self.lengths:
                            for width in self.widths:
                                out.append({"task": task, "policy": policy, "cr": cr, "model": model, "L": length, "W": width,
                                            **self._sampling(width), **level})
        for cut in self.cuts:
            if not any(c is cut for c in used):
                raise KVShrinkError(f"sweep cut {cut}: it matches no point of the grid; check its task, difficulty, policy and cr")
        return out

    def cut_for(self, point: dict) -> dict | None:
        """The config's cut that leaves this point out of the grid, if any."""
        return next((c for c in self.cuts if all(point.get(k) == c[k] for k in CUT_KEYS if k in c)), None)

    def _sampling(self, width: int) -> dict:
        """What else decides a point's result: its problems and, for W > 1, how samples are drawn."""
        greedy = width == 1 and not self.nested
        return {"problems": self.problems, "seed": self.seed, "temperature": 0.0 if greedy else self.temperature,
                "top_p": 1.0 if greedy else self.top_p}

    def _levels(self, task: str) -> list[dict]:
        """A task's difficulties when the config sets them (absent otherwise, so earlier points keep their keys)."""
        if task not in self.difficulties:
            return [{}]
        levels = self.difficulties[task]
        return [{"difficulty": d} for d in (levels if isinstance(levels, list) else [levels])]

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
    """A finished point is reused only if everything that decides its result is the same, the model's weights included."""
    keys = ("task", "policy", "cr", "model", "weights", "L", "W", "problems", "seed", "temperature", "top_p")
    return json.dumps([p.get(k) for k in keys] + ([p["difficulty"]] if p.get("difficulty") is not None else []))


def run_sweep(cfg: SweepConfig, points_file: Path, progress: bool = True, device: str = "auto", dtype: str = "auto",
              policies: list[str] | None = None) -> list[dict]:
    """Run the missing points (grouped by model, loaded once each), or only those of `policies` (a staged sweep:
    the points that matter most first); return the results of every finished point of the grid, in its order."""
    points = cfg.points()
    ids = {name: weights_id(name) for name in dict.fromkeys(p["model"] for p in points)}
    grid = [{**p, "weights": ids[p["model"]]} for p in points]
    done = {point_key(row): row for row in read_jsonl(points_file)}
    todo = [p for p in grid if point_key(p) not in done and (policies is None or p["policy"] in policies)]
    bar = progress_bar(progress, "sweep", len(grid), len(grid) - len(todo))
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
    return [done[point_key(p)] for p in grid if point_key(p) in done]


def _run_of(p: dict) -> tuple:
    return p["task"], p.get("difficulty"), p["policy"], p["cr"], p["model"]


def _measure(model, tok, run: list[dict], cfg: SweepConfig) -> list[dict]:
    """Finished rows for the points of `run`: one evaluation, at its largest L and W (nested) or its one point."""
    p = run[0]
    length, width = max(q["L"] for q in run), max(q["W"] for q in run)
    nested = {"lengths": sorted({q["L"] for q in run}), "widths": sorted({q["W"] for q in run})} if cfg.nested else {}
    result = evaluate(model, tok, p["task"], p["policy"], cr=p["cr"] if p["policy"] in BUDGETED else None,
                      problems=p["problems"], seed=p["seed"], difficulty=p.get("difficulty"), width=width, max_new_tokens=length,
                      temperature=p["temperature"], top_p=p["top_p"], batch_size=max(1, cfg.batch_size // width), **nested)
    if not cfg.nested:
        return [{**p, **{k: result[k] for k in POINT_FIELDS}, "correct": [int(r["correct"]) for r in result["results"]],
                 "finished": time.time()}]
    grid = {(g["L"], g["W"]): g for g in result["grid"]}
    return [{**q, **grid[(q["L"], q["W"])], "cache_bytes": result["cache_bytes"], "seconds": result["seconds"],
             "run": f"L {length}, W {width}", "finished": time.time()} for q in run]


def write_report(rows: list[dict], out_md: Path, command: str, note: str = "", cuts: list[dict] = ()) -> list[Path]:
    """The tables and plots of `frontiers`, per task; returns the plots' paths. `note`: e.g. how much has run;
    `cuts`: the config's cuts, listed with their reasons."""
    seconds = sum({(*_run_of(r), r.get("run", id(r))): r["seconds"] for r in rows}.values())
    lines = ["# Hyper-scaling: accuracy against KV-cache reads and peak memory", "", f"Command: `{command}`{note}  ",
             f"Time: {seconds / 3600:.2f} h of evaluation (the sum over runs; each nested run measures all its (L, W)).", "",
             "Per-problem means: `kv_reads` over generated tokens (prompt reads separately), `peak_kv_tokens` = a problem's W "
             "samples' live tokens summed at their peak. A method's frontier: its best accuracy among the points costing at "
             "most that much. Differences are paired over the same problems, with 95% intervals (docs/conventions.md).", ""]
    if cuts:
        lines += ["Cut from the grid:", *(f"- {', '.join(f'{k} {c[k]}' for k in CUT_KEYS if k in c)}: {c['why']}" for c in cuts), ""]
    pngs = []
    for task, difficulty in dict.fromkeys((r["task"], r.get("difficulty")) for r in rows):
        mine = [r for r in rows if (r["task"], r.get("difficulty")) == (task, difficulty)]
        level = f" (difficulty {difficulty})" if difficulty is not None else ""
        lines += [f"## {task}{level}", "", "### Does spending more help vanilla?", "", *frontiers.precondition_table(mine), "",
                  "### Verdicts", "", *frontiers.verdicts(mine), ""]
        for cost in frontiers.COSTS:
            budgets = frontiers.budgets_for(mine, cost)
            if budgets:
                lines += [f"### Budget view: {frontiers.COSTS[cost]}", "", *frontiers.budget_view(mine, cost, budgets), ""]
        lines += ["### Every point", "", "| method | model | L | W | problems | accuracy (95%) | pass@W | kv_reads | peak_kv_tokens | achieved CR |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            low, high = wilson_interval(round(r["accuracy"] * r["problems"]), r["problems"])
            lines.append(f"| {frontiers.method(r)} | {r['model']} | {r['L']} | {r['W']} | {r['problems']} | {r['accuracy']:.2f} "
                         f"({low:.2f}-{high:.2f}) | {r['pass_at_w']:.2f} | {r['kv_reads']:,.0f} | {r['peak_kv_tokens']:,.0f} | "
                         f"{r['compression_ratio']:.2f} |")
        png = out_md.with_name(f"{out_md.stem}-{task}{'' if difficulty is None else f'-{difficulty}'}.png")
        frontiers.plot(mine, f"{task}{level}", png)
        pngs.append(png)
        lines += ["", f"![{task}]({png.name})", ""]
    out_md.write_text("\n".join(lines))
    return pngs
