"""`kvshrink demo`: the main job on the embedded default models, in sections run one after another.

1. Tasks: held-out problems (seed 0, default difficulty) on the task model and its DMS retrofits (`tiny`,
   `tiny-dms4`, `tiny-dms8`): accuracy with n and its 95% interval, achieved compression ratio, kv_reads,
   peak_kv_tokens, tokens/s. A demo runs few problems (8 per task): its intervals are wide, and the n = 200
   paired table is `docs/results/zoo.md`.
2. Hyper-scaling at one memory budget: `vt` (a ~770-token prompt, a ~56-token chain), each model sampled at
   every L and W (T = 0.7, one run read off at each). The budget is the peak KV memory vanilla needs for its
   prompt and 32 tokens of chain, too little to finish one: each model's best accuracy within it is shown with
   the (L, W) that reached it (`demo-output/budget.png`). A second line gives both at the memory of vanilla's
   full chain, where vanilla leads in the n = 100 sweep: the shipped adapters lose accuracy there
   (docs/results/hyperscaling-analysis.md).
   The n = 100 sweep behind it is `docs/results/hyperscaling.md`.
3. Real text: `smollm2` vs `smollm2-dms8` continuing a held-out passage of the Python docs (compression
   ratio, cache bytes, tokens/s, agreement, the two continuations side by side).

Writes `demo-output/demo.png` (accuracy vs KV reads, per task) and `demo-output/demo.json` (one key per section).
A section is one function `(Demo) -> dict | None` in SECTIONS: it prints its tables and returns its part of
demo.json (None: nothing to report); a new section is one more function there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KVShrinkError

TASK_MODELS = ("tiny", "tiny-dms4", "tiny-dms8")
TEXT_MODELS = ("smollm2", "smollm2-dms8")
FULL_TABLE = "docs/results/zoo.md"
BUDGET_MODELS = ("tiny", "tiny-dms8")
BUDGET_TASK, BUDGET_AT = "vt", (32, 1)  # the budget: vanilla's peak memory at this (L, W)
BUDGET_LENGTHS, BUDGET_WIDTHS = [32, 64, 96], [1, 2, 4]  # vanilla's vt accuracy stops rising by L 96 (n = 100 sweep)
SWEEP_PAGE = "docs/results/hyperscaling.md"
# measured: `kvshrink demo` took 6 min 0 s to 7 min 6 s on 2 CPU cores, `--quick` 1 min 29 s (the vt budget section is the largest part)
RUN_TIME = "about 6 to 7 minutes on 2 CPU cores (--quick: under 2)"


@dataclass
class Demo:
    """What every section reads: the options, where to write, the console; `results` holds the sections' parts."""

    models: list[str]
    tasks: list[str]
    problems: int
    quick: bool
    text_models: list[str]
    out_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    console: object = None
    results: dict = field(default_factory=dict)


def run_demo(models: list[str] | None = None, tasks: list[str] | None = None, problems: int = 8, quick: bool = False,
             text_models: list[str] | None = None, out_dir: Path = Path("demo-output"), device: str = "auto",
             dtype: str = "auto") -> dict:
    from rich.console import Console

    from .tasks import TASKS

    demo = Demo(models=list(models or TASK_MODELS), tasks=list(tasks or (["vt"] if quick else list(TASKS))),  # vt: long enough to evict
                problems=2 if quick else problems, quick=quick,
                text_models=list(text_models if text_models is not None else [] if quick else TEXT_MODELS),
                out_dir=out_dir, device=device, dtype=dtype, console=Console())
    if demo.problems < 1:
        raise KVShrinkError(f"--problems must be >= 1 (got {demo.problems})")
    demo.out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    demo.console.print(f"kvshrink demo: {RUN_TIME}; results in {demo.out_dir}/")
    for section in SECTIONS:
        part = section(demo)
        if part is not None:
            demo.results[section.__name__] = part
    seconds = time.perf_counter() - began
    demo.results["seconds"] = seconds
    (demo.out_dir / "demo.json").write_text(json.dumps(demo.results, indent=1))
    demo.console.print(f"demo.json and demo.png in {demo.out_dir}/; the demo took {seconds // 60:.0f} min {seconds % 60:.0f} s")
    return demo.results


def task_accuracy(demo: Demo) -> dict:
    """Each model on each task's held-out problems: accuracy with n and its 95% interval, and the KV cost."""
    from rich.table import Table

    from .evaluation.evaluate import evaluate
    from .loading import load

    rows = []
    for name in demo.models:
        model, tok = load(name, device=demo.device, dtype=demo.dtype)
        for task in demo.tasks:
            demo.console.print(f"[bold]{name}[/bold] on {task} ({demo.problems} held-out problems)")
            r = evaluate(model, tok, task, problems=demo.problems, seed=0, progress=True)
            rows.append({"model": name, "task": task, **{k: v for k, v in r.items() if k != "results"},
                         "correct": sum(x["correct"] for x in r["results"]),
                         "tokens_per_second": sum(len(tok(x["output"])["input_ids"]) for x in r["results"]) / r["seconds"]})
    if not rows:
        raise KVShrinkError("the demo ran no problems")
    table = Table(title="held-out problems (greedy, one sample each)",
                  caption=f"accuracy: k of n right [95% interval]; KV reads and peak KV tokens per problem; CR: compression ratio. "
                          f"n = {demo.problems} per task cannot rank the models: the n = 200 paired table is {FULL_TABLE}")
    for col in ("model", "task", "accuracy", "CR", "KV reads", "peak KV", "tok/s"):
        table.add_column(col)
    for r in rows:
        low, high = r["accuracy_interval"]
        table.add_row(r["model"], r["task"], f"{r['correct']}/{r['problems']} [{low:.2f}, {high:.2f}]", f"{r['compression_ratio']:.2f}",
                      f"{r['kv_reads']:,.0f}", f"{r['peak_kv_tokens']:,.0f}", f"{r['tokens_per_second']:.1f}")
    demo.console.print(table)
    png = plot_tasks(rows, demo.out_dir / "demo.png")
    demo.console.print(f"plot: {png}")
    return {"problems": demo.problems, "full_table": FULL_TABLE, "rows": rows}


def plot_tasks(rows: list[dict], png: Path) -> Path:
    """Accuracy (with its interval) against KV reads, one panel per task: models told apart by marker and
    colour in one legend, no text on the points (nothing to overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = "osD^vP*X"
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks) + 1.8, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, name in enumerate(models):
            for r in (r for r in rows if r["task"] == task and r["model"] == name):
                low, high = r["accuracy_interval"]
                ax.errorbar(r["kv_reads"], 100 * r["accuracy"], yerr=[[100 * (r["accuracy"] - low)], [100 * (high - r["accuracy"])]],
                            fmt=markers[i % len(markers)], color=f"C{i}", capsize=3, label=name)
        n = next(r["problems"] for r in rows if r["task"] == task)
        ax.set_title(f"{task} (n = {n} per model)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # few, short labels: 5k 10k 20k
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-5, 105)
        ax.set_xlabel("KV reads per problem (tokens, log scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (% of problems, 95% interval)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="model")
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))  # room for the legend
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def memory_budget(demo: Demo) -> dict:
    """Vanilla's best within one peak-memory budget against DMS-8's best within it: what the saved memory buys."""
    from rich.table import Table

    from .evaluation.evaluate import evaluate, wilson_interval
    from .evaluation.frontiers import best_within
    from .loading import load

    problems = demo.problems
    grids = {}
    for name in BUDGET_MODELS:
        model, tok = load(name, device=demo.device, dtype=demo.dtype)
        demo.console.print(f"[bold]{name}[/bold] on {BUDGET_TASK} ({problems} problems, L up to {BUDGET_LENGTHS[-1]}, "
                           f"W up to {BUDGET_WIDTHS[-1]})")
        r = evaluate(model, tok, BUDGET_TASK, problems=problems, seed=0, width=BUDGET_WIDTHS[-1],
                     max_new_tokens=BUDGET_LENGTHS[-1], temperature=0.7, top_p=0.95, batch_size=4 * BUDGET_WIDTHS[-1],
                     lengths=BUDGET_LENGTHS, widths=BUDGET_WIDTHS, progress=True)
        grids[name] = r["grid"]
    vanilla = grids[BUDGET_MODELS[0]]
    budget = next(g["peak_kv_tokens"] for g in vanilla if (g["L"], g["W"]) == BUDGET_AT)
    best = {name: best_within(grid, "peak_kv_tokens", budget) for name, grid in grids.items()}
    table = Table(title=f"{BUDGET_TASK}: the best each model reaches within {budget:,.0f} peak KV tokens per problem "
                        f"(vanilla's prompt and {BUDGET_AT[0]} tokens of chain)",
                  caption=f"n = {problems}; the n = 100 sweep is {SWEEP_PAGE}")
    for col in ("model", "accuracy [95%]", "chain length L", "votes W", "peak KV tokens"):
        table.add_column(col)
    rows = []
    for name, p in best.items():
        low, high = wilson_interval(sum(p["correct"]), p["problems"])
        table.add_row(name, f"{sum(p['correct'])}/{p['problems']} [{low:.2f}, {high:.2f}]", str(p["L"]), str(p["W"]),
                      f"{p['peak_kv_tokens']:,.0f}")
        rows.append({"model": name, **{k: p[k] for k in ("L", "W", "accuracy", "peak_kv_tokens", "kv_reads")}, "interval": [low, high]})
    demo.console.print(table)
    full = next(g for g in vanilla if (g["L"], g["W"]) == (BUDGET_LENGTHS[-1], 1))  # one vanilla chain, finished
    at_full = {name: best_within(grid, "peak_kv_tokens", full["peak_kv_tokens"]) for name, grid in grids.items()}
    demo.console.print(f"with the memory of vanilla's full chain ({full['peak_kv_tokens']:,.0f} peak KV tokens): "
                       + ", ".join(f"{name} {p['accuracy']:.2f} (L {p['L']}, W {p['W']})" for name, p in at_full.items()))
    png = plot_budget(rows, budget, demo.out_dir / "budget.png")
    demo.console.print(f"plot: {png}")
    return {"task": BUDGET_TASK, "problems": problems, "budget_peak_kv_tokens": budget, "rows": rows,
            "at_full_chain": {"peak_kv_tokens": full["peak_kv_tokens"],
                              "best": {name: {k: p[k] for k in ("accuracy", "L", "W", "peak_kv_tokens")}
                                       for name, p in at_full.items()}},
            "full_sweep": SWEEP_PAGE}


def plot_budget(rows: list[dict], budget: float, png: Path) -> Path:
    """One bar per model: its best accuracy within the budget, labelled with the (L, W) that reached it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = range(len(rows))
    ax.bar(x, [100 * r["accuracy"] for r in rows], color=[f"C{i}" for i in x],
           yerr=[[100 * (r["accuracy"] - r["interval"][0]) for r in rows], [100 * (r["interval"][1] - r["accuracy"]) for r in rows]],
           capsize=4)
    ax.set_xticks(list(x), [f"{r['model']}\nL = {r['L']}, W = {r['W']}" for r in rows])
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (% of problems, 95% interval)")
    ax.set_title(f"same memory: at most {budget:,.0f} peak KV tokens per problem\n"
                 f"(vanilla's prompt and {BUDGET_AT[0]} tokens of chain)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def real_text(demo: Demo) -> dict | None:
    """Vanilla vs DMS continuing one held-out passage: cache size and speed, and where the continuations part."""
    if not demo.text_models:
        return None
    from rich.table import Table

    from .compare import compare
    from .corpora import pydoc_split

    passage = demo.out_dir / "passage.txt"
    passage.write_text(pydoc_split()[1][:20_000])
    result = compare(demo.text_models[0], demo.text_models[1], passage, prompt_tokens=1024, max_new_tokens=48,
                     device=demo.device, dtype=demo.dtype)
    t = Table(title=f"real text: a held-out passage of {result['prompt_tokens']} tokens; "
                    f"continuations agree on their first {result['agreement']} tokens")
    t.add_column("")
    for name in result["runs"]:
        t.add_column(name)
    for label, key, fmt in (("compression ratio", "compression_ratio", "{:.2f}"), ("cache bytes", "cache_bytes", "{:,}"),
                            ("decode tokens/s", "decode_tokens_per_second", "{:.1f}")):
        t.add_row(label, *(fmt.format(run["stats"][key]) for run in result["runs"].values()))
    t.add_row("continuation", *(run["text"] for run in result["runs"].values()))
    demo.console.print(t)
    return {k: v for k, v in result.items() if k != "runs"} | {
        "runs": {n: {"text": r["text"], "stats": r["stats"]} for n, r in result["runs"].items()}}


SECTIONS = (task_accuracy, memory_budget, real_text)
