"""The wheel carries every file a shipped model needs (a non-editable install must load them all)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_shipped_model_file(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                            "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("kvshrink-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    models = ROOT / "src" / "kvshrink" / "zoo" / "models"
    shipped = {"kvshrink/" + str(p.relative_to(ROOT / "src" / "kvshrink")) for p in models.rglob("*") if p.is_file()}
    assert shipped and not shipped - packed, sorted(shipped - packed)[:5]
    assert any(name.endswith("tiny/lora/adapter_model.safetensors") for name in packed)  # the file the first glob missed
