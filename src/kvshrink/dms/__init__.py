"""DMS (Dynamic Memory Sparsification): its settings, retention decisions, the delayed-eviction mask, diagnostics.

Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression", arXiv 2506.05345.
Putting it into a model is `kvshrink.attach`, above the core; this package imports nothing of the core.
"""

from .config import DMSConfig

__all__ = ["DMSConfig"]
