"""Load test of `kvshrink serve`: the same KV budget, vanilla vs DMS (127.0.0.1 only, bounded).

    python benchmarks/serve_load.py --pairs smollm2:smollm2-dms8 tiny:tiny-dms8 --contexts 2048 4096 \
        --kv-budget-mb 256 --requests 12 --max-tokens 512 1536

For each model, context and `--max-tokens` value: a server on a free loopback port with `--kv-budget-mb`;
`--requests` streaming clients start together, each with its own held-out prompt and `max_tokens` greedy
tokens, so that prompt + generated = `context` tokens (a small `max_tokens` is a prompt-heavy load, a large
one the long-generation load that hyper-scaling is about). `--text pydoc` sends passages of Python
documentation as completions (the text `smollm2-dms*` was retrofitted on); `--text tasks` sends held-out
`vt`/`niah` problems as chat requests, each at the largest difficulty that fits in context - `max_tokens`
(the text the zoo's `tiny-dms*` were retrofitted on). Measured: the most
and the mean number of sequences decoded together (polled from /metrics), aggregate generated tokens/s
over the run and the best 10-second rate the server reported (decode with the batch at its fullest,
prefill aside), time to first token and
inter-token latency (p50, p99) seen by the clients. Clients ask for `ignore_eos`, so every request
generates `max_tokens` and both models do the same work. Finished points are kept in serving.points.jsonl
with the command that made them, so an interrupted run resumes (delete a point to measure it again);
docs/results/serving.md and serving.png show every finished point.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import kvshrink  # noqa: E402
from kvshrink.prompts import chat_prompt  # noqa: E402
from kvshrink.serve import build_engine  # noqa: E402
from kvshrink.tasks import TASKS, make_problems  # noqa: E402
from kvshrink.corpora import pydoc_split  # noqa: E402
from kvshrink.serve.app import free_port, read_metrics, run_in_thread  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def client(url: str, prompt: str | list[dict], max_tokens: int) -> dict:
    """One streaming request: a completion for a text prompt, a chat completion for a list of messages."""
    chat = isinstance(prompt, list)
    body = json.dumps({"messages" if chat else "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    start_t = time.perf_counter()
    stamps = []
    endpoint = "chat/completions" if chat else "completions"
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/{endpoint}", data=body,
                                                       headers={"Content-Type": "application/json"}), timeout=3600) as r:
        for line in r:  # one chunk per generated token; a chat stream's first chunk (the role) and the usage chunk are not
            if line.startswith(b"data: {") and b'"finish_reason"' in line and b'"role"' not in line:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start_t if stamps else float("nan"), "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": len(stamps)}


def task_prompts(tok, n: int, tokens: int) -> list[list[dict]]:
    """Held-out `vt` and `niah` problems, alternating, each at the largest difficulty whose chat prompt fits
    in `tokens`: the load of the zoo's task models, on text of the kind their DMS adapters were trained on."""
    def length(task: str, i: int, d: int) -> int:
        return len(chat_prompt(tok, make_problems(task, 1, difficulty=d, first=i)[0].prompt))

    prompts = []
    for i in range(n):
        task = ("vt", "niah")[i % 2]
        lo, hi = 1, TASKS[task].MAX_DIFFICULTY  # prompt length grows with difficulty
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(task, i, mid) <= tokens else (lo, mid - 1)
        prompts.append([{"role": "user", "content": make_problems(task, 1, difficulty=lo, first=i)[0].prompt}])
    return prompts


STORES = {"default": None, "paged": True, "contiguous": False}  # --store: the server's --paged / --no-paged


@contextlib.contextmanager
def serving(name: str, model, tok, args):
    """The server under test, at a loopback URL: by default in its own process (`kvshrink serve`, as deployed,
    so the clients' threads do not compete with the engine for this interpreter's lock), or with
    `--in-process` in a thread of this one (how the earlier points were measured)."""
    if args.in_process:
        server, thread, url = run_in_thread(build_engine(model, tok, budget_mb=args.kv_budget_mb, max_batch=args.requests,
                                                         paged=STORES[args.store]), name)
        try:
            yield url
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        return
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvshrink", "serve", name, "--port", str(port), "--kv-budget-mb",
                             str(args.kv_budget_mb), "--max-batch", str(args.requests),
                             *({"paged": ["--paged"], "contiguous": ["--no-paged"]}.get(args.store, []))], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"kvshrink serve {name} exited with code {proc.returncode}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_point(name: str, context: int, max_tokens: int, args, passages: list[str]) -> dict:
    model, tok = kvshrink.load(name)  # the tokenizer for the prompts, and the model when the server runs in-process
    with serving(name, model, tok, args) as url:
        return measure(url, tok, context, max_tokens, args, passages) | point_key(name, context, max_tokens, args)


def measure(url: str, tok, context: int, max_tokens: int, args, passages: list[str]) -> dict:
    running, rates, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            m = read_metrics(url)
            running.append(m["kvshrink_running_sequences"])
            rates.append(m["kvshrink_generated_tokens_per_second"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if args.text == "tasks":
        prompts = task_prompts(tok, args.requests, context - max_tokens)
        prompt_tokens = [len(chat_prompt(tok, p)) for p in prompts]
    else:
        prompts = [tok.decode(tok(p)["input_ids"][:context - max_tokens]) for p in passages[:args.requests]]
        prompt_tokens = [len(tok(p)["input_ids"]) for p in prompts]
    began = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(lambda p: client(url, p, max_tokens), prompts))
    wall = time.perf_counter() - began
    stop.set()
    watcher.join()
    final = read_metrics(url)
    busy = [r for r in running if r > 0]
    itl = [x for r in results for x in r["itl"]]
    return {"budget_tokens": int(final["kvshrink_budget_kv_tokens"]), "max_concurrent": max(running),
            "mean_concurrent": statistics.mean(busy) if busy else 0.0, "mean_prompt_tokens": statistics.mean(prompt_tokens),
            "tokens_per_second": sum(r["tokens"] for r in results) / wall,
            "peak_tokens_per_second": max(rates),
            "ttft_p50": percentile([r["ttft"] for r in results], 0.5), "ttft_p99": percentile([r["ttft"] for r in results], 0.99),
            "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99), "wall_s": wall,
            "compression_ratio": final["kvshrink_compression_ratio"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["smollm2:smollm2-dms8"], help="VANILLA:DMS model pairs")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--kv-budget-mb", type=float, default=256)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[512], help="generated tokens per request (one load each)")
    parser.add_argument("--text", choices=["pydoc", "tasks"], default="pydoc",
                        help="prompts: held-out Python documentation, or held-out vt/niah problems as chat requests")
    parser.add_argument("--in-process", action="store_true",
                        help="run the server in a thread of the load test's process (how the earlier points were measured)")
    parser.add_argument("--store", choices=list(STORES), default="default",
                        help="the caches' key/value layout: the server's default (paged for an evicting policy), or forced")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "serving.md")
    args = parser.parse_args()
    held = pydoc_split()[1]
    stride = (len(held) - 40_000) // args.requests
    passages = [held[i * stride:i * stride + 40_000] for i in range(args.requests)]  # distinct held-out passages
    done_file = args.out.with_suffix(".points.jsonl")
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    for row in done:
        row.setdefault("text", "pydoc")  # points measured before --text existed
        row.setdefault("server", "thread")  # and before the server ran in its own process
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    for pair, max_tokens, context in itertools.product(args.pairs, args.max_tokens, args.contexts):
        for name in pair.split(":"):
            key = point_key(name, context, max_tokens, args)
            row = next((r for r in done if {k: r.get(k) for k in key} == key), None)
            if row is None:
                row = {**run_point(name, context, max_tokens, args, passages), "pair": pair, "command": command}
                done.append(row)
                with done_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    write_report(done, args.out)


def point_key(name: str, context: int, max_tokens: int, args) -> dict:
    return {"model": name, "context": context, "kv_budget_mb": args.kv_budget_mb, "requests": args.requests,
            "max_tokens": max_tokens, "text": args.text, "server": "thread" if args.in_process else "process",
            **({"store": args.store} if args.store != "default" else {})}


def write_report(rows: list[dict], out: Path) -> None:
    """Every finished point (all loads measured so far), then DMS / vanilla per pair and load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{**r, "server": r["server"] + (f", {r['store']}" if r.get("store") else "")} for r in rows]  # a forced layout is named
    load = lambda r: (r["context"], r["max_tokens"], r["requests"], r["kv_budget_mb"], r["text"], r["server"])  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["pair"], load(r), r["pair"].split(":").index(r["model"])))
    lines = ["# Serving under one KV budget: vanilla vs DMS", "", "Commands (127.0.0.1, no other job running):", "",
             *[f"    {c}" for c in dict.fromkeys(r["command"] for r in rows)], "",
             "Each load: `clients` streaming clients start together, each with its own held-out prompt of at most context - "
             "new tokens (`pydoc`: held-out Python documentation, as a completion; `tasks`: a held-out `vt` or `niah` problem at the "
             "largest difficulty that fits, as a chat request), asking for `max_tokens` = new tokens (greedy, `ignore_eos`); "
             "the budget counts live keys and values. Server: `process` = `kvshrink serve` in its own process; `thread` = "
             "in a thread of the load test's process, beside its client threads (`--in-process`; the commands of points "
             "measured before that option existed reproduce them with it).", "",
             "| model | server | prompts | context | prompt tokens (mean) | new tokens | clients | budget (KV tokens) | max concurrent | "
             "mean concurrent | tokens/s (whole run) | "
             "best 10 s tokens/s | TTFT p50 / p99 s | ITL p50 / p99 s | achieved CR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cr = f"{r['compression_ratio']:.2f}" if "compression_ratio" in r else "n/a"
        prompt = f"{r['mean_prompt_tokens']:,.0f}" if "mean_prompt_tokens" in r else "-"
        lines.append(f"| {r['model']} | {r['server']} | {r['text']} | {r['context']} | {prompt} | {r['max_tokens']} | {r['requests']} | "
                     f"{r['budget_tokens']:,} | "
                     f"{r['max_concurrent']:.0f} | {r['mean_concurrent']:.1f} | {r['tokens_per_second']:.1f} | "
                     f"{r['peak_tokens_per_second']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                     f"{r['itl_p50']:.3f} / {r['itl_p99']:.3f} | {cr} |")
    lines += ["", "| pair | server | prompts | context | new tokens | clients | concurrent sequences (DMS / vanilla) | "
              "tokens/s, whole run (DMS / vanilla) |", "|---|---|---|---|---|---|---|---|"]
    for (pair, key), group in itertools.groupby(rows, key=lambda r: (r["pair"], load(r))):
        by_model = {r["model"]: r for r in group}
        v, d = (by_model.get(m) for m in pair.split(":")) if ":" in pair else (None, None)  # a lone model: no pair
        if v and d:
            lines.append(f"| {d['model']} / {v['model']} | {key[5]} | {key[4]} | {key[0]} | {key[1]} | {key[2]} | "
                         f"{d['max_concurrent'] / v['max_concurrent']:.1f}x | {d['tokens_per_second'] / v['tokens_per_second']:.2f}x |")
    forced = [r for r in rows if r.get("store") == "contiguous"]
    if forced:
        lines += ["", "The same model and load on its default store (paged, for an evicting policy) and forced contiguous:", "",
                  "| model | prompts | context | new tokens | clients | max concurrent (default / contiguous) | "
                  "tokens/s, whole run (default / contiguous) |", "|---|---|---|---|---|---|---|"]
        for c in forced:
            same = [r for r in rows if not r.get("store") and r["model"] == c["model"]
                    and load(r)[:5] == load(c)[:5] and r["server"] == c["server"].split(",")[0]]
            for r in same:
                lines.append(f"| {r['model']} | {r['text']} | {r['context']} | {r['max_tokens']} | {r['requests']} | "
                             f"{r['max_concurrent']:.0f} / {c['max_concurrent']:.0f} | "
                             f"{r['tokens_per_second']:.1f} / {c['tokens_per_second']:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("max_concurrent", "tokens_per_second"), ("sequences decoded together", "aggregate tokens/s")):
        for model, new, text, where in dict.fromkeys((r["model"], r["max_tokens"], r["text"], r["server"]) for r in rows):
            pts = [r for r in rows if (r["model"], r["max_tokens"], r["text"], r["server"]) == (model, new, text, where)]
            ax.plot([r["context"] for r in pts], [r[key] for r in pts], marker="o",
                    label=f"{model}, {text}, {new} new tokens, {where}")
        ax.set_xlabel("context tokens")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    out.write_text("\n".join(lines + ["", f"![serving]({png.name})", ""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
