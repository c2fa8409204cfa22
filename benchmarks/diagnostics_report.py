"""What each shipped DMS model learned (`kvshrink inspect`), into docs/results/diagnostics.md (the model cards take
the same records: `python benchmarks/cards.py`).

    python benchmarks/diagnostics_report.py [--run]     # --run: make the records first (~1 min per record on 2 cores)

Records: docs/results/diagnostics/<model>.json (held-out Python docs, 3 x 2,048 tokens) for the SmolLM2 models and
<model>-<task>.json (6 held-out prompts per task, with the facts-vs-filler figures) for the task models; each is
the output of the command in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from kvshrink.dms.diagnostics import summary_rows  # noqa: E402

RECORDS = ROOT / "docs" / "results" / "diagnostics"
TASKS = ("vt", "niah", "arith", "hops")
COMMANDS = {**{m: ["inspect", m, "--json"] for m in ("smollm2-dms4", "smollm2-dms8")},
            **{f"{m}-{t}": ["inspect", m, "--tasks", t, "--problems", "6", "--json"] for m in ("tiny-dms4", "tiny-dms8") for t in TASKS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the inspect commands whose records are missing")
    args = parser.parse_args()
    RECORDS.mkdir(parents=True, exist_ok=True)
    for name, cmd in COMMANDS.items():
        if args.run and not (RECORDS / f"{name}.json").is_file():
            out = subprocess.run([sys.executable, "-m", "kvshrink", *cmd], capture_output=True, text=True, check=True).stdout
            (RECORDS / f"{name}.json").write_text(out)
    figures = {name: json.loads((RECORDS / f"{name}.json").read_text()) for name in COMMANDS if (RECORDS / f"{name}.json").is_file()}
    lines = ["# What the shipped DMS models learned", "", "Made by `python benchmarks/diagnostics_report.py --run`: each record is "
             "the JSON of `kvshrink <command>` below; definitions in `src/kvshrink/dms/diagnostics.py`.", ""]
    for name, fig in figures.items():
        lines += [f"## `kvshrink {' '.join(COMMANDS[name])}`", "", "| figure | value |", "|---|---|",
                  *[f"| {k.replace('|', chr(92) + '|')} | {v} |" for k, v in summary_rows(fig)], ""]
    (ROOT / "docs" / "results" / "diagnostics.md").write_text("\n".join(lines))
    print("wrote docs/results/diagnostics.md")


if __name__ == "__main__":
    main()
