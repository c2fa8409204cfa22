"""DMS (Dynamic Memory Sparsification): retention decisions, the delayed-eviction mask, and attaching them.

Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression", arXiv 2506.05345.
`kvshrink.dms.attach` (attach_dms, DMSCache) is imported lazily by `kvshrink` to avoid an import cycle
with `kvshrink.attention`.
"""

from .config import DMSConfig

__all__ = ["DMSConfig"]
