"""Atomic, resumable training checkpoints: `out/checkpoints/step-N/` folders and a `latest` pointer.

Each checkpoint holds the trainable tensors (safetensors), the optimizer state and the loop state (step,
RNG states). It is written to a temporary folder and renamed, then `latest` is replaced atomically, so
an interrupted write never leaves a checkpoint that loads. `write_atomically` does that for any folder;
`restore` puts a checkpoint back into a run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..errors import KVShrinkError


def write_atomically(folder: Path, write: Callable[[Path], None], commit: str | None = None) -> None:
    """Fill `folder` through `write(tmp)` so that a write killed half-way never leaves a folder that reads as
    complete: `write` fills a temporary folder, which is fsynced and renamed to `folder` (replacing it).

    commit: a file by which readers recognise the folder (an HF model's config.json) when `folder` also holds
    other things and stays (a run folder with its checkpoints). The new files are renamed into it one by one,
    `commit` deleted first and renamed in last: until then, the folder does not load."""
    tmp = folder / ".tmp-write" if commit else folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if commit is None:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return
    (folder / commit).unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == commit):
        f.replace(folder / f.name)
    tmp.rmdir()


class Checkpoints:
    """`out/checkpoints/step-N/` folders, `latest` naming the newest complete one."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoints"

    def resume_point(self, resume: bool, what: str) -> Path | None:
        """The checkpoint to resume from (None: start fresh); refuses to start over an existing run."""
        if not resume and self.latest() is not None:
            raise KVShrinkError(f"{self.dir.parent} already holds a {what}; pass --resume to continue it or choose another --out")
        return self.latest() if resume else None

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not path.is_dir():
            raise KVShrinkError(f"{pointer} names {path.name}, which is missing; delete {pointer} to start over")
        return path

    def save(self, step: int, trainable: dict, optimizer_state: dict) -> Path:
        """Checkpoint `step`, with the RNG states (data and Gumbel noise are seeded by step; anything else
        random, such as dropout, continues as if never stopped)."""
        from safetensors.torch import save_file

        state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}

        name = f"step-{step:06d}"

        def write(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(state, tmp / "state.pt")

        final = self.dir / name
        write_atomically(final, write)
        pointer_tmp = self.dir / ".latest.tmp"
        pointer_tmp.write_text(name)
        pointer_tmp.replace(self.dir / "latest")
        for old in sorted(self.dir.glob("step-*"))[:-2]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path) -> tuple[dict, dict, dict]:
        from safetensors.torch import load_file

        files = {"trainable": path / "trainable.safetensors", "optimizer": path / "optimizer.pt", "state": path / "state.pt"}
        for f in files.values():
            if not f.is_file():
                raise KVShrinkError(f"checkpoint file {f} is missing; delete {path} to resume from the one before")
        try:
            trainable = load_file(str(files["trainable"]))
        except Exception as exc:
            raise KVShrinkError(f"checkpoint file {files['trainable']} is corrupt or truncated ({exc}); delete {path}") from exc
        out = [trainable]
        for key in ("optimizer", "state"):
            try:
                out.append(torch.load(files[key], weights_only=False))
            except Exception as exc:
                raise KVShrinkError(f"checkpoint file {files[key]} is corrupt or truncated ({exc}); delete {path}") from exc
        return tuple(out)


def restore(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], state: dict, path: Path) -> None:
    """Copy a checkpoint's tensors into the run's trainable parameters (by name) and set its RNG states
    back; the optimizer state is the caller's (a sharded run shards it first). Checkpoints of fine-tunes
    from before the RNG was kept have none to set."""
    wrong = sorted(n for n, p in params.items() if n not in tensors or tensors[n].shape != p.shape)
    if wrong:
        raise KVShrinkError(f"checkpoint {path} lacks {len(wrong)} tensors of this run (e.g. {wrong[0]}, or another shape): "
                            "it belongs to another run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
