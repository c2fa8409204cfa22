"""What a training (or inspecting) forward asks of a DMS model's attention, in one object.

Passed as the model's `dms_signals` keyword: transformers hands unknown keywords down to every attention
layer, and DDP/FSDP pass a dataclass through untouched. Inference passes none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainSignals:
    """teacher: run as the model before DMS (no eviction, the borrowed query channel intact), the
        distillation target when the student shares its weights (--train adapter).
    uniform: (L, B, Hkv, T) U(0, 1) draws for the Gumbel-sigmoid gates in training mode, seeded by the
        trainer so that any number of processes sees the same noise (None: fresh noise).
    collect: a list each layer appends {"layer", "flags", "logits"} to (flags: the decisions as applied,
        straight-through in training), for the compression loss and for diagnostics.
    flex: whole-sequence DMS attention through flex_attention (no T x T mask) where it can run.
    """

    teacher: bool = False
    uniform: torch.Tensor | None = None
    collect: list | None = None
    flex: bool = False
