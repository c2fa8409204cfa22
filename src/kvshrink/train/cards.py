"""Model cards for packed adapters, written from the run's own settings and metrics (never by hand), so
that the command, data, steps, learning rate, wall time and device they state are the ones that ran.
Accuracy tables are added by `benchmarks/zoo_eval.py --cards` under the `## Accuracy` heading, and the
figures of `kvshrink inspect MODEL --json` by `set_diagnostics` under `## Diagnostics`."""

from __future__ import annotations

import json
from pathlib import Path

from ..dms.diagnostics import ALL_KEEP, WINDOW_ONLY, summary_rows
from ..jsonl import read_jsonl
from .finetune import DIFFICULTIES, parse_tasks
from .ramp import ramp_length, ramp_origin, stages_with_origins

ACCURACY = "## Accuracy"
DIAGNOSTICS = "## Diagnostics"
MEASURED = (ACCURACY, DIAGNOSTICS)  # sections measured on the model itself: stale in an earlier stage's card


def _run(run_dir: Path, settings: str) -> tuple[dict, list[dict]]:
    return json.loads((run_dir / settings).read_text()), read_jsonl(run_dir / "metrics.jsonl")


def _timing(metrics: list[dict], device: str) -> str:
    seconds = sum(m["seconds"] for m in metrics)
    return f"{seconds / 60:.1f} min of training steps ({seconds / max(1, len(metrics)):.1f} s/step) on {device}"


def finetune_card(name: str, run_dir: Path) -> str:
    cfg, metrics = _run(run_dir, "finetune.json")
    weights = parse_tasks(cfg["tasks"])
    mixture = ", ".join(f"`{t}` difficulty {DIFFICULTIES[t][0]}-{DIFFICULTIES[t][1]}" for t in weights)
    drawn = ("uniformly from " + str(len(weights)) if len(set(weights.values())) == 1 else
             "with weights " + ", ".join(f"{t} {w:g}" for t, w in weights.items()))
    last = metrics[-1] if metrics else {}
    return f"""# {name}

{cfg["base"]} + one LoRA adapter (r = {cfg["lora_r"]}, alpha = {cfg["lora_alpha"]}, on every attention and MLP projection),
fine-tuned on the synthetic tasks. This folder holds the adapter only; `kvshrink.load("{name}")` merges it into the base.
{_stage(cfg)}
## How it was made

    kvshrink zoo finetune --out runs/zoo/{name} --tasks {cfg["tasks"]} --steps {cfg["steps"]} --batch-size {cfg["batch_size"]} \\
        --lr {cfg["lr"]:g} --warmup {cfg["warmup"]} --lora-r {cfg["lora_r"]} --lora-alpha {cfg["lora_alpha"]} \\
        --max-context {cfg["max_context"]} --seed {cfg["seed"]}{" --bf16" if cfg.get("bf16") else ""}{f" --init-from {cfg['init_from']}" if cfg.get("init_from") else ""} --pack src/kvshrink/zoo/models/{name}

Data: {cfg["batch_size"]} fresh problems a step (never repeated, never an evaluation seed), the task drawn
{drawn} and the difficulty uniformly in its range ({mixture}), each at most
{cfg["max_context"]} tokens through the chat template; loss on the worked solution and end-of-turn token only.
Steps: {len(metrics)} of {cfg["steps"]}; AdamW, peak lr {cfg["lr"]:g}, {cfg["warmup"]} warm-up steps, cosine decay to a tenth;
{"bf16 autocast with fp32 master weights" if cfg.get("bf16") else "fp32"}.
Trained: {_timing(metrics, cfg.get("device_name", cfg["device"]))}.
Last step: loss {last.get("loss", float("nan")):.4f}, answer-token accuracy {last.get("answer_token_accuracy", float("nan")):.3f}.

{ACCURACY}

Not measured yet: `python benchmarks/zoo_eval.py --cards` fills this in.
""" + _earlier_stage(cfg, run_dir)


def _stage(cfg: dict) -> str:
    """A second stage (--init-from) says where its adapter started."""
    return (f"\nThis stage starts from the adapter of `{cfg['init_from']}`, made as its card says (under Earlier stage below).\n"
            if cfg.get("init_from") else "")


def _earlier_stage(cfg: dict, run_dir: Path) -> str:
    """The card of the model a second stage started from (kept in its run folder), under `## Earlier stage`."""
    earlier = run_dir / "earlier-stage.md"
    return _earlier_card(earlier.read_text()) if cfg.get("init_from") and earlier.is_file() else ""


def _earlier_card(card: str) -> str:
    """The earlier stage's card without its title, headings one level down and its (stale) accuracy and
    diagnostics sections dropped; its own earlier stages are kept, so a card carries the whole chain."""
    kept = card.split("\n", 1)[-1]
    for heading in MEASURED:
        kept = _drop_section(kept, heading)
    kept = kept.strip()
    return "\n## Earlier stage\n\n" + "\n".join("#" + line if line.startswith("#") else line for line in kept.splitlines()) + "\n"


def _drop_section(text: str, heading: str) -> str:
    """`text` without the section under `heading` (up to the next `## ` heading)."""
    before, found, after = text.partition(heading)
    if not found:
        return text
    rest = after.split("\n## ", 1)
    return before.rstrip() + ("\n\n## " + rest[1] if len(rest) > 1 else "")


def retrofit_card(name: str, run_dir: Path, base: str) -> str:
    cfg, metrics = _run(run_dir, "retrofit.json")
    last = metrics[-1] if metrics else {}
    exported = run_dir / "export.json"  # a model taken mid-ramp (--export-at): its own CR, not the ramp's end
    target = json.loads((run_dir / "config.json").read_text())["dms_cr"] if exported.is_file() else cfg["target_cr"]
    return f"""# {name}

`{base}` + a DMS eviction adapter (the release recipe: base frozen, only `dms_proj_alpha_norm` +
`dms_proj_alpha` train), target compression ratio {target:g} (flag-based), delayed-eviction window w = {cfg["window"]}{_sinks(cfg)}.
This folder holds the adapter tensors and DMS settings only; `kvshrink.load("{name}")` applies them.
{_stage(cfg)}
## How it was made

{_retrofit_commands(cfg, base, name)}

Data: {_data(cfg, base)}, in {cfg["seq_len"]}-token blocks (padding masked out of the losses). Loss: KL(student || teacher){_answer_weight(cfg)}
+ the {cfg.get("cr_loss", "one-sided")} compression loss{" (each sequence's term weighted by min(1, its tokens / the aimed context))" if cfg.get("cr_by_length") else ""}, {_ramp(cfg)}{_taken(exported, target) or ", then held"};
{_aim(cfg)}
Steps: {len(metrics)} of {cfg["steps"]}, AdamW (0.9, 0.95) lr {cfg["lr"]:g} constant{", bf16 autocast" if cfg.get("bf16") or "H100" in cfg.get("device_name", "") or "H200" in cfg.get("device_name", "") else ""}. Trained: {_timing(metrics, cfg.get("device_name", cfg["device"]))};
{_tokens(metrics)}.
Last step: KL {last.get("kl", float("nan")):.4f}, flag-based CR {last.get("flag_cr", float("nan")):.2f}.

{ACCURACY}

Not measured yet: `python benchmarks/zoo_eval.py --cards` fills this in.

{DIAGNOSTICS}

Not measured yet: `kvshrink inspect {name} --json` gives the figures, `kvshrink.train.cards.set_diagnostics` writes them here.
""" + _earlier_stage(cfg, run_dir)


def _sinks(cfg: dict) -> str:
    return f", the first {cfg['sinks']} tokens never evicted (attention sinks)" if cfg.get("sinks") else ""


def _taken(exported: Path, target: float) -> str:
    """How a model taken mid-ramp was taken (the release takes its 8x at step 238 of a 1 -> 16 ramp)."""
    if not exported.is_file():
        return ""
    at = json.loads(exported.read_text())
    return f"; this model is the adapter at step {at['step']}, where the ramp passed CR {target:g} (flag-based CR {at['flag_cr']:.2f} there)"


def _aim(cfg: dict) -> str:
    if cfg.get("aim_context"):  # the withdrawn rule of older recipes
        return f"the eviction rate aimed at makes the reads-based CR reach the target at {cfg['aim_context']:,} tokens."
    if "aim_context" in cfg and cfg.get("export_at") is None:  # older runs: None meant 32 * w
        return f"the eviction rate aimed at makes the reads-based CR reach the target at {32 * cfg['window']:,} tokens."
    return "the eviction rate aimed at is 1 - 1/CR (the flag-based CR, as the authors' release)."


def _tokens(metrics: list[dict]) -> str:
    seen = sum(m["tokens_per_second"] * m["seconds"] for m in metrics)
    return f"{seen / 1e6:.1f}M tokens seen ({seen / max(1, len(metrics)) / 1e3:.0f}K real tokens per step)"


def _data(cfg: dict, base: str) -> str:
    """What each `--data` source of a retrofit is, in words."""
    words = []
    for src in cfg["data"].split("+"):
        if src.startswith("task:"):
            words.append(f"`{base}`'s own sampled answers (temperature 1) to training-seed problems ({src}), each problem\n"
                         "and its answer whole (never split)")
        elif src.startswith("passkey:"):
            words.append(f"`{base}`'s answers to passkey prompts built from the train half of the Python docs ({src}), one per block")
        elif src == "pydoc":
            words.append("the train half of CPython's documentation topics (`pydoc`), as running text")
        elif src == "stdlib":
            words.append("the Python standard library's `*.py` source (tests and a fixed tenth of the modules held out), as running text")
        elif src.startswith("gold:"):
            words.append(f"a fresh generated problem with its gold worked solution for every sample ({src}), never repeated")
        elif src.startswith("teacher:"):
            words.append(f"`{base}`'s own continuations of the prompts in {src[len('teacher:'):]}")
        else:
            words.append(f"the text of {src}")
    return "; ".join(words)


def _answer_weight(cfg: dict) -> str:
    weight = cfg.get("answer_weight", 1)
    return "" if weight == 1 else f" (the answer's tokens weighted {weight:g}x against the prompt's)"


def _ramp(cfg: dict) -> str:
    """The CR ramp of the last stretch (earlier stretches show in their commands)."""
    start_cr, start_step = ramp_origin(cfg)
    where = f" from step {start_step + 1}" if start_step else ""
    steps = ramp_length(cfg, start_step)
    if steps == 1:  # no ramp: a second stage (--init-from) holds its predecessor's target from the start
        return f"the CR target at {cfg['target_cr']:g}{where or ' from the first step'}"
    return f"the CR target ramped linearly from {start_cr:g} to {cfg['target_cr']:g} over {steps} steps{where}"


def _retrofit_commands(cfg: dict, base: str, name: str) -> str:
    """The command of each stretch of steps: a resume that changed the recipe left a phase behind."""
    stages = stages_with_origins(cfg)
    if len(stages) == 1:
        return _retrofit_command(*stages[0], base, name, f" --pack src/kvshrink/zoo/models/{name}")
    lines, first = [], 1
    for i, (stage, origin) in enumerate(stages):
        tail = (" --resume" if i else "") + (f" --pack src/kvshrink/zoo/models/{name}" if i == len(stages) - 1 else "")
        lines.append(f"Steps {first}-{stage['until_step']}:\n\n" + _retrofit_command(stage, origin, base, name, tail))
        first = stage["until_step"] + 1
    return "\n\n".join(lines)


def _retrofit_command(stage: dict, origin: tuple[float, int], base: str, name: str, tail: str) -> str:
    """One stretch as a command; --ramp-steps resolved, so a stretch cut short (--steps = where it stopped)
    shows the ramp it really ran."""
    options = [f"--lr {stage['lr']:g}", f"--ramp-steps {ramp_length(stage, origin[1])}"]
    options += [f"--aim-context {stage['aim_context']}"] if stage.get("aim_context") else []
    options += [f"--cr-loss {stage['cr_loss']}"] if stage.get("cr_loss", "one-sided") != "one-sided" else []
    options += ["--cr-by-length"] if stage.get("cr_by_length") else []
    options += [f"--sinks {stage['sinks']}"] if stage.get("sinks") else []
    options += [f"--answer-weight {stage['answer_weight']:g}"] if stage.get("answer_weight", 1) != 1 else []
    options += ["--bf16"] if stage.get("bf16") else []
    options += [f"--init-from {stage['init_from']}"] if stage.get("init_from") else []
    if stage.get("export_at"):  # one ramp, several models: the general command (benchmarks/gpu_retrofit.sh runs it)
        exports = ",".join(f"{x:g}" for x in stage["export_at"])
        return f"""    kvshrink retrofit {base} --out runs/{base}-ramp --train adapter --target-cr {stage["target_cr"]:g} --window {stage["window"]} \\
        --steps {stage["steps"]} --data {stage["data"]} --seq-len {stage["seq_len"]} --batch-size {stage["batch_size"]} \\
        --grad-accum {stage["grad_accum"]} {" ".join(options)} --export-at {exports}

(run by `benchmarks/gpu_retrofit.sh OUT`, which sets --steps and --ramp-steps from the measured step time)"""
    return f"""    kvshrink zoo retrofit {base} --out runs/zoo/{name} --target-cr {stage["target_cr"]:g} --window {stage["window"]} \\
        --steps {stage["until_step"]} --data {stage["data"]} --seq-len {stage["seq_len"]} --batch-size {stage["batch_size"]} \\
        {" ".join(options)}{tail}"""


def set_accuracy(card: Path, table: str) -> None:
    """Replace the card's accuracy section (up to the next `## ` heading) with `table`."""
    _set_section(card, ACCURACY, table)


def set_diagnostics(card: Path, *figures: dict) -> None:
    """Replace the card's diagnostics section with `diagnostics_section(*figures)` (placed after the accuracy
    section when the card has none yet)."""
    _set_section(card, DIAGNOSTICS, diagnostics_section(*figures), after=ACCURACY)


def _set_section(card: Path, heading: str, body: str, after: str | None = None) -> None:
    """Replace the section under `heading` (up to the next `## ` heading) with `body`; a card without one
    gets it after the section under `after` if there is one, else at its end."""
    text = card.read_text()
    if heading not in text:
        at = len(text)
        if after is not None and after in text:
            following = text.find("\n## ", text.index(after) + len(after))
            at = following + 1 if following >= 0 else at
        text = f"{text[:at].rstrip(chr(10))}\n\n{heading}\n\n{text[at:]}"
    head, _, rest = text.partition(heading)
    tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
    card.write_text(f"{head}{heading}\n\n{body.strip()}\n{tail}")


def diagnostics_section(*figures: dict) -> str:
    """The body of a card's `## Diagnostics` section: for each result of `kvshrink inspect MODEL --json` (e.g.
    one on held-out text and one on a task), its figures and the flag rate of every (layer, KV head).
    Definitions: `kvshrink.dms.diagnostics`."""
    parts = ["How the eviction adapter decides, teacher-forced in eval mode (definitions: `kvshrink.dms.diagnostics`)."]
    for f in figures:
        rows = "\n".join(f"| {label.replace('|', chr(92) + '|')} | {value} |" for label, value in summary_rows(f))
        t0 = f["token0"]["head_rate_raw"]
        grid = "\n".join(f"| {layer} | " + " | ".join(_rate_md(r, t0[layer][h] > 0.5) for h, r in enumerate(rates)) + " |"
                         for layer, rates in enumerate(f["head_flag_rate"]))
        heads = " | ".join(f"head {h}" for h in range(f["kv_heads"]))
        parts.append(f"""On {_inspect_source(f)}:

| figure | value |
|---|---|
{rows}

Flag rate per (layer, KV head); bold: all-keep (< {ALL_KEEP:g}) or window-only (>= {WINDOW_ONLY:g});
\\* its raw flag evicts token 0 in most sequences.

| layer | {heads} |
|---|{"---|" * f["kv_heads"]}
{grid}""")
    return "\n\n".join(parts)


def _rate_md(rate: float, evicts_token0: bool) -> str:
    """A head's flag rate, bold when all-keep or window-only, * when its raw flag evicts token 0."""
    cell = f"**{rate:.2f}**" if rate < ALL_KEEP or rate >= WINDOW_ONLY else f"{rate:.2f}"
    return cell + ("\\*" if evicts_token0 else "")


def _inspect_source(f: dict) -> str:
    """What an inspect result ran on, and the command that gives it."""
    src, model = f.get("source", {}), f.get("model", "MODEL")
    if "task" in src:
        seed = f" --seed {src['seed']}" if src.get("seed") else ""
        level = f" --difficulty {src['difficulty']}" if src.get("difficulty") is not None else ""
        command = f"kvshrink inspect {model} --task {src['task']} --problems {f['sequences']}{seed}{level}"
        return f"{f['sequences']} held-out `{src['task']}` prompts (`{command}`)"
    tokens = max(src.get("tokens", [0]) or [0])
    text = src.get("text", "pydoc held-out")
    option = "" if text == "pydoc held-out" else f" --text {text}"
    what = "the held-out half of the Python docs" if not option else f"`{text}`"
    shape = "" if (f["sequences"], tokens) == (3, 2048) else f" --sequences {f['sequences']} --seq-len {tokens}"
    return f"{f['sequences']} x {tokens:,} tokens of {what} (`kvshrink inspect {model}{option}{shape}`)"
