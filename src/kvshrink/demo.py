"""`kvshrink demo`: the main job on the embedded default models.

1. Tasks: a fixed set of held-out problems (seed 0, default difficulty) on the task model and its DMS
   retrofits (`tiny`, `tiny-dms4`, `tiny-dms8`; until those ship, `smollm2` and `smollm2-dms4/8`, which
   were not tuned on the tasks: their accuracy says little, their cost columns are real):
   accuracy, achieved compression ratio, kv_reads, peak_kv_tokens, tokens/s.
2. Real text: `smollm2` vs `smollm2-dms8` continuing a held-out passage of the Python docs (compression
   ratio, cache bytes, tokens/s, agreement, the two continuations side by side).
Writes `demo-output/demo.png` (accuracy vs kv_reads per task) and `demo-output/demo.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import KVShrinkError

TASK_MODELS = ("tiny", "tiny-dms4", "tiny-dms8")
FALLBACK_MODELS = ("smollm2", "smollm2-dms4", "smollm2-dms8")
TEXT_MODELS = ("smollm2", "smollm2-dms8")


def default_models() -> tuple[str, ...]:
    from .zoo import adapter_names

    shipped = set(adapter_names())
    return TASK_MODELS if set(TASK_MODELS[1:]) <= shipped and "tiny" in shipped else FALLBACK_MODELS


def run_demo(models: list[str] | None = None, tasks: list[str] | None = None, problems: int = 8, quick: bool = False,
             text_models: list[str] | None = None, out_dir: Path = Path("demo-output"), device: str = "auto") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    from .compare import compare
    from .loading import load
    from .tasks import TASKS
    from .evaluation.evaluate import evaluate
    from .corpora import pydoc_split

    console = Console()
    models = list(models or default_models())
    tasks = list(tasks or (["vt"] if quick else list(TASKS)))  # vt: long enough for eviction to show
    problems = 2 if quick else problems
    if set(models) & set(FALLBACK_MODELS) and not set(models) & set(TASK_MODELS):
        console.print("[yellow]note: the task-tuned zoo (tiny, tiny-dms4, tiny-dms8) is not shipped in this checkout; "
                      "running the SmolLM2 models, which were not tuned on these tasks[/yellow]")
    rows = []
    for name in models:
        model, tok = load(name, device=device)
        for task in tasks:
            console.print(f"[bold]{name}[/bold] on {task} ({problems} held-out problems)")
            r = evaluate(model, tok, task, problems=problems, seed=0, progress=True)
            rows.append({"model": name, "task": task, **{k: v for k, v in r.items() if k != "results"},
                         "tokens_per_second": sum(len(tok(x["output"])["input_ids"]) for x in r["results"]) / r["seconds"]})
    table = Table(title="held-out problems (greedy, one sample each)")
    for col in ("model", "task", "accuracy", "compression ratio", "kv_reads / problem", "peak_kv_tokens / problem", "tokens/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["task"], f"{r['accuracy']:.2f}", f"{r['compression_ratio']:.2f}", f"{r['kv_reads']:,.0f}",
                      f"{r['peak_kv_tokens']:,.0f}", f"{r['tokens_per_second']:.1f}")
    console.print(table)

    text = None
    if text_models is None:
        text_models = [] if quick else list(TEXT_MODELS)
    if text_models:
        passage = out_dir / "passage.txt"
        out_dir.mkdir(parents=True, exist_ok=True)
        passage.write_text(pydoc_split()[1][:20_000])
        text = compare(text_models[0], text_models[1], passage, prompt_tokens=1024, max_new_tokens=48, device=device)
        t = Table(title=f"real text: a held-out passage of {text['prompt_tokens']} tokens; "
                        f"continuations agree on their first {text['agreement']} tokens")
        t.add_column("")
        for name in text["runs"]:
            t.add_column(name)
        for label, key, fmt in (("compression ratio", "compression_ratio", "{:.2f}"), ("cache bytes", "cache_bytes", "{:,}"),
                                ("decode tokens/s", "decode_tokens_per_second", "{:.1f}")):
            t.add_row(label, *(fmt.format(run["stats"][key]) for run in text["runs"].values()))
        t.add_row("continuation", *(run["text"] for run in text["runs"].values()))
        console.print(t)

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in tasks:
        pts = [r for r in rows if r["task"] == task]
        ax.plot([r["kv_reads"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=task)
        for r in pts:
            ax.annotate(r["model"], (r["kv_reads"], r["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KV reads per problem")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs KV-cache reads")
    ax.legend()
    fig.tight_layout()
    png = out_dir / "demo.png"
    fig.savefig(png, dpi=110)
    result = {"rows": rows, "text": text and {k: v for k, v in text.items() if k != "runs"} | {
        "runs": {n: {"text": r["text"], "stats": r["stats"]} for n, r in text["runs"].items()}}}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1))
    console.print(f"plot: {png}")
    if not rows:
        raise KVShrinkError("the demo ran no problems")
    return result
