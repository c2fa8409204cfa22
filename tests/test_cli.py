"""The CLI and the Python API on a real local HF folder: JSON contract and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvshrink
from conftest import run_cli


def test_generate_json_matches_python_api(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run_cli(["generate", str(tiny_model_dir), "w5 w9 w13 w40 w2", "--max-new-tokens", "6", "--json"], capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out)
    model, tok = kvshrink.load(tiny_model_dir)
    api = kvshrink.generate(model, tok, "w5 w9 w13 w40 w2", max_new_tokens=6)
    assert payload["tokens"] == api.tokens and payload["texts"] == api.texts
    for key in ("prompt_tokens", "generated_tokens", "kv_reads", "prefill_kv_reads", "peak_kv_tokens", "cache_bytes",
                "compression_ratio", "seconds"):
        assert key in payload["stats"]
    assert payload["stats"]["compression_ratio"] == pytest.approx(1.0)


def test_unsupported_family(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    code, _, err = run_cli(["generate", str(tmp_path), "hello"], capsys, monkeypatch)
    assert code == 2 and "unsupported model family 'gpt2'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cr", "0.5"], "--cr must be >= 1"),
        (["--window", "-1"], "--window must be >= 0"),
        (["--sinks", "-1"], "--sinks must be >= 0"),
        (["--sinks", "4"], "--sinks is a DMS setting"),
        (["--policy", "magic"], "unknown policy 'magic'"),
        (["--policy", "dms"], "kvshrink retrofit"),
    ],
)
def test_bad_options_exit_2(tiny_model_dir, capsys, monkeypatch, extra, message):
    code, _, err = run_cli(["generate", str(tiny_model_dir), "w1 w2", *extra], capsys, monkeypatch)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_folder_and_empty_prompt(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["generate", str(tmp_path / "nope"), "hi"], capsys, monkeypatch)
    assert code == 2 and "not found" in err
    code, _, err = run_cli(["generate", str(tiny_model_dir), "   "], capsys, monkeypatch)
    assert code == 2 and "empty prompt" in err


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    """The installed `python -m kvshrink` entry point, end to end."""
    proc = subprocess.run([sys.executable, "-m", "kvshrink", "generate", str(tmp_path / "missing"), "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch):
    """Emulated bf16 matmuls ran 43x slower than fp32 on an AVX2 CPU: asking for them there gets a warning."""
    import warnings

    import torch

    from kvshrink import loading

    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--dtype bfloat16 on this CPU.*use --dtype float32"):
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
        assert loading.resolve_dtype("auto", cpu) == torch.float32 and loading.resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(kvshrink.KVShrinkError, match="unknown dtype"):
        loading.resolve_dtype("float8", cpu)


def escaping_inputs(model, tmp_path):
    """(case, argv, what the one line must say): inputs that once ended in exit 1 "unexpected", a traceback,
    a silent exit 0, or a message that named the wrong source or fix (issue 29)."""
    import shutil

    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("caf\xe9 w1 w2".encode("latin-1"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    no_tokenizer, bad_config = tmp_path / "no-tokenizer", tmp_path / "bad-config"
    shutil.copytree(model, bad_config)
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, no_tokenizer / name)
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "dms_window_size": -3}))
    m = str(model)
    return [
        ("temperature nan", ["generate", m, "w1 w2", "--temperature", "nan"], "--temperature must be a number >= 0"),
        ("non-UTF-8 prompt", ["generate", m, "w1 \udcff w2"], "not UTF-8 text (a stray byte at character 3); pass it in UTF-8"),
        ("non-UTF-8 --text", ["compare", m, m, "--text", str(bad_text)], "give a UTF-8 text file"),
        ("retrofit --out a file", ["retrofit", m, "--out", str(a_file), "--data", str(bad_text)], "name a new or writable folder"),
        ("export under a file", ["export", m, str(a_file / "sub")], "name a new or writable folder"),
        ("export unwritable", ["export", m, "/sys/kvshrink-export"], "name a new or writable folder"),
        ("export non-empty", ["export", m, str(full)], "pass --force"),
        ("serve --max-batch 0", ["serve", m, "--max-batch", "0"], "--max-batch must be >= 1"),
        ("serve --port 70000", ["serve", m, "--port", "70000"], "--port must be in 1..65535"),
        ("config dms_window_size -3", ["generate", str(bad_config), "w1"], "bad-config/config.json: dms_window_size must be >= 0"),
        ("no tokenizer", ["generate", str(no_tokenizer), "w1"], "has no tokenizer that loads"),
        ("empty model name", ["generate", "", "w1"], "the model name is empty: give a local Hugging Face model folder"),
        ("not an integer", ["generate", m, "w1", "--max-new-tokens", "abc"], "'--max-new-tokens'"),
        ("option without its value", ["generate", m, "w1", "--policy"], "'--policy' requires an argument"),
        ("unknown option", ["generate", m, "w1", "--bogus"], "No such option: --bogus; see kvshrink generate --help"),
        ("missing argument", ["generate", m], "Missing argument 'PROMPT'; see kvshrink generate --help"),
        ("missing option", ["kvtc", "eval", m], "Missing option '--calibration'; see kvshrink kvtc eval --help"),
    ]


def test_escaping_inputs_exit_2_in_one_line(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """Each case: exit code 2 and one line in all (stdout and stderr, at the file descriptors: transformers'
    own log lines would show), the one that names the source and the fix."""
    cases = escaping_inputs(tiny_model_dir, tmp_path)
    escaped = []
    for case, args, message in cases:
        code, out, err = run_cli(args, capfd, monkeypatch)
        lines = (out + err).strip().splitlines()
        if code != 2 or len(lines) != 1 or message not in lines[0] or not lines[0].startswith("error: "):
            escaped.append((case, code, lines))
    print(f"{len(cases)} CLI cases tried, {len(cases) - len(escaped)} handled (exit 2, one line, the fix named)")
    assert not escaped, escaped
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]  # refused: nothing written beside it


def test_export_with_force_writes_beside_files_and_quietly(tiny_model_dir, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run_cli(["export", str(tiny_model_dir), str(out), "--force"], capfd, monkeypatch)
    assert code == 0 and stdout.strip() == str(out) and err == "", err  # no progress bars from transformers
    assert (out / "notes.txt").read_text() == "mine"
    kvshrink.load(out)


def test_training_options_are_the_settings_fields():
    """The training commands ask every field of their settings dataclass, with its default, help and metavar, so a
    new field is a new option; the zoo's former retrofit defaults are a --profile, not a second command."""
    import dataclasses

    import typer.main

    from kvshrink.cli import app
    from kvshrink.train.finetune import FinetuneConfig
    from kvshrink.train.retrofit import PROFILES, RetrofitConfig

    root = typer.main.get_command(app)
    zoo = root.commands["zoo"].commands
    for command, cls in ((root.commands["retrofit"], RetrofitConfig), (zoo["finetune"], FinetuneConfig)):
        params = {p.name: p for p in command.params}
        for f in dataclasses.fields(cls):
            p = params[f.name]
            assert p.help == f.metadata["help"] and p.help, f.name
            assert p.required == (f.default is dataclasses.MISSING), f.name
            assert p.required or p.default == (None if f.name == "export_at" else f.default), f.name
    assert params["dtype"].metavar == "DTYPE" and zoo["retrofit"].hidden
    fields = {f.name for f in dataclasses.fields(RetrofitConfig)}
    assert all(set(settings) <= fields for _, settings in PROFILES.values())


@pytest.fixture
def retrofit_settings(monkeypatch):
    """The RetrofitConfig `kvshrink retrofit ...` builds, caught before any training."""
    from kvshrink.train import retrofit as module

    seen = []
    monkeypatch.setattr(module, "retrofit", lambda cfg: seen.append(cfg) or {})
    return seen


def test_profile_fills_only_the_options_left_at_their_defaults(retrofit_settings, capsys, monkeypatch):
    code, _, err = run_cli(["retrofit", "smollm2", "--profile", "release", "--out", "o", "--data", "pydoc", "--steps", "10"],
                           capsys, monkeypatch)
    assert code == 0, err
    cfg = retrofit_settings[-1]
    assert (cfg.steps, cfg.window, cfg.train, cfg.lr, cfg.export_at, cfg.batch_size, cfg.seq_len) == (10, 64, "adapter", 3e-5, (4.0, 8.0), 32, 2048)
    code, _, err = run_cli(["retrofit", "smollm2", "--out", "o", "--data", "pydoc"], capsys, monkeypatch)
    assert code == 0 and retrofit_settings[-1].window == 256 and retrofit_settings[-1].train == "all"  # the paper: the defaults
    code, _, err = run_cli(["retrofit", "smollm2", "--profile", "magic", "--out", "o", "--data", "pydoc"], capsys, monkeypatch)
    assert code == 2 and "unknown --profile 'magic'" in err and "release" in err


def test_renamed_options_still_work_with_a_note(retrofit_settings, capsys, monkeypatch):
    code, _, err = run_cli(["retrofit", "m", "--out", "o", "--data", "d", "--bf16"], capsys, monkeypatch)
    assert code == 0 and retrofit_settings[-1].dtype == "bfloat16" and "--bf16 is deprecated: use --dtype bfloat16" in err
    code, _, err = run_cli(["zoo", "retrofit", "tiny", "--out", "o", "--window", "16"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "kvshrink retrofit MODEL --profile cpu-tasks" in err
    code, _, err = run_cli(["retrofit", "m", "--out", "o"], capsys, monkeypatch)
    assert code == 2 and "Missing option '--data'" in err  # required, and marked so in --help


def test_version_and_the_shipped_models(capsys, monkeypatch):
    from kvshrink.zoo import shipped_names

    code, out, _ = run_cli(["--version"], capsys, monkeypatch)
    assert code == 0 and out.strip() == f"kvshrink {kvshrink.__version__}"
    code, out, _ = run_cli(["models", "--json"], capsys, monkeypatch)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["name"] for r in rows] == shipped_names()
    assert all(r["headline"] for r in rows), [r["name"] for r in rows if not r["headline"]]  # written from the records
    assert {r["name"]: r["cr"] for r in rows}["smollm2-dms8"] == 8


def _cli_commands():
    from kvshrink.cli import _commands, command

    return [(path, cmd) for path, cmd in _commands(command(), hidden=False) if not getattr(cmd, "commands", None)]


def test_one_vocabulary_across_commands():
    """A model argument is MODEL and takes shipped names, every command that loads one takes --device/--dtype,
    task options are --tasks and --problems, every boolean has its --no- form, every value a metavar."""
    for path, cmd in _cli_commands():
        params = {p.name: p for p in cmd.params}
        loads = [p for p in cmd.params if p.param_type_name == "argument" and p.metavar == "MODEL"]
        for p in loads:
            assert "shipped name" in p.help or "first model" in p.help or "second model" in p.help, path
        if loads and path != "kvshrink export":  # export always writes from the CPU
            assert {"device", "dtype"} <= set(params), path
        assert "task" not in params, path
        if "problems" in params:
            assert "tasks" in params and "problems per task" in params["problems"].help, path
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.metavar or (p.is_flag and p.secondary_opts), (path, p.name)  # --x/--no-x


def test_readme_synopsis_is_the_help(monkeypatch):
    """The README's synopsis block is `kvshrink.cli.synopsis()`, and each of its lines lists exactly the options and
    metavars that `kvshrink COMMAND --help` shows (terminal width fixed, so rich does not wrap them away)."""
    import re
    from pathlib import Path

    from typer.testing import CliRunner

    from kvshrink.cli import app, synopsis

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- synopsis: .*? -->\n```\n(.*?)```", readme, re.S)
    assert block and block[1].rstrip("\n") == synopsis(), (
        "the README's synopsis drifted from the CLI: paste in the output of\n"
        "    python -c 'from kvshrink.cli import synopsis; print(synopsis())'")
    blocks = re.split(r"\n(?! )", synopsis())
    for path, cmd in _cli_commands():
        line = " ".join(next(b for b in blocks if b == path or b.startswith(path + " ")).split())
        listed = dict(re.findall(r"(--[a-z][\w-]*)(?: ([A-Z][A-Z_]*))?", line))
        shown = CliRunner().invoke(app, [*path.split()[1:], "--help"], env={"COLUMNS": "250"}).output
        rows = re.findall(r"^\W (?:[* ] {0,4})?(--[a-z][\w-]*)(?:\s+--no-[\w-]+)?\s+(\S+)", shown, re.M)  # the options table
        assert {o: m for o, m in rows if o != "--help"} == {o: m or "<bool>" for o, m in listed.items()}, path
