"""The `kvshrink` command line. Each command parses its options and calls one library function; the training
commands' options are the fields of their settings dataclasses (`from_config`).

Bad input exits with code 2 and a one-line message on stderr (never a traceback).
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

from .errors import KVShrinkError, check_cr, check_prefill_chunk, check_sinks, check_window, out_folder
from .train.finetune import FinetuneConfig
from .train.retrofit import RetrofitConfig

# click's usage errors (bad or missing options), from the click this typer uses (its own copy in typer >= 0.2x)
_UsageError = typer.BadParameter.__mro__[1]

# library messages name the policy parameters (cr, window=64); here they are the flags that set them
_PARAMETER = re.compile(r"(?<![\w'-])(cr|window|sinks)(?:=([^\s,;)]+))?(?![\w'-])")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Shrink the KV cache of Hugging Face decoders.")


SINKS_OVERRIDE = typer.Option(None, help="DMS sinks override: never evict the first N tokens (>= 0)")
CR_OPTION = typer.Option(None, help="target compression ratio (>= 1)")
WINDOW_OVERRIDE = typer.Option(None, help="DMS window override (>= 0)")


def from_config(cls, arguments: tuple[str, ...] = (), fixed: dict | None = None, defaults: dict | None = None, helps: dict | None = None):
    """Give a command one option per field of the settings dataclass `cls` (its name, type, default, and its
    help from the field's metadata: `train.loop.setting`), so that a new field is a new option. The command
    takes `cfg`, built from them, plus any options of its own.

    arguments: fields taken as positional arguments; fixed: fields this command sets instead of asking;
    defaults, helps: this command's own where they differ. A `tuple[float, ...]` field is given as text,
    comma-separated (--export-at 4,8)."""
    fixed, defaults, helps = fixed or {}, defaults or {}, helps or {}
    types = typing.get_type_hints(cls)
    asked = [f for f in dataclasses.fields(cls) if f.name not in fixed]
    listed = {f.name for f in asked if types[f.name] == tuple[float, ...]}

    def parameter(f: dataclasses.Field) -> inspect.Parameter:
        default = defaults.get(f.name, ... if f.default is dataclasses.MISSING else f.default)
        annotation = types[f.name]
        if f.name in listed:  # text; not given = the field's empty default
            annotation, default = Optional[str], None
        make = typer.Argument if f.name in arguments else typer.Option
        info = make(default, help=helps.get(f.name, f.metadata["help"]))
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

    def decorate(command):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "cfg"]
        params = [parameter(f) for f in asked] + own

        def run(**values):
            settings = {f.name: values.pop(f.name) for f in asked}
            for name in listed:
                settings[name] = tuple(_floats(settings[name])) if settings[name] else ()
            return command(cls(**settings, **fixed), **values)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate


@app.command()
def generate(
    model: str = typer.Argument(..., help="a shipped name (e.g. smollm2-dms8) or a local model folder"),
    prompt: str = typer.Argument(..., help="text to continue"),
    policy: Optional[str] = typer.Option(None, help="none | dms | dms-immediate | tova | h2o | window | quest (default: dms on a DMS model, else none)"),
    cr: Optional[float] = CR_OPTION,
    window: Optional[int] = WINDOW_OVERRIDE,
    sinks: Optional[int] = SINKS_OVERRIDE,
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    n: int = typer.Option(1, help="samples per prompt (one batch)"),
    seed: int = typer.Option(0, help="sampling seed"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
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


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="a shipped name (e.g. tiny-dms8) or a local model folder"),
    task: str = typer.Option(..., help="arith | vt | niah | hops"),
    policy: Optional[str] = typer.Option(None, help="cache policy (default: dms on a DMS model, else none)"),
    cr: Optional[float] = CR_OPTION,
    window: Optional[int] = WINDOW_OVERRIDE,
    sinks: Optional[int] = SINKS_OVERRIDE,
    problems: int = typer.Option(100, help="number of problems"),
    seed: int = typer.Option(0, help="problem seed (held out: training uses seeds >= 1,000,000)"),
    difficulty: Optional[int] = typer.Option(None, help="task difficulty (default: the task's default)"),
    width: int = typer.Option(1, help="samples per problem W (majority vote)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="generation length L (default: twice the longest worked solution + 16)"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    batch_size: int = typer.Option(8, help="problems per batch"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Accuracy and KV cost of a model on a synthetic task (greedy, batched, exact grading)."""
    from .loading import load
    from .tasks import task_module
    from .evaluation.evaluate import evaluate

    task_module(task)
    _check_policy_options(policy, cr, window, sinks)
    m, tok = load(model, device=device)
    result = evaluate(m, tok, task, policy, cr=cr, window=window, problems=problems, seed=seed, difficulty=difficulty,
                      width=width, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      batch_size=batch_size, progress=not as_json, sinks=sinks)
    summary = {k: v for k, v in result.items() if k != "results"}
    if as_json:
        print(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} on {task} (difficulty {result['difficulty']}, {result['problems']} problems)")
    for key in ("accuracy", "pass_at_w", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes",
                "compression_ratio", "seconds"):
        value = summary[key]
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else f"{value:,}")
    Console().print(table)


@app.command()
@from_config(RetrofitConfig, arguments=("model",))
def retrofit(cfg: RetrofitConfig):
    """Retrofit DMS into a model by distilling from itself (KL + compression loss, CR ramped up).

    Multi-process: `accelerate launch --multi_gpu --num_processes N -m kvshrink retrofit ...` (DDP).
    """
    from .train.retrofit import retrofit as run

    last = run(cfg)
    if last and os.environ.get("RANK", "0") == "0":  # one line, from the main process of a launch
        print(json.dumps(last))


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", help="TOML grid (see benchmarks/sweep-*.toml)"),
    out: Path = typer.Option(Path("docs/results/hyperscaling.md"), help="report; points are cached beside it (.points.jsonl)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Hyper-scaling grid: tasks x policies x CR x L x W, resumable, with Pareto plots."""
    from .evaluation.sweep import SweepConfig, run_sweep, write_report

    cfg = SweepConfig.from_file(config)
    rows = run_sweep(cfg, out.with_suffix(".points.jsonl"), device=device)
    for png in write_report(rows, out, f"kvshrink sweep --config {config} --out {out}"):
        print(png)
    print(out)


@app.command()
def serve(
    model: str = typer.Argument(..., help="a shipped name (e.g. smollm2-dms8) or a local model folder"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    kv_budget_tokens: Optional[int] = typer.Option(None, help="admission budget in tokens of a vanilla cache: the bytes N tokens' "
                                                   "keys, values and slot metadata take (a DMS model holds about CR x N in them)"),
    kv_budget_mb: Optional[float] = typer.Option(None, help="admission budget in MB the KV caches may allocate (keys, values, "
                                                 "slot metadata, policy state; default 512)"),
    policy: Optional[str] = typer.Option(None, help="cache policy (default: dms on a DMS model, else none)"),
    cr: Optional[float] = typer.Option(None, help="compression ratio for tova, h2o or window"),
    max_batch: int = typer.Option(64, help="most sequences decoded together"),
    prefill_chunk: int = typer.Option(256, help="prompt tokens read per step between the running batch's decode steps"),
    paged: Optional[bool] = typer.Option(None, "--paged/--contiguous", help="keys and values in blocks that follow each "
                                         "sequence's live tokens, or one row per sequence (default: paged when the policy evicts)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
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
    m, tok = load(model, device=device)
    engine = build_engine(m, tok, policy, cr, kv_budget_tokens, kv_budget_mb, max_batch, prefill_chunk, paged)
    print(f"serving {model} on http://{host}:{port}/v1 (policy {engine.policy.name}, KV budget {size(engine.budget)}, "
          f"{engine.budget_tokens:,.0f} tokens of a vanilla cache)")
    uvicorn.run(create_app(engine, model), host=host, port=port, log_level="warning")


kvtc_app = typer.Typer(no_args_is_help=True, help="KV Cache Transform Coding: compact storage of reusable caches.")
app.add_typer(kvtc_app, name="kvtc")


@kvtc_app.command("calibrate")
def kvtc_calibrate(
    model: str = typer.Argument(..., help="a shipped name or a local model folder"),
    out: Path = typer.Option(..., "--out", help="calibration file to write (safetensors)"),
    tokens: int = typer.Option(100_000, help="calibration token positions"),
    ratios: str = typer.Option("4,8,16,32,64", help="compression ratios to plan bit allocations for"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Fit the PCA bases and the bit allocations of a model's KV cache (once per model)."""
    from .kvtc.fit import calibrate

    print(calibrate(model, out, tokens=tokens, ratios=_floats(ratios), device=device))


@kvtc_app.command("eval")
def kvtc_eval(
    model: str = typer.Argument(..., help="a shipped name or a local model folder"),
    calibration: Path = typer.Option(..., help="a file from `kvshrink kvtc calibrate`"),
    ratios: str = typer.Option("4,8,16,32", help="compression ratios (each must be planned in the calibration)"),
    task: str = typer.Option("vt", help="task whose prompts' caches are compressed"),
    problems: int = typer.Option(50, help="problems"),
    seed: int = typer.Option(0, help="problem seed"),
    prefix_tokens: int = typer.Option(0, help="prepend solved problems up to this many tokens (arith: >= 512)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Accuracy from caches stored with KVTC vs uncompressed, int4/int2 quantization and TOVA eviction."""
    from .evaluation.kvtc import evaluate
    from .tasks import task_module

    task_module(task)
    result = evaluate(model, calibration, _floats(ratios), task, problems, seed, device=device, prefix_tokens=prefix_tokens)
    if as_json:
        print(json.dumps(result))
        return
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


zoo_app = typer.Typer(no_args_is_help=True, help="Build the shipped task models (tiny, tiny-dms4, tiny-dms8).")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("finetune")
@from_config(FinetuneConfig)
def zoo_finetune(
    cfg: FinetuneConfig,
    pack: Optional[Path] = typer.Option(None, help="when finished, write the model (LoRA adapter, manifest, card) to this folder; the run's logs stay in --out"),
):
    """LoRA fine-tune on the synthetic tasks (loss on worked solutions only), resumable."""
    from .train.finetune import finetune
    from .train.pack import pack_lora

    last = finetune(cfg)
    if pack and last.get("step") == cfg.steps:
        print(pack_lora(Path(cfg.out), pack, base=cfg.base))


@zoo_app.command("retrofit")
@from_config(RetrofitConfig, arguments=("model",), fixed={"train": "adapter", "decision": "adapter", "neuron_decay": "instant"},
             defaults={"model": "tiny", "window": 16, "steps": 300, "data": "gold:arith,vt,niah,hops", "seq_len": 1024, "save_every": 25},
             helps={"model": "the task model to retrofit", "out": "run folder", "window": "delayed-eviction window w (SPEC 7: 16 for tiny-dms*)",
                    "data": "distillation data (default: a fresh problem per sample with its gold solution)"})
def zoo_retrofit(
    cfg: RetrofitConfig,
    pack: Optional[Path] = typer.Option(None, help="when finished, write the model (DMS adapter, manifest, card) to this folder; the run's logs stay in --out"),
):
    """DMS eviction adapter on a task model (the release recipe: --train adapter --decision adapter)."""
    from .train.pack import pack_adapter
    from .train.retrofit import retrofit as run

    last = run(cfg)
    if pack and last.get("step") == cfg.steps:
        print(pack_adapter(Path(cfg.out), pack, base=cfg.model))


@app.command("plot-training")
def plot_training_cmd(run_dir: Path = typer.Argument(..., help="a retrofit --out folder")):
    """Plot loss, KL and achieved vs target CR from RUN_DIR/metrics.jsonl (writes RUN_DIR/training.png)."""
    from .train.retrofit import plot_training

    print(plot_training(run_dir))


@app.command()
def export(
    model: str = typer.Argument(..., help="a shipped name (e.g. smollm2-dms8) or a local model folder"),
    out: Path = typer.Argument(..., help="folder to write: config.json + safetensors + tokenizer (new or empty)"),
    force: bool = typer.Option(False, "--force", help="write into OUT although it holds files (same-named ones are replaced)"),
):
    """Write a full standard HF folder (for AutoModelForCausalLM and other tools; DMS settings stay in config.json)."""
    from .loading import load, quiet_transformers

    if any(out_folder(out, "OUT").iterdir()) and not force:
        raise KVShrinkError(f"{out} is not empty: export into a new or empty folder, or pass --force to write beside its files")
    m, tok = load(model, device="cpu", dtype="float32")
    with quiet_transformers():
        m.save_pretrained(out)
        tok.save_pretrained(out)
    print(out)


@app.command()
def compare(
    model_a: str = typer.Argument(..., help="first model (e.g. smollm2)"),
    model_b: str = typer.Argument(..., help="second model (e.g. smollm2-dms8)"),
    text: Path = typer.Option(..., "--text", help="a text file: its first --prompt-tokens tokens are the prompt"),
    prompt_tokens: int = typer.Option(1024, help="prompt length in tokens"),
    max_new_tokens: int = typer.Option(64, help="greedy tokens to generate"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Continue the same passage with two models (each with its default cache policy) and compare."""
    from .compare import compare as run

    result = run(model_a, model_b, text, prompt_tokens, max_new_tokens, device)
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
    model: str = typer.Argument(..., help="a DMS model: a shipped name (e.g. smollm2-dms8) or a local folder"),
    text: Optional[Path] = typer.Option(None, "--text", help="a text file (default: the held-out half of the Python docs)"),
    task: Optional[str] = typer.Option(None, help="arith | vt | niah | hops: held-out prompts instead of text, with the facts-vs-filler figures"),
    problems: int = typer.Option(6, help="task prompts (--task)"),
    seed: int = typer.Option(0, help="problem seed (--task; held out below 1,000,000)"),
    difficulty: Optional[int] = typer.Option(None, help="task difficulty (--task; default: the task's default)"),
    sequences: int = typer.Option(3, help="text windows (--text or the default text)"),
    seq_len: int = typer.Option(2048, help="tokens per text window, at most the model's context"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """How a DMS model decides: per-(layer, head) flag rates, heads that evict token 0, the share of decisions
    a training gradient can still move, all-keep and window-only heads, and on tasks whether facts are kept
    more than filler (definitions: `kvshrink.dms.diagnostics`)."""
    from .dms.diagnostics import inspect_decisions, task_sequences, text_sequences
    from .loading import load
    from .prompts import read_text_file
    from .tasks import make_problems

    if text is not None and task is not None:
        raise KVShrinkError("give --text FILE or --task NAME, not both")
    if task is not None:
        difficulty = make_problems(task, problems, seed=seed, difficulty=difficulty)[0].difficulty  # checks them
    if sequences < 1 or seq_len < 2:
        raise KVShrinkError(f"--sequences must be >= 1 and --seq-len >= 2 (got {sequences} and {seq_len})")
    content = read_text_file(text) if text is not None else None
    m, tok = load(model, device=device)
    facts = None
    if task is not None:
        ids, facts = task_sequences(tok, task, problems, seed=seed, difficulty=difficulty)
        source = {"task": task, "problems": problems, "seed": seed, "difficulty": difficulty}
    else:
        from .corpora import pydoc_split

        limit = getattr(m.config, "max_position_embeddings", None) or seq_len
        ids = text_sequences(tok, pydoc_split()[1] if content is None else content, sequences, min(seq_len, limit))
        source = {"text": str(text) if text is not None else "pydoc held-out", "sequences": len(ids)}
    source["tokens"] = [len(s) for s in ids]
    result = {"model": model, "source": source, **inspect_decisions(m, ids, facts)}
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    from .dms.diagnostics import summary_rows

    what = f"{source['problems']} {task} prompts" if task else f"{len(ids)} x {max(source['tokens']):,} tokens of {source['text']}"
    summary = Table(title=f"{model}: eviction decisions on {what}")
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
    quick: bool = typer.Option(False, help="2 vt problems, no real-text section (a smoke test)"),
    models: Optional[str] = typer.Option(None, help="comma-separated models for the task table (default: tiny, tiny-dms4, tiny-dms8)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks (default: all)"),
    problems: int = typer.Option(8, help="held-out problems per task"),
    text_models: Optional[str] = typer.Option(None, help="two models for the real-text section (default: smollm2,smollm2-dms8)"),
    out: Path = typer.Option(Path("demo-output"), help="where the PNG and JSON go"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """The main job: task accuracy and KV cost of a model and its DMS retrofits, then vanilla vs DMS on real text.

    On your own model: retrofit it (`kvshrink retrofit MODEL --out DIR`), then
    `kvshrink demo --models MODEL,DIR --text-models MODEL,DIR`. Any local HF folder or shipped name works.
    """
    from .demo import run_demo

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    text = split(text_models)
    if text is not None and len(text) != 2:
        raise KVShrinkError("--text-models takes exactly two models, e.g. smollm2,smollm2-dms8")
    run_demo(split(models), split(tasks), problems, quick, text, out, device)


def main() -> None:
    """Bad input ends in one line and exit code 2, click's usage errors included (it would draw them in a box);
    anything unexpected in one line and exit code 1, with the traceback only when KVSHRINK_DEBUG=1 (for bug
    reports)."""
    try:
        code = app(prog_name="kvshrink", standalone_mode=False)  # click's errors come back here
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
