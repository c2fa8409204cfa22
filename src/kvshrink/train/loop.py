"""What the retrofit and the LoRA fine-tune share: settings that are also command-line options, and the
training loop (nanoGPT's shape: set the step's learning rate, take one optimizer step, log it, checkpoint).

What differs stays with each trainer and comes in as a function: the step itself, the learning-rate
schedule, how a checkpoint is gathered (a retrofit's is collective over processes), the status line, and
anything due after a step (a retrofit's models taken mid-ramp).
"""

from __future__ import annotations

import time
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import KVShrinkError
from ..jsonl import append_jsonl, keep_jsonl
from ..progress import advance, progress_bar, stop


def setting(default=MISSING, help: str = "", metavar: str | None = None):
    """A config field that is also a command-line option: `help` is its --help text and `metavar` the name of
    its value there (the CLI builds the option from the field)."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


DTYPE_HELP = "auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 (autocast, fp32 master weights: ~1.5x faster " \
             "on CPUs with AVX512-BF16 or AMX, far slower on others: warned)"


def check_training_dtype(dtype: str) -> None:
    """Training computes in fp32 or bf16 autocast over fp32 master weights; float16 would need loss scaling."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise KVShrinkError(f"--dtype must be auto, float32 or bfloat16 for training (got {dtype!r})")


def recorded_dtype(settings: dict) -> str:
    """A run's --dtype as its settings file records it; files from before --dtype hold `bf16` (true: bfloat16)."""
    return settings.get("dtype") or ("bfloat16" if settings.get("bf16") else "auto")


def bf16_autocast(dtype: str, device) -> bool:
    """Whether a run computes in bf16 autocast: --dtype bfloat16 (warned on CPUs without native bf16), or auto on CUDA."""
    import torch

    from ..loading import resolve_dtype

    return resolve_dtype(dtype, torch.device(device)) == torch.bfloat16


@dataclass
class Loop:
    """Where a run logs, and when it saves and stops."""

    name: str  # "retrofit" | "finetune": the progress bar's label
    out: Path
    steps: int
    save_every: int
    max_minutes: float | None = None  # wall-clock ceiling: checkpoint and stop
    stop_at: int | None = None  # checkpoint and stop after this step
    main: bool = True  # this process logs (the others of a launch only compute)
    progress: bool = True


def train_loop(loop: Loop, start: int, optimizer, learning_rate: Callable[[int], float], train_step: Callable[[int], dict],
               save: Callable[[int], None], status: Callable[[dict], str], after_step: Callable[[dict], str | None] = lambda row: None) -> dict:
    """Steps `start` .. loop.steps - 1. Each step's metrics (train_step's, with step, lr, seconds and
    tokens_per_second; train_step reports the real tokens it read as `tokens`) go to OUT/metrics.jsonl, cut
    back to `start` first so that a resumed run logs as one. A checkpoint is saved every save_every steps,
    at the end, and on a stop: the time limit, --stop-at, or a reason after_step gives. Returns the last
    step's metrics ({} when no step ran)."""
    metrics = loop.out / "metrics.jsonl"
    if loop.main and metrics.exists():  # drop lines past the checkpoint we resume from
        keep_jsonl(metrics, lambda row: row["step"] <= start)
    began, last = time.perf_counter(), {}
    bar = progress_bar(loop.main and loop.progress, loop.name, loop.steps, start)
    for step in range(start, loop.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        row = train_step(step)
        seconds = time.perf_counter() - t0
        last = {"step": step + 1, **row, "lr": lr, "seconds": seconds, "tokens_per_second": row["tokens"] / seconds}
        if loop.main:
            append_jsonl(metrics, last)
            advance(bar, info=status(last))
        why = after_step(last) or _time_to_stop(loop, step + 1, began)
        done = step + 1 == loop.steps
        if done or why or (step + 1) % loop.save_every == 0:
            save(step + 1)
        if why and not done:
            if loop.main:
                print(f"stopped after step {step + 1} ({why}); continue with --resume")
            break
    stop(bar)
    return last


def _time_to_stop(loop: Loop, steps_done: int, began: float) -> str | None:
    if loop.max_minutes is not None and (time.perf_counter() - began) / 60 > loop.max_minutes:
        return "--max-minutes"
    if loop.stop_at is not None and steps_done >= loop.stop_at:
        return "--stop-at"
    return None
