"""Which prompt tokens does a DMS model keep? Facts against everything else, per task.

    python benchmarks/dms_keep_rates.py --models tiny-dms4 tiny-dms8 [--problems 20] [--out docs/results/dms-keep-rates.md]

Each held-out prompt (chat template included) goes through the model once, teacher-forced; a token's keep
rate is 1 - its eviction decision, averaged over layers and KV heads. Facts are the sentences a task's
answer depends on (the assignments of `vt`, the links of `hops`, the key-value sentences of `niah`, the
problem statement of `arith`); everything else is filler, instructions and the chat template. A retrofit
that learned what matters keeps facts far more often than the rest: at CR 4 `vt`'s facts are ~12% of its
tokens, so keeping all of them fits the budget. Equal rates mean the eviction is blind to content.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import kvshrink  # noqa: E402
from kvshrink.dms import TrainSignals  # noqa: E402
from kvshrink.prompts import chat_prompt  # noqa: E402
from kvshrink.tasks import make_problems  # noqa: E402

FACTS = {
    "vt": r"VAR [A-Z]+ = [A-Z0-9]+\.",
    "hops": r"box \d+ points to box \d+\.",
    "niah": r"The special magic number for [a-z-]+ is \d+\.",
    "arith": r"Start with .*?step\.",
}


@torch.no_grad()
def keep_rates(model, tok, task: str, problems: int) -> tuple[float, float, float]:
    """(facts' keep rate, the rest's, facts' share of the tokens) over `problems` held-out prompts."""
    kept, count = torch.zeros(2), torch.zeros(2)
    for problem in make_problems(task, problems):
        ids = chat_prompt(tok, problem.prompt)
        flags = []
        model(torch.tensor([ids], device=next(model.parameters()).device), use_cache=False, dms_signals=TrainSignals(collect=flags))
        keep = 1 - torch.stack([f["flags"].float() for f in flags]).mean(dim=(0, 1, 2)).cpu()  # (T,)
        pieces = [tok.decode([i]) for i in ids]  # byte-level BPE on ASCII text: the pieces spell the prompt
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0)
        starts = ends - torch.tensor([len(p) for p in pieces])
        fact = torch.zeros(len(ids), dtype=torch.bool)
        for m in re.finditer(FACTS[task], "".join(pieces)):
            fact |= (starts < m.end()) & (ends > m.start())
        for cls, mask in ((0, fact), (1, ~fact)):
            kept[cls] += keep[mask].sum()
            count[cls] += mask.sum()
    return float(kept[0] / count[0]), float(kept[1] / count[1]), float(count[0] / count.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-dms4", "tiny-dms8"])
    parser.add_argument("--tasks", nargs="+", default=list(FACTS))
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args()
    lines = [f"Command: `python benchmarks/dms_keep_rates.py --models {' '.join(args.models)} --tasks {' '.join(args.tasks)} "
             f"--problems {args.problems}`", "",
             "| model | task | facts kept | rest kept | facts' share of tokens |", "|---|---|---|---|---|"]
    for name in args.models:
        model, tok = kvshrink.load(name, device="cpu", dtype="float32")
        for task in args.tasks:
            fact, rest, share = keep_rates(model, tok, task, args.problems)
            lines.append(f"| {name} | {task} | {fact:.2f} | {rest:.2f} | {share:.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("# DMS keep rates: facts against the rest\n\n" + __doc__.split("\n\n", 2)[2] + "\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
