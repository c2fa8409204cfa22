"""kvshrink: shrink the KV cache of Hugging Face decoders (DMS retrofits, eviction baselines, KV transform coding).

    import kvshrink
    model, tok = kvshrink.load("path/to/hf-model")
    out = kvshrink.generate(model, tok, "Once upon a time", policy="none", max_new_tokens=32)
    print(out.texts[0], out.stats["kv_reads"], out.stats["compression_ratio"])
"""

from .attention import install
from .cache import KVCache
from .attach import DMSCache, attach_dms, dms_config
from .dms.config import DMSConfig
from .errors import KVShrinkError
from .generation import GenerationResult, generate
from .loading import load

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "GenerationResult", "install", "KVCache", "DMSCache", "DMSConfig", "attach_dms",
    "dms_config", "KVShrinkError",
]
