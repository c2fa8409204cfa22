"""JSON-lines files that long runs append to, one finished item per line, and that survive a kill:
reading keeps the complete lines and cuts a half-written last line off the file, so appends go on cleanly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_jsonl(path: Path) -> list[dict]:
    """The complete rows of `path` ([] if missing); a torn tail is removed from the file."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    rows, good = [], 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(text):
        path.write_text(text[:good])
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def keep_jsonl(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite `path` with only the rows `keep` accepts (e.g. metrics up to the step a run resumes from)."""
    rows = [row for row in read_jsonl(path) if keep(row)]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows
