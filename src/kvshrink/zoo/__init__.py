"""Shipped models: names that `kvshrink.load` resolves without a local folder."""

from .smollm2 import SMOLLM2, smollm2_folder

SHIPPED = {SMOLLM2: smollm2_folder}

__all__ = ["SHIPPED", "SMOLLM2", "smollm2_folder"]
