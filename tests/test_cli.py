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
        ("missing argument", ["generate", m], "Missing argument 'prompt'; see kvshrink generate --help"),
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
    """The training commands ask every field of their settings dataclass, with its default and help, so a new
    field is a new option; `zoo retrofit` asks all but those its recipe fixes, with its own defaults."""
    import dataclasses

    import typer.main

    from kvshrink.cli import app
    from kvshrink.train.finetune import FinetuneConfig
    from kvshrink.train.retrofit import RetrofitConfig

    root = typer.main.get_command(app)
    zoo = root.commands["zoo"].commands
    for command, cls, fixed in ((root.commands["retrofit"], RetrofitConfig, set()), (zoo["finetune"], FinetuneConfig, set()),
                                (zoo["retrofit"], RetrofitConfig, {"train", "decision", "neuron_decay"})):
        params = {p.name: p for p in command.params}
        for f in dataclasses.fields(cls):
            assert (f.name in params) == (f.name not in fixed), (command.name, f.name)
            if f.name in params and command is not zoo["retrofit"]:
                p = params[f.name]
                assert p.help == f.metadata["help"] and p.help, f.name
                assert p.required == (f.default is dataclasses.MISSING), f.name
                assert p.required or p.default == (None if f.name == "export_at" else f.default), f.name
    zoo_params = {p.name: p for p in zoo["retrofit"].params}
    assert (zoo_params["window"].default, zoo_params["model"].default, "pack" in zoo_params) == (16, "tiny", True)
