"""One rich progress bar for every long loop (training, evaluation): label, bar, count, ETA, a status line."""

from __future__ import annotations


def progress_bar(enabled: bool, label: str, total: int, done: int = 0):
    """A started bar, or None when disabled (then `advance` and `stop` do nothing)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))
    bar.start()
    bar.task = bar.add_task(label, total=total, completed=done, info="")
    return bar


def advance(bar, n: int = 1, info: str = "") -> None:
    if bar is not None:
        bar.update(bar.task, advance=n, info=info)


def stop(bar) -> None:
    if bar is not None:
        bar.stop()
