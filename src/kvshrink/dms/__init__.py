"""DMS (Dynamic Memory Sparsification): its settings, retention decisions, the delayed-eviction mask, the signals
of a training forward, diagnostics.

Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression", arXiv 2506.05345.
Putting it into a model is `kvshrink.attach`, above the core; this package imports nothing of the core.
"""

from .config import DMSConfig
from .signals import TrainSignals

__all__ = ["DMSConfig", "TrainSignals"]
