"""The `kvshrink` command line. Each command parses its options and calls one library function; the training
commands' options are the fields of their settings dataclasses (`from_config`).

One vocabulary everywhere: MODEL is a shipped name (`kvshrink models`) or a local HF folder, DIR a folder, FILE a
file; every command that loads a model takes --device and --dtype; task commands take --tasks and --problems
(held-out problems per task); every boolean option has its --no- form. Bad input exits with code 2 and a
one-line message on stderr (never a traceback).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import KVShrinkError, check_cr, check_prefill_chunk, check_sinks, check_window, out_folder
from .train.finetune import FinetuneConfig
from .train.retrofit import PROFILES, RetrofitConfig

# click's usage errors (bad or missing options), from the click this typer uses (its own copy in typer >= 0.2x)
_UsageError = typer.BadParameter.__mro__[1]

# library messages name the policy parameters (cr, window=64); here they are the flags that set them
_PARAMETER = re.compile(r"(?<![\w'-])(cr|window|sinks)(?:=([^\s,;)]+))?(?![\w'-])")

# options renamed for one vocabulary: still accepted, with a note (old -> new words)
DEPRECATED = {"--bf16": ["--dtype", "bfloat16"], "--task": ["--tasks"]}

# the metavar of a settings field's option that names none, by the type of its value
METAVARS = {int: "N", float: "X", str: "TEXT"}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

MODEL_HELP = "a shipped name (`kvshrink models`) or a local HF model folder"
PROBLEMS = 100  # held-out problems per task, wherever a command runs tasks (the demo, a quick look, takes fewer)


def model_argument(help: str = MODEL_HELP):
    return typer.Argument(..., metavar="MODEL", help=help)


def flag(name: str, help: str):
    """A boolean option, off by default, with its --no- form."""
    return typer.Option(False, f"--{name}/--no-{name}", help=help)


def count(default, help: str):
    """An option that takes a whole number, N."""
    return typer.Option(default, metavar="N", help=help)


def number(default, help: str):
    """An option that takes a number, X."""
    return typer.Option(default, metavar="X", help=help)


SINKS_OVERRIDE = count(None, "DMS sinks override: never evict the first N tokens (>= 0)")
CR_OPTION = number(None, "target compression ratio (>= 1)")
WINDOW_OVERRIDE = count(None, "DMS window override (>= 0)")
POLICY_OPTION = typer.Option(None, metavar="NAME", help="none | dms | dms-immediate | tova | h2o | window | quest "
                                                         "(default: dms on a DMS model, else none)")
DEVICE_OPTION = typer.Option("auto", metavar="DEVICE", help="auto | cpu | cuda")
DTYPE_OPTION = typer.Option("auto", metavar="DTYPE", help="weights and cache: auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
JSON_OPTION = flag("json", "print JSON (one object per line) instead of tables")
PROBLEMS_OPTION = count(PROBLEMS, "held-out problems per task")
SEED_OPTION = count(0, "first problem seed (held out: training draws from seeds >= 1,000,000)")
DIFFICULTY_OPTION = count(None, "task difficulty (default: each task's own)")


@app.callback()
def root(version: bool = typer.Option(False, "--version", is_eager=True, help="print kvshrink's version and exit",
                                      callback=lambda asked: _print_version() if asked else None)):
    """Shrink the KV cache of Hugging Face decoders: DMS retrofits, eviction baselines, KV transform coding, a server."""


def _print_version() -> None:
    print(f"kvshrink {__version__}")
    raise typer.Exit()


def from_config(cls, arguments: tuple[str, ...] = (), profiles: dict | None = None):
    """Give a command one option per field of the settings dataclass `cls` (its name, type, default, and its
    help and metavar from the field's metadata: `train.loop.setting`), so that a new field is a new option. The
    command takes `cfg`, built from them, plus any options of its own.

    arguments: fields taken as positional arguments. profiles: {name: (what it is, {field: value})}, chosen by
    --profile: a field left at its default on the command line takes the profile's value. A
    `tuple[float, ...]` field is given as text, comma-separated (--export-at 4,8)."""
    types = typing.get_type_hints(cls)
    asked = dataclasses.fields(cls)
    listed = {f.name for f in asked if types[f.name] == tuple[float, ...]}

    def parameter(f: dataclasses.Field) -> inspect.Parameter:
        default = ... if f.default is dataclasses.MISSING else f.default
        annotation = types[f.name]
        if f.name in listed:  # text; not given = the field's empty default
            annotation, default = Optional[str], None
        make = typer.Argument if f.name in arguments else typer.Option
        metavar = f.metadata.get("metavar") or next((m for t, m in METAVARS.items() if annotation in (t, Optional[t])), None)
        info = make(default, help=f.metadata["help"], metavar=metavar)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

    own_extra = []
    if profiles:
        described = "; ".join(f"{name}: {what}" for name, (what, _) in profiles.items())
        own_extra = [
            inspect.Parameter("profile", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
                next(iter(profiles)), metavar="NAME", help=f"a named recipe for every option left at its default ({described})")),
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]

    def decorate(command):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "cfg"]
        params = [parameter(f) for f in asked if f.name in arguments] + own_extra + [parameter(f) for f in asked if f.name not in arguments] + own

        def run(**values):
            settings = {f.name: values.pop(f.name) for f in asked}
            if profiles:
                ctx, profile = values.pop("ctx"), values.pop("profile")
                if profile not in profiles:
                    raise KVShrinkError(f"unknown --profile {profile!r}: use one of {', '.join(profiles)}")
                for name, value in profiles[profile][1].items():
                    source = ctx.get_parameter_source(name)
                    if source is None or source.name == "DEFAULT":
                        settings[name] = ",".join(f"{x:g}" for x in value) if name in listed else value
            for name in listed:
                settings[name] = tuple(_floats(settings[name])) if settings[name] else ()
            return command(cls(**settings), **values)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate


@app.command()
def models(as_json: bool = JSON_OPTION):
    """The shipped models, loadable by name everywhere MODEL is asked: base, what each adds, its DMS compression
    ratio and window, and its headline figure (its card, `src/kvshrink/zoo/models/NAME/README.md`, has the rest)."""
    from .zoo import catalogue

    rows = catalogue()
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shipped models")
    for col in ("name", "base", "adds", "DMS CR", "window", "headline (n, 95% interval: see its card)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["base"] or "-", r["adds"], "-" if r["cr"] is None else f"{r['cr']:g}",
                      "-" if r["window"] is None else str(r["window"]), r["headline"])
    Console().print(table)


@app.command()
def generate(
    model: str = model_argument(),
    prompt: str = typer.Argument(..., metavar="PROMPT", help="text to continue"),
    policy: Optional[str] = POLICY_OPTION,
    cr: Optional[float] = CR_OPTION,
    window: Optional[int] = WINDOW_OVERRIDE,
    sinks: Optional[int] = SINKS_OVERRIDE,
    max_new_tokens: int = count(64, "tokens to generate"),
    temperature: float = number(0.0, "0 = greedy"),
    top_p: float = number(1.0, "nucleus sampling mass"),
    n: int = count(1, "samples per prompt (one batch)"),
    seed: int = count(0, "sampling seed"),
    chat: bool = flag("chat", "wrap the prompt in the model's chat template"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Generate text under a cache policy and report KV reads, peak tokens, bytes and compression ratio."""
    from .generation import check_sampling, generate as run
    from .loading import load

    if not prompt.strip():
        raise KVShrinkError("empty prompt: give some text to continue")
    try:
        prompt.encode()
    except UnicodeEncodeError as exc:  # bytes that are not UTF-8 reach argv as lone surrogates
        raise KVShrinkError(f"the prompt is not UTF-8 text (a stray byte at character {exc.start}); "
                            "pass it in UTF-8 (check the terminal's or the script's encoding)") from exc
    check_sampling(max_new_tokens, temperature, top_p)
    _check_policy_options(policy, cr, window, sinks)
    m, tok = load(model, device=device, dtype=dtype)
    result = run(m, tok, prompt, policy, cr, window=window, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, n=n, seed=seed, chat=chat, sinks=sinks)
    if as_json:
        print(json.dumps({"texts": result.texts, "tokens": result.tokens, "stats": result.stats}))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for i, text in enumerate(result.texts):
        console.rule(f"sample {i}")
        console.print(text, markup=False)
    table = Table(title="cache statistics")
    for key in ("prompt_tokens", "generated_tokens", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes",
                "compression_ratio", "seconds"):
        value = result.stats[key]
        table.add_row(key, f"{value:,.2f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)


def _check_policy_options(policy: str | None, cr: float | None, window: int | None, sinks: int | None = None) -> None:
    """Fail on bad policy options before a model is loaded (loading takes seconds)."""
    from .policies import check_name

    check_cr(cr)
    check_window(window)
    check_sinks(sinks)
    if policy is not None:
        check_name(policy)


def as_flags(message: str) -> str:
    """A library message in the CLI's words: cr=8 -> --cr 8, window -> --window."""
    return _PARAMETER.sub(lambda m: f"--{m[1]}" + (f" {m[2]}" if m[2] else ""), message)


def _tasks(text: str) -> list[str]:
    """--tasks: comma-separated task names, each checked before any model loads."""
    from .tasks import task_module

    names = _split(text)
    if not names:
        raise KVShrinkError("--tasks needs at least one task: arith, vt, niah or hops (comma-separated)")
    for name in names:
        task_module(name)
    return names


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text is not None else None


@app.command("eval")
def eval_cmd(
    model: str = model_argument(),
    tasks: str = typer.Option(..., metavar="NAMES", help="comma-separated: arith | vt | niah | hops, run one after another"),
    policy: Optional[str] = POLICY_OPTION,
    cr: Optional[float] = CR_OPTION,
    window: Optional[int] = WINDOW_OVERRIDE,
    sinks: Optional[int] = SINKS_OVERRIDE,
    problems: int = PROBLEMS_OPTION,
    seed: int = SEED_OPTION,
    difficulty: Optional[int] = DIFFICULTY_OPTION,
    width: int = count(1, "samples per problem W (majority vote)"),
    max_new_tokens: Optional[int] = count(None, "generation length L (default: twice the longest worked solution + 16)"),
    temperature: float = number(0.0, "0 = greedy"),
    top_p: float = number(1.0, "nucleus sampling mass"),
    batch_size: int = count(8, "problems per batch"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Accuracy and KV cost of a model on synthetic tasks (batched, exact grading), with the 95% interval of each accuracy."""
    from .loading import load
    from .evaluation.evaluate import evaluate

    names = _tasks(tasks)
    _check_policy_options(policy, cr, window, sinks)
    m, tok = load(model, device=device, dtype=dtype)
    for task in names:
        result = evaluate(m, tok, task, policy, cr=cr, window=window, problems=problems, seed=seed, difficulty=difficulty,
                          width=width, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          batch_size=batch_size, progress=not as_json, sinks=sinks)
        summary = {k: v for k, v in result.items() if k != "results"}
        if as_json:
            print(json.dumps(summary))
            continue
        from rich.console import Console
        from rich.table import Table

        low, high = summary["accuracy_interval"]
        table = Table(title=f"{model} on {task} (difficulty {result['difficulty']}, {result['problems']} problems)")
        table.add_row("accuracy (95% interval)", f"{summary['accuracy']:.3f} ({low:.3f}-{high:.3f})")
        for key in ("pass_at_w", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes", "compression_ratio", "seconds"):
            value = summary[key]
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else f"{value:,}")
        Console().print(table)


@app.command()
@from_config(RetrofitConfig, arguments=("model",), profiles=PROFILES)
def retrofit(
    cfg: RetrofitConfig,
    pack: Optional[Path] = typer.Option(None, metavar="DIR", help="when finished, write the model (DMS adapter, manifest, card) to DIR; "
                                        "with --export-at, each model taken to DIR-dms<CR>; the run's logs stay in --out"),
):
    """Retrofit DMS into a model by distilling from itself (KL + compression loss, CR ramped up). Recommended:
    --profile release, the recipe that made the shipped DMS models (docs/results/retrofit-gpu.md).

    Multi-process: `accelerate launch --multi_gpu --num_processes N -m kvshrink retrofit ...` (DDP).
    """
    from .train.pack import pack_adapter, pack_exports
    from .train.retrofit import retrofit as run

    last = run(cfg)
    main_process = os.environ.get("RANK", "0") == "0"
    if last and main_process:  # one line, from the main process of a launch
        print(json.dumps(last))
    if pack and main_process:
        out = Path(cfg.out)
        if cfg.export_at and (out / f"cr-{cfg.export_at[-1]:g}").is_dir():
            for packed in pack_exports(out, pack, base=cfg.model):
                print(packed)
        elif not cfg.export_at and (out / "config.json").is_file():
            print(pack_adapter(out, pack, base=cfg.model))


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", metavar="FILE", help="TOML grid (see benchmarks/sweep-*.toml)"),
    out: Path = typer.Option(Path("docs/results/hyperscaling.md"), metavar="FILE", help="report; points are cached beside it (.points.jsonl)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    only: list[str] = typer.Option([], "--only", metavar="POLICY",
                                   help="run only these policies' missing points (repeatable); the report has every finished point"),
    report_only: bool = typer.Option(False, "--report-only/--no-report-only",
                                     help="run nothing: write the report from the finished points"),
):
    """Hyper-scaling grid: tasks x policies x CR x L x W, resumable, with Pareto plots."""
    from .evaluation.sweep import SweepConfig, run_sweep, write_report

    cfg = SweepConfig.from_file(config)
    rows = run_sweep(cfg, out.with_suffix(".points.jsonl"), device=device, dtype=dtype,
                     policies=[] if report_only else (only or None))
    partial = "" if len(rows) == len(cfg.points()) else f" ({len(rows)} of {len(cfg.points())} points so far)"
    for png in write_report(rows, out, f"kvshrink sweep --config {config} --out {out}", partial, cfg.cuts):
        print(png)
    print(out)


@app.command()
def serve(
    model: str = model_argument(),
    host: str = typer.Option("127.0.0.1", metavar="HOST", help="interface to listen on"),
    port: int = typer.Option(8000, metavar="PORT", help="TCP port"),
    kv_budget_tokens: Optional[int] = count(None, "admission budget in tokens of a vanilla cache: the bytes N tokens' "
                                                   "keys, values and slot metadata take (a DMS model holds about CR x N in them)"),
    kv_budget_mb: Optional[float] = number(None, "admission budget in MB the KV caches may allocate (keys, values, "
                                                 "slot metadata, policy state; default 512)"),
    policy: Optional[str] = POLICY_OPTION,
    cr: Optional[float] = number(None, "compression ratio for tova, h2o or window"),
    max_batch: int = count(64, "most sequences decoded together"),
    prefill_chunk: int = count(256, "prompt tokens read per step between the running batch's decode steps"),
    paged: Optional[bool] = typer.Option(None, "--paged/--no-paged", help="keys and values in blocks that follow each "
                                         "sequence's live tokens, or one contiguous row per sequence (default: paged when the policy evicts)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /metrics), continuous batching,
    admission by the bytes the KV caches allocate: a DMS model serves more sequences in the same memory."""
    import uvicorn

    from .loading import load
    from .serve import build_engine
    from .serve.app import create_app
    from .serve.scheduler import size

    _check_policy_options(policy, cr, None)
    check_prefill_chunk(prefill_chunk)
    if not 1 <= port <= 65535:
        raise KVShrinkError(f"--port must be in 1..65535 (got {port}); e.g. --port 8000")
    if max_batch < 1:
        raise KVShrinkError(f"--max-batch must be >= 1 (got {max_batch}); e.g. --max-batch 64")
    if kv_budget_tokens is None and kv_budget_mb is None:
        kv_budget_mb = 512.0
    m, tok = load(model, device=device, dtype=dtype)
    engine = build_engine(m, tok, policy, cr, kv_budget_tokens, kv_budget_mb, max_batch, prefill_chunk, paged)
    print(f"serving {model} on http://{host}:{port}/v1 (policy {engine.policy.name}, KV budget {size(engine.budget)}, "
          f"{engine.budget_tokens:,.0f} tokens of a vanilla cache)")
    uvicorn.run(create_app(engine, model), host=host, port=port, log_level="warning")


kvtc_app = typer.Typer(no_args_is_help=True, help="KV Cache Transform Coding: compact storage of reusable caches.")
app.add_typer(kvtc_app, name="kvtc")


@kvtc_app.command("calibrate")
def kvtc_calibrate(
    model: str = model_argument(),
    out: Path = typer.Option(..., "--out", metavar="FILE", help="calibration file to write (safetensors)"),
    tokens: int = count(100_000, "calibration token positions"),
    ratios: str = typer.Option("4,8,16,32,64", metavar="LIST", help="compression ratios to plan bit allocations for"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Fit the PCA bases and the bit allocations of a model's KV cache (once per model)."""
    from .kvtc.fit import calibrate

    print(calibrate(model, out, tokens=tokens, ratios=_floats(ratios), device=device, dtype=dtype))


@kvtc_app.command("eval")
def kvtc_eval(
    model: str = model_argument(),
    calibration: Path = typer.Option(..., metavar="FILE", help="a file from `kvshrink kvtc calibrate`"),
    ratios: str = typer.Option("4,8,16,32", metavar="LIST", help="compression ratios (each must be planned in the calibration)"),
    tasks: str = typer.Option("vt", metavar="NAMES", help="comma-separated tasks whose prompts' caches are compressed"),
    problems: int = PROBLEMS_OPTION,
    seed: int = SEED_OPTION,
    prefix_tokens: int = count(0, "prepend solved problems up to this many tokens (arith: >= 512)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Accuracy from caches stored with KVTC vs uncompressed, int4/int2 quantization and TOVA eviction."""
    from .evaluation.kvtc import evaluate

    for task in _tasks(tasks):
        result = evaluate(model, calibration, _floats(ratios), task, problems, seed, device=device, dtype=dtype, prefix_tokens=prefix_tokens)
        if as_json:
            print(json.dumps(result))
            continue
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{model} on {task}: caches through each method ({result.get('problems', problems)} problems)")
        for col in ("method", "accuracy", "ratio (whole cache)", "ratio (middle)", "compress MB/s", "decompress MB/s"):
            table.add_column(col)
        for name, m in result["methods"].items():
            table.add_row(name, f"{m['accuracy']:.3f}", f"{m.get('ratio', m.get('compression_ratio', 1.0)):.2f}",
                          f"{m.get('middle_ratio', float('nan')):.2f}", f"{m.get('compress_mb_s', float('nan')):.0f}",
                          f"{m.get('decompress_mb_s', float('nan')):.0f}")
        Console().print(table)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise KVShrinkError(f"give numbers separated by commas, e.g. 4,8,16 (got {text!r})") from exc
    if not values or any(v < 1 for v in values):
        raise KVShrinkError(f"compression ratios must be >= 1 (got {text!r})")
    return values


zoo_app = typer.Typer(no_args_is_help=True, help="Build the shipped task model `tiny` "
                                                  "(its DMS retrofits: `kvshrink retrofit --profile release-tasks`).")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("finetune")
@from_config(FinetuneConfig)
def zoo_finetune(
    cfg: FinetuneConfig,
    pack: Optional[Path] = typer.Option(None, metavar="DIR", help="when finished, write the model (LoRA adapter, manifest, card) to DIR; "
                                        "the run's logs stay in --out"),
):
    """LoRA fine-tune on the synthetic tasks (loss on worked solutions only), resumable."""
    from .train.finetune import finetune
    from .train.pack import pack_lora

    last = finetune(cfg)
    if pack and last.get("step") == cfg.steps:
        print(pack_lora(Path(cfg.out), pack, base=cfg.base))


@zoo_app.command("retrofit", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def zoo_retrofit():
    """Merged into `kvshrink retrofit`: says so, with the profile that holds this command's former defaults."""
    raise KVShrinkError("`kvshrink zoo retrofit` is now `kvshrink retrofit MODEL --profile cpu-tasks --data gold:arith,vt,niah,hops "
                        "--out DIR [--pack DIR]` (its former defaults); --profile release-tasks is the recipe of the shipped tiny-dms4/8")


@app.command("plot-training")
def plot_training_cmd(run_dir: Path = typer.Argument(..., metavar="DIR", help="a retrofit --out folder")):
    """Plot loss, KL and achieved vs target CR from DIR/metrics.jsonl (writes DIR/training.png)."""
    from .train.retrofit import plot_training

    print(plot_training(run_dir))


@app.command()
def export(
    model: str = model_argument(),
    out: Path = typer.Argument(..., metavar="DIR", help="folder to write: config.json + safetensors + tokenizer (new or empty)"),
    force: bool = flag("force", "write into DIR although it holds files (same-named ones are replaced)"),
    dtype: str = DTYPE_OPTION,
):
    """Write a full standard HF folder (for AutoModelForCausalLM and other tools; DMS settings stay in config.json)."""
    from .loading import load, quiet_transformers

    if any(out_folder(out, "DIR").iterdir()) and not force:
        raise KVShrinkError(f"{out} is not empty: export into a new or empty folder, or pass --force to write beside its files")
    m, tok = load(model, device="cpu", dtype=dtype)
    with quiet_transformers():
        m.save_pretrained(out)
        tok.save_pretrained(out)
    print(out)


@app.command()
def compare(
    model_a: str = model_argument("first model (e.g. smollm2)"),
    model_b: str = model_argument("second model (e.g. smollm2-dms8)"),
    text: Path = typer.Option(..., "--text", metavar="FILE", help="a text file: its first --prompt-tokens tokens are the prompt"),
    prompt_tokens: int = count(1024, "prompt length in tokens"),
    max_new_tokens: int = count(64, "greedy tokens to generate"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Continue the same passage with two models (each with its default cache policy) and compare."""
    from .compare import compare as run

    result = run(model_a, model_b, text, prompt_tokens, max_new_tokens, device, dtype)
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['prompt_tokens']} prompt tokens; leading agreement {result['agreement']} tokens")
    table.add_column("")
    for name in result["runs"]:
        table.add_column(name)
    rows = (("policy", "policy", "{}"), ("compression ratio", "compression_ratio", "{:.2f}"), ("cache bytes", "cache_bytes", "{:,}"),
            ("peak KV tokens", "peak_kv_tokens", "{:,.0f}"), ("decode tok/s", "decode_tokens_per_second", "{:.1f}"))
    for label, key, fmt in rows:
        table.add_row(label, *(fmt.format(r["stats"][key]) for r in result["runs"].values()))
    table.add_row("continuation", *(r["text"] for r in result["runs"].values()))
    Console().print(table)


@app.command("inspect")
def inspect_cmd(
    model: str = model_argument("a DMS model: a shipped name (e.g. smollm2-dms8) or a local folder"),
    text: Optional[Path] = typer.Option(None, "--text", metavar="FILE", help="a text file (default: the held-out half of the Python docs)"),
    tasks: Optional[str] = typer.Option(None, metavar="NAMES", help="comma-separated arith | vt | niah | hops: held-out prompts instead of "
                                                                   "text, with the facts-vs-filler figures, one result per task"),
    problems: int = PROBLEMS_OPTION,
    seed: int = SEED_OPTION,
    difficulty: Optional[int] = DIFFICULTY_OPTION,
    sequences: int = count(3, "text windows (--text or the default text)"),
    seq_len: int = count(2048, "tokens per text window, at most the model's context"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """How a DMS model decides: per-(layer, head) flag rates, heads that evict token 0, the share of decisions
    a training gradient can still move, all-keep and window-only heads, and on tasks whether facts are kept
    more than filler (definitions: `kvshrink.dms.diagnostics`)."""
    from .dms.diagnostics import inspect_decisions, task_sequences, text_sequences
    from .loading import load
    from .prompts import read_text_file
    from .tasks import make_problems

    if text is not None and tasks is not None:
        raise KVShrinkError("give --text FILE or --tasks NAMES, not both")
    names = _tasks(tasks) if tasks is not None else []
    levels = {task: make_problems(task, problems, seed=seed, difficulty=difficulty)[0].difficulty for task in names}  # checks them
    if sequences < 1 or seq_len < 2:
        raise KVShrinkError(f"--sequences must be >= 1 and --seq-len >= 2 (got {sequences} and {seq_len})")
    content = read_text_file(text) if text is not None else None
    m, tok = load(model, device=device, dtype=dtype)
    sources = []
    for task, level in levels.items():
        ids, facts = task_sequences(tok, task, problems, seed=seed, difficulty=level)
        sources.append((ids, facts, {"task": task, "problems": problems, "seed": seed, "difficulty": level}))
    if not names:
        from .corpora import pydoc_split

        limit = getattr(m.config, "max_position_embeddings", None) or seq_len
        ids = text_sequences(tok, pydoc_split()[1] if content is None else content, sequences, min(seq_len, limit))
        sources.append((ids, None, {"text": str(text) if text is not None else "pydoc held-out", "sequences": len(ids)}))
    for ids, facts, source in sources:
        source["tokens"] = [len(s) for s in ids]
        result = {"model": model, "source": source, **inspect_decisions(m, ids, facts)}
        if as_json:
            print(json.dumps(result))
        else:
            _print_decisions(result)


def _print_decisions(result: dict) -> None:
    """`kvshrink inspect` as tables: the summary figures, then the flag rate of every (layer, KV head)."""
    from rich.console import Console
    from rich.table import Table

    from .dms.diagnostics import summary_rows

    source = result["source"]
    what = (f"{source['problems']} {source['task']} prompts" if "task" in source
            else f"{len(source['tokens'])} x {max(source['tokens']):,} tokens of {source['text']}")
    summary = Table(title=f"{result['model']}: eviction decisions on {what}")
    summary.add_column("figure")
    summary.add_column("value")
    for label, value in summary_rows(result):
        summary.add_row(label, value)
    heads = Table(title="flag rate per (layer, KV head)",
                  caption="* its raw flag evicts token 0 (in most sequences); green: all-keep (< .05), red: window-only (>= .95)")
    heads.add_column("layer")
    for h in range(result["kv_heads"]):
        heads.add_column(f"head {h}", justify="right")
    t0 = result["token0"]["head_rate_raw"]
    for layer, rates in enumerate(result["head_flag_rate"]):
        heads.add_row(str(layer), *(_rate_cell(r, t0[layer][h] > 0.5) for h, r in enumerate(rates)))
    console = Console()
    console.print(summary)
    console.print(heads)


def _rate_cell(rate: float, evicts_token0: bool) -> str:
    """A head's flag rate, green when all-keep (< .05), red when window-only (>= .95)."""
    from .dms.diagnostics import ALL_KEEP, WINDOW_ONLY

    style = "green" if rate < ALL_KEEP else "red" if rate >= WINDOW_ONLY else ""
    cell = f"{rate:.2f}" + ("*" if evicts_token0 else " ")
    return f"[{style}]{cell}[/{style}]" if style else cell


@app.command()
def demo(
    quick: bool = flag("quick", "a smoke test: 2 vt problems per model, no real-text section (under 2 minutes on 2 CPU cores)"),
    models: Optional[str] = typer.Option(None, metavar="LIST", help="comma-separated models for the task table "
                                                                   "(default: tiny, tiny-dms4, tiny-dms8)"),
    tasks: Optional[str] = typer.Option(None, metavar="NAMES", help="comma-separated tasks (default: all four)"),
    problems: int = count(8, "held-out problems per task (a demo: the n = 200 table is docs/results/zoo.md)"),
    text_models: Optional[str] = typer.Option(None, metavar="LIST", help="two models for the real-text section (default: smollm2,smollm2-dms8)"),
    out: Path = typer.Option(Path("demo-output"), metavar="DIR", help="where the PNG and JSON go"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """The main job: task accuracy (with its 95% interval) and KV cost of a model and its DMS retrofits, one memory
    budget (vanilla against DMS-8 on vt), then vanilla vs DMS on real text. About 6 to 7 minutes on 2 CPU cores; --quick about 1.5.

    On your own model: retrofit it (`kvshrink retrofit MODEL --profile release --data SRC --out DIR`), then
    `kvshrink demo --models MODEL,DIR/cr-8 --text-models MODEL,DIR/cr-8`.
    """
    from .demo import run_demo

    text = _split(text_models)
    if text is not None and len(text) != 2:
        raise KVShrinkError("--text-models takes exactly two models, e.g. smollm2,smollm2-dms8")
    run_demo(_split(models), _tasks(tasks) if tasks is not None else None, problems, quick, text, out, device, dtype)


def command():
    """The click command typer builds from `app`: what --help renders and the README's synopsis lists."""
    import typer.main

    return typer.main.get_command(app)


def _commands(cmd, path: str = "kvshrink", hidden: bool = True):
    """(its command line, command) for `cmd` and every command under it, depth first (hidden ones only if asked)."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        if hidden or not sub.hidden:
            yield from _commands(sub, f"{path} {name}", hidden)


def synopsis(width: int = 110) -> str:
    """One usage line per command, wrapped at `width`: required arguments and options bare, the rest in
    brackets, each option with its metavar. The README's synopsis is this text (tests/test_cli.py checks it)."""
    blocks = []
    for path, cmd in _commands(command(), hidden=False):
        if getattr(cmd, "commands", None):
            continue
        words = [path]
        for param in cmd.params:
            if param.param_type_name == "argument":
                words.append(param.metavar)
            elif param.name != "help":
                word = param.opts[0] if param.is_flag else f"{param.opts[0]} {param.metavar}"
                words.append(word if param.required else f"[{word}]")
        lines = [words[0]]
        for word in words[1:]:  # an option and its metavar never split across lines
            if len(lines[-1]) + 1 + len(word) > width:
                lines.append("   ")
            lines[-1] += " " + word
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _deprecated(args: list[str]) -> list[str]:
    """Renamed options in today's words, each with a one-line note on stderr."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg in DEPRECATED:
            print(f"note: {arg} is deprecated: use {' '.join(DEPRECATED[arg])}", file=sys.stderr)
        out += DEPRECATED.get(arg, [arg])
    return out


def main() -> None:
    """Bad input ends in one line and exit code 2, click's usage errors included (it would draw them in a box);
    anything unexpected in one line and exit code 1, with the traceback only when KVSHRINK_DEBUG=1 (for bug
    reports)."""
    try:
        code = command().main(_deprecated(sys.argv[1:]), prog_name="kvshrink", standalone_mode=False)  # click's errors come back here
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help, shown already (typer tells it by name too)
            sys.exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx else "kvshrink"
        print(f"error: {' '.join(exc.format_message().split()).rstrip('.')}; see {where} --help", file=sys.stderr)
        sys.exit(2)
    except KVShrinkError as exc:
        print(f"error: {as_flags(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("KVSHRINK_DEBUG") == "1":
            raise
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(unexpected: rerun with KVSHRINK_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # as click would: --help and the like return their exit code
