"""benchmarks/gpu_decode.sh's sweep (decode.py at real shapes) rehearsed in miniature on the CPU, so that no GPU
minute goes to a bug: every path runs and lands in the tables; a spent budget skips the rest with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--smoke", "--threads", "1", "--compile-backend", "eager",
           "--models", "llama-1b", "--contexts", "96", "--batches", "2", "--steps", "2", "--blocks", "1", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in (out / "decode.jsonl").read_text().splitlines()]


def test_the_smoke_sweep_runs_every_path(tmp_path):
    rows = sweep(tmp_path)
    assert [r["path"] for r in rows] == ["hf-dynamic", "dense", "dms-forced", "dms-trained", "hf-static"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    by_path = {r["path"]: r for r in rows}
    assert by_path["dms-forced"]["allocated"] < by_path["dense"]["allocated"]  # memory follows the live tokens
    table = (tmp_path / "decode.md").read_text()
    assert "| llama-1b | 96 | 2 | dms-forced | ok |" in table


def test_a_spent_budget_skips_with_a_note(tmp_path):
    rows = sweep(tmp_path, "--budget", "0")
    assert {r["status"] for r in rows} == {"skipped"} and all("time guard" in r["note"] for r in rows)
