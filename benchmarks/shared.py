"""What the long benchmarks share: models under policies named on the command line, an append-only
results file (so a run resumes where it stopped) and the 95% intervals every comparison reports."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import kvshrink
from kvshrink.attach import attach_dms, dms_config
from kvshrink.jsonl import append_jsonl, read_jsonl
from kvshrink.policies import CachePolicy, for_model


@dataclass
class Entry:
    """A model under a cache policy: `tiny`, `tiny-dms8` (its trained DMS policy), `tiny@tova:4` (NAME@POLICY:CR)
    or `tiny-dms4@sinks:4` (its DMS policy with the first 4 tokens never evicted)."""

    model: object
    policy: CachePolicy


def load_entries(names: list[str], device, always: tuple[str, ...] = (), dtype: str = "auto") -> tuple[dict[str, Entry], object]:
    """Entries for `always` + `names`, each distinct model loaded once; returns them and the tokenizer."""
    models, entries, tok = {}, {}, None
    for name in [*always, *names]:
        model_name, _, spec = name.partition("@")
        if model_name not in models:
            models[model_name], tok = kvshrink.load(model_name, device=device, dtype=dtype)
        model = models[model_name]
        policy_name, _, arg = spec.partition(":")
        if policy_name == "sinks":  # a copy of its own: dense forwards (perplexity, flag rates) read the model's settings
            model, _ = kvshrink.load(model_name, device=device, dtype=dtype)
            attach_dms(model, replace(dms_config(model), sinks=int(arg)))
            entries[name] = Entry(model, for_model(model))
        elif spec:
            entries[name] = Entry(model, for_model(model, policy_name, cr=float(arg) if arg else None))
        else:
            entries[name] = Entry(model, for_model(model))
    return entries, tok


class Records:
    """Append-only results file: one JSON object per finished item, keyed by (part, model, item)."""

    def __init__(self, path: Path):
        self.path, self.stamp = path, {}  # stamp: the run's settings, set once they are known (e.g. the dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_jsonl(path)
        self.done = {(r["part"], r["model"], r["item"]) for r in self.rows}

    def add(self, row: dict) -> None:
        """Append a finished item, stamped with the run's settings (e.g. its dtype) so mixed runs stay visible."""
        row = {**row, **self.stamp}
        self.rows.append(row)
        self.done.add((row["part"], row["model"], row["item"]))
        append_jsonl(self.path, row)

    def get(self, part: str) -> list[dict]:
        return [r for r in self.rows if r["part"] == part]


def dtype_stamp(model) -> dict:
    """{"dtype": ...}: the precision a model's weights ran in, as results rows record it (e.g. "float32")."""
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def paired_ci(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of b - a over paired trials (points) and its normal-approximation 95% half-width."""
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    return 100 * mean, 100 * 1.96 * math.sqrt(var / n)


def binomial_ci(k: int, n: int) -> float:
    """Normal-approximation 95% half-width of a proportion k/n, in points."""
    p = k / n
    return 100 * 1.96 * math.sqrt(p * (1 - p) / n)


def best_of(fn, repeats: int) -> float:
    """Shortest wall time of `repeats` calls of fn (run any warm-up before)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
