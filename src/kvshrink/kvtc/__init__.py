"""KVTC: transform coding of a whole KV cache for compact storage (between turns, on disk, over the wire).

Staniszewski & Łańcucki, "KV Cache Transform Coding for Compact Storage in LLM Inference", ICLR 2026
(arXiv 2511.01815). Decoding always runs on the decompressed cache: attention is unchanged.

Pipeline, per cache:
1. keys lose their RoPE (`rope`), so their low-rank structure shows;
2. each token's keys over all layers and KV heads form one vector, values another (`pca`);
3. vectors are centred and projected on a PCA basis fitted once per model (`calibration`);
4. an exact dynamic program (`allocate`) has chosen, per compression ratio, which leading components
   get int2, int4, fp8 or nothing, in groups sharing an fp16 shift and scale, from errors measured on
   calibration data (`quant`);
5. codes are packed and entropy-coded (zstd or DEFLATE); the 4 sink tokens and the 128 most recent
   tokens bypass all of this (`codec`).

    calib = Calibration.fit(ModelIdentity.from_model(model), key_rows, value_rows, ratios=(16,))
    blob = compress(keys, values, calib, 16, cos, sin)
    keys, values, _ = decompress(blob, calib, cos, sin)

Around the codec: `cache_io` moves one sequence between a `KVCache` and that layout (`export_cache`,
`restore_cache`, and `pack_cache` for blob + DMS flags); `store.PrefixStore` keeps compressed prefixes on
disk; `prefix.generate_with_prefix_store` restores them instead of prefilling; `fit.calibrate` fits a model's
calibration. KVTC's accuracy study is `kvshrink.evaluation.kvtc`.
"""

from .allocate import GROUP_SIZES, Group, Plan, allocate, budget_bits
from .cache_io import CacheState, cos_sin, export_cache, pack_cache, restore_cache, unpack_cache
from .calibration import Calibration, ModelIdentity
from .codec import SINKS, WINDOW, KVLayers, blob_stats, compress, decompress
from .errors import KVTCFormatError
from .pca import PCABasis, cache_features
from .prefix import generate_with_prefix_store
from .quant import dequantize, fake_quant, pack, quantize, unpack
from .rope import redo_rope, rope_tables, undo_rope
from .store import PrefixStore

__all__ = [
    "compress", "decompress", "blob_stats", "KVLayers", "SINKS", "WINDOW", "Calibration", "ModelIdentity",
    "PCABasis", "cache_features", "allocate", "budget_bits", "Plan", "Group", "GROUP_SIZES", "quantize",
    "dequantize", "fake_quant", "pack", "unpack", "undo_rope", "redo_rope", "rope_tables", "KVTCFormatError",
    "CacheState", "export_cache", "restore_cache", "cos_sin", "pack_cache", "unpack_cache", "PrefixStore",
    "generate_with_prefix_store",
]
