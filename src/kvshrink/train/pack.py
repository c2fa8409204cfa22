"""Packing a finished run into a model folder that `kvshrink.load` takes by path, or by name once it sits in
the zoo's `models/` (`kvshrink.zoo`): a manifest, the adapter (never the base weights) and a model card.

The run's logs and settings (metrics.jsonl, retrofit.json / finetune.json, export.json, earlier-stage.md: the
card of the model a second stage started from) are not part of a
model: `provenance`, when given, is the folder they are copied to (the repository keeps them in
`docs/results/zoo/<name>/`), with the run's own folder paths shown as `runs/...`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..dms.config import DMSConfig
from ..errors import KVShrinkError
from ..zoo import MANIFEST
from .cards import finetune_card, retrofit_card


def dms_adapter_tensors(folder: Path) -> dict:
    """The eviction-adapter tensors (`dms_proj_alpha*`) of a retrofit folder or a packed DMS model."""
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".dms_proj_alpha" in k})
    return tensors


def pack_adapter(run_dir: Path, dest: Path, base: str, provenance: Path | None = None) -> Path:
    """Copy a retrofit output's DMS settings and adapter tensors (not the base weights) to `dest`."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = DMSConfig.from_hf(type("C", (), config)())
    if cfg is None or cfg.decision != "adapter":
        raise KVShrinkError(f"{run_dir} is not an adapter-DMS model; only adapters are packed")
    tensors = dms_adapter_tensors(run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "dms_adapter.safetensors"))
    (dest / MANIFEST).write_text(json.dumps({"base": base, "dms": cfg.as_dict()}, indent=1))
    if (Path(run_dir) / "retrofit.json").is_file():
        (dest / "README.md").write_text(retrofit_card(dest.name, Path(run_dir), base))
    _copy_provenance(run_dir, provenance, ("metrics.jsonl", "retrofit.json", "export.json", "earlier-stage.md"))
    return dest


def pack_exports(run_dir: Path, dest: Path, base: str, provenance: Path | None = None) -> list[Path]:
    """Each model a ramp saved as it passed a CR (--export-at: RUN/cr-<CR>) packed like a finished run, to
    `dest`-dms<CR> (logs to `provenance`-dms<CR>): its card states the steps up to its own, not the run's."""
    run_dir, packed = Path(run_dir), []
    for export in sorted(run_dir.glob("cr-*")):
        if not export.is_dir() or export.name.endswith(".tmp"):
            continue
        step = json.loads((export / "export.json").read_text())["step"]
        rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
        (export / "metrics.jsonl").write_text("\n".join(rows) + "\n")
        shutil.copy(run_dir / "retrofit.json", export / "retrofit.json")
        suffix = f"-dms{export.name[3:]}"
        target = dest.with_name(dest.name + suffix)
        packed.append(pack_adapter(export, target, base, provenance and provenance.with_name(provenance.name + suffix)))
    return packed


def pack_lora(run_dir: Path, dest: Path, base: str, provenance: Path | None = None) -> Path:
    """Ship a fine-tune (`train.finetune`): its LoRA folder and a manifest naming the base."""
    src = Path(run_dir) / "lora"
    if not (src / "adapter_config.json").is_file():
        raise KVShrinkError(f"{run_dir} has no finished LoRA adapter (lora/adapter_config.json); finish or resume the run")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest / "lora", dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))  # peft boilerplate
    adapter_config = json.loads((dest / "lora" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base  # not the folder it happened to load from
    (dest / "lora" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (dest / MANIFEST).write_text(json.dumps({"base": base, "lora": "lora"}, indent=1))
    if (Path(run_dir) / "finetune.json").is_file():
        (dest / "README.md").write_text(finetune_card(dest.name, Path(run_dir)))
    _copy_provenance(run_dir, provenance, ("metrics.jsonl", "finetune.json", "earlier-stage.md"))
    return dest


def _copy_provenance(run_dir: Path, provenance: Path | None, files: tuple[str, ...]) -> None:
    if provenance is None:
        return
    provenance.mkdir(parents=True, exist_ok=True)
    runs = str(Path(run_dir).resolve().parent) + "/"
    for name in files:
        if (Path(run_dir) / name).exists():
            (provenance / name).write_text((Path(run_dir) / name).read_text().replace(runs, "runs/"))
