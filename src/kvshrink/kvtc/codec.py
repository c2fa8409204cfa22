"""KVTC's codec: one cache (all layers, batch 1) <-> one self-checking blob (paper §3, Fig. 1).

Along the tokens a cache is [sinks | middle | window]. The first `sinks` tokens (attention sinks, 4)
are kept in fp8 with a per-vector shift/scale and the last `window` tokens (128) as-is in 16 bits:
compressing either costs accuracy (paper Table 6, 13). Only the middle is transform-coded: keys lose
their RoPE, both streams are centred and projected on the calibration basis, each plan group is
quantized per token, the codes are packed component-major in one stream per (kind, size) (runs of
one component across tokens suit LZ77), and everything is entropy-coded with zstd, or zlib's DEFLATE
(the paper's coder) where zstandard is not installed.

For a DMS cache, `live` marks evicted (layer, head, token) slots: they are filled with the calibration
mean (zero in PCA coordinates), the mask travels in the blob, and they come back as zeros.

Blob: b"KVTC" | version | blake2b-128 of the body | body = header | sinks K, V | window K, V |
live bits | entropy-coded middle. A blob that fails any check raises KVTCFormatError.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

from ..errors import KVShrinkError
from .allocate import Plan
from .calibration import Calibration, ModelIdentity
from .errors import KVTCFormatError
from .pca import features, from_features, token_features
from .quant import dequantize, from_bytes, pack, packed_bytes, quantize, to_bytes, unpack
from .rope import redo_rope

try:
    import zstandard
except ImportError:  # optional: DEFLATE compresses about as well (paper Table 14)
    zstandard = None
_ZSTD_ERROR = zstandard.ZstdError if zstandard else ValueError

SINKS, WINDOW = 4, 128
MAGIC, VERSION = b"KVTC", 1
ZLIB, ZSTD = 0, 1
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFIX = len(MAGIC) + 1 + 16  # magic, version, checksum


class _Header(NamedTuple):
    calibration: bytes  # Calibration.digest
    cr: float
    layers: int
    heads: int
    head_dim: int
    tokens: int
    sinks: int
    window: int
    dtype: int  # index in DTYPES
    coder: int  # ZLIB or ZSTD
    masked: int  # 1 if a live mask follows the window
    middle_bytes: int  # size of the middle before entropy coding


_HEADER = struct.Struct("<8sdHHHIIIBBBI")


class KVLayers(NamedTuple):
    keys: list[torch.Tensor]  # per layer (1, Hkv, T, D), post-RoPE
    values: list[torch.Tensor]
    live: list[torch.Tensor] | None  # per layer (Hkv, T) bool, for DMS caches


def compress(keys, values, calib: Calibration, cr: float, cos: torch.Tensor, sin: torch.Tensor, live=None,
             sinks: int = SINKS, window: int = WINDOW) -> bytes:
    """keys (post-RoPE), values: per layer (1, Hkv, T, D); cos, sin: (1, T, D) or (T, D) for the tokens'
    positions (see `rope_tables`); live: optional per layer (Hkv, T) bool, False = evicted.
    cr must be one of the calibration's ratios. Returns the blob."""
    K, V = _stack(keys, calib.identity), _stack(values, calib.identity)
    if K.shape != V.shape or K.dtype != V.dtype:
        raise KVShrinkError(f"keys {tuple(K.shape)} {K.dtype} and values {tuple(V.shape)} {V.dtype} differ")
    L, H, T, D = K.shape
    cos, sin = _tables(cos, sin, T, D)
    s = min(sinks, T)
    w = min(window, T - s)
    mid = slice(s, T - w)
    key_plan, value_plan = calib.plan(cr)
    mask = None if live is None else _stack_live(live, (L, H, T))

    kf, vf = features(K[:, :, mid], V[:, :, mid], cos[:, mid], sin[:, mid])  # (T_mid, p)
    if mask is not None:
        dead = ~token_features(mask[:, :, mid, None].expand(-1, -1, -1, D))
        kf, vf = torch.where(dead, calib.keys.mean, kf), torch.where(dead, calib.values.mean, vf)
    middle = _encode_middle(calib.keys, key_plan, kf) + _encode_middle(calib.values, value_plan, vf)
    coder, coded = _entropy_encode(middle)

    header = _HEADER.pack(calib.digest, float(cr), L, H, D, T, s, w, DTYPES.index(K.dtype), coder, mask is not None, len(middle))
    wdtype = _window_dtype(K.dtype)
    body = b"".join([header, _encode_sinks(K[:, :, :s]), _encode_sinks(V[:, :, :s]),
                     to_bytes(K[:, :, T - w:].to(wdtype)), to_bytes(V[:, :, T - w:].to(wdtype)),
                     b"" if mask is None else np.packbits(mask.numpy().reshape(-1)).tobytes(), coded])
    return MAGIC + bytes([VERSION]) + checksum(body) + body


def decompress(blob: bytes, calib: Calibration, cos: torch.Tensor, sin: torch.Tensor) -> KVLayers:
    """Inverse of `compress`; cos, sin must be for the same positions as when compressing."""
    h, body = _open(blob)
    ident = calib.identity
    if h.calibration != calib.digest or (h.layers, h.heads, h.head_dim) != (ident.layers, ident.kv_heads, ident.head_dim):
        raise KVTCFormatError("this KVTC blob was written with a different calibration")
    key_plan, value_plan = calib.plan(h.cr)
    L, H, T, D, s, w = h.layers, h.heads, h.tokens, h.head_dim, h.sinks, h.window
    mid = slice(s, T - w)
    if h.middle_bytes != _middle_bytes(key_plan, T - s - w) + _middle_bytes(value_plan, T - s - w):
        raise KVTCFormatError("KVTC blob's middle does not match its calibration's plan")
    cos, sin = _tables(cos, sin, T, D)

    Ks, Vs = _decode_sinks(body, (L, H, s, D)), _decode_sinks(body, (L, H, s, D))
    wdtype = _window_dtype(DTYPES[h.dtype])
    Kw, Vw = (from_bytes(body.take(L * H * w * D * 2), wdtype, (L, H, w, D)) for _ in range(2))
    mask = None
    if h.masked:
        bits = np.unpackbits(np.frombuffer(body.take(_mask_bytes(h)), dtype=np.uint8), count=L * H * T)
        mask = torch.from_numpy(bits.astype(bool)).reshape(L, H, T)
    middle = _Reader(_entropy_decode(h.coder, body.rest(), h.middle_bytes))
    kf = _decode_middle(calib.keys, key_plan, middle, T - s - w)
    vf = _decode_middle(calib.values, value_plan, middle, T - s - w)
    Km = redo_rope(from_features(kf, L, H, D), cos[:, mid], sin[:, mid])
    Vm = from_features(vf, L, H, D)

    dtype = DTYPES[h.dtype]
    K = torch.cat([Ks.to(dtype), Km.to(dtype), Kw.to(dtype)], dim=2)  # (L, H, T, D)
    V = torch.cat([Vs.to(dtype), Vm.to(dtype), Vw.to(dtype)], dim=2)
    if mask is not None:
        K, V = K.masked_fill(~mask[..., None], 0), V.masked_fill(~mask[..., None], 0)
    return KVLayers(list(K.split(1)), list(V.split(1)), None if mask is None else list(mask.unbind(0)))


def blob_stats(blob: bytes) -> dict:
    """Sizes and ratios of a (checked) blob against fp16 storage: whole cache, and the compressed middle
    alone (the paper's headline ratio, which leaves the window out)."""
    h, body = _open(blob)
    L, H, T, D = h.layers, h.heads, h.tokens, h.head_dim
    middle_tokens = T - h.sinks - h.window
    middle = len(body.rest()) - 2 * _sinks_bytes(h) - 2 * L * H * h.window * D * 2 - _mask_bytes(h)
    fp16_per_token = 2 * L * H * D * 2  # K and V
    return {"tokens": T, "compressed_tokens": middle_tokens, "cr": h.cr, "bytes": len(blob), "middle_bytes": middle,
            "ratio": fp16_per_token * T / len(blob),
            "middle_ratio": fp16_per_token * middle_tokens / middle if middle_tokens else None,
            "coder": "zstd" if h.coder == ZSTD else "zlib"}


# -- the middle: PCA coordinates, quantized group by group -------------------------------------------------
def _encode_middle(basis, plan: Plan, x: torch.Tensor) -> bytes:
    d = basis.project(x, plan.rank)  # (T, r)
    out = []
    for kind, _, idx in plan.buckets():
        codes, shift, scale = quantize(d[:, idx], kind)  # (T, G, s), (T, G), (T, G)
        out += [to_bytes(shift.T), to_bytes(scale.T), pack(codes.permute(1, 2, 0), kind)]  # component-major
    return b"".join(out)


def _decode_middle(basis, plan: Plan, reader: _Reader, T: int) -> torch.Tensor:
    d = torch.zeros(T, plan.rank)  # components inside the rank that got no bits stay 0 (the mean)
    for kind, size, idx in plan.buckets():
        G = idx.shape[0]
        shift = from_bytes(reader.take(2 * G * T), torch.float16, (G, T)).T
        scale = from_bytes(reader.take(2 * G * T), torch.float16, (G, T)).T
        codes = unpack(reader.take(packed_bytes(G * size * T, kind)), kind, G * size * T)
        d[:, idx] = dequantize(codes.reshape(G, size, T).permute(2, 0, 1), shift, scale, kind)
    return basis.reconstruct(d)


def _middle_bytes(plan: Plan, T: int) -> int:
    return sum(4 * idx.shape[0] * T + packed_bytes(idx.numel() * T, kind) for kind, _, idx in plan.buckets())


# -- sinks: fp8 with a shift/scale per (layer, head, token) vector -----------------------------------------
def _encode_sinks(x: torch.Tensor) -> bytes:
    codes, shift, scale = quantize(x.float(), "fp8")
    return to_bytes(shift) + to_bytes(scale) + to_bytes(codes)


def _decode_sinks(reader: _Reader, shape: tuple[int, int, int, int]) -> torch.Tensor:
    n = shape[0] * shape[1] * shape[2]
    shift = from_bytes(reader.take(2 * n), torch.float16, shape[:3])
    scale = from_bytes(reader.take(2 * n), torch.float16, shape[:3])
    return dequantize(from_bytes(reader.take(n * shape[3]), torch.uint8, shape), shift, scale, "fp8")


def _sinks_bytes(h: _Header) -> int:
    return h.layers * h.heads * h.sinks * (4 + h.head_dim)


def _mask_bytes(h: _Header) -> int:
    return -(-h.layers * h.heads * h.tokens // 8) if h.masked else 0


# -- framing ------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise KVTCFormatError("KVTC blob is shorter than its header says")
        self.pos += n
        return self.buf[self.pos - n: self.pos]

    def rest(self) -> bytes:
        return self.buf[self.pos:]


def checksum(body: bytes) -> bytes:
    """blake2b-128: what blobs and store entries are checked with."""
    return hashlib.blake2b(body, digest_size=16).digest()


def _open(blob: bytes) -> tuple[_Header, _Reader]:
    """Check magic, version and checksum; parse the header. The reader is positioned after it."""
    blob = bytes(blob)
    if len(blob) < _PREFIX + _HEADER.size or blob[:4] != MAGIC:
        raise KVTCFormatError("not a KVTC blob (too short or wrong magic bytes)")
    if blob[4] != VERSION:
        raise KVTCFormatError(f"KVTC blob has format version {blob[4]}; this kvshrink reads version {VERSION}")
    body = blob[_PREFIX:]
    if checksum(body) != blob[5:_PREFIX]:
        raise KVTCFormatError("KVTC blob is corrupted or truncated (checksum mismatch)")
    h = _Header(*_HEADER.unpack_from(body))
    if h.dtype >= len(DTYPES) or h.coder not in (ZLIB, ZSTD) or h.masked > 1 or h.sinks + h.window > h.tokens:
        raise KVTCFormatError("KVTC blob has an invalid header")
    reader = _Reader(body)
    reader.take(_HEADER.size)
    return h, reader


def _entropy_encode(data: bytes) -> tuple[int, bytes]:
    if zstandard is not None:
        return ZSTD, zstandard.ZstdCompressor(level=3).compress(data)
    return ZLIB, zlib.compress(data, 6)


def _entropy_decode(coder: int, data: bytes, size: int) -> bytes:
    if coder == ZSTD and zstandard is None:
        raise KVTCFormatError("this KVTC blob is zstd-compressed: pip install zstandard to read it")
    try:
        if coder == ZSTD:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        else:
            inflate = zlib.decompressobj()
            out = inflate.decompress(data, size + 1)  # + 1: a longer stream shows, and 0 is not "unlimited"
            if not inflate.eof or inflate.unused_data:
                raise ValueError("trailing or missing data")
    except (zlib.error, ValueError, _ZSTD_ERROR) as e:
        raise KVTCFormatError(f"KVTC blob's middle does not decompress ({e})") from None
    if len(out) != size:
        raise KVTCFormatError("KVTC blob's middle has the wrong size")
    return out


# -- input checks ---------------------------------------------------------------------------------------------
def _stack(layers, identity: ModelIdentity) -> torch.Tensor:
    """Per-layer (1, H, T, D) -> (L, H, T, D) on CPU, where the codec runs; refuses another model's cache."""
    shapes = sorted({tuple(x.shape) for x in layers})
    fits = len(layers) == identity.layers and len(shapes) == 1 and len(shapes[0]) == 4 and \
        (shapes[0][0], shapes[0][1], shapes[0][3]) == (1, identity.kv_heads, identity.head_dim)
    if not fits or layers[0].dtype not in DTYPES:
        raise KVShrinkError(f"cache does not fit the KVTC calibration ({identity}): need {identity.layers} layers of "
                            f"(1, {identity.kv_heads}, T, {identity.head_dim}) fp16/bf16/fp32, got {len(layers)} of {shapes}")
    return torch.cat(list(layers)).cpu()


def _stack_live(live, shape: tuple[int, int, int]) -> torch.Tensor:
    if len(live) != shape[0] or any(tuple(m.shape) != shape[1:] for m in live):
        raise KVShrinkError(f"live mask must be {shape[0]} layers of ({shape[1]}, {shape[2]}) bool")
    return torch.stack([m.to(torch.bool).cpu() for m in live])


def _tables(cos: torch.Tensor, sin: torch.Tensor, T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, D) or (T, D) -> (1, T, D) fp32."""
    if cos.shape[-2:] != (T, D) or sin.shape != cos.shape:
        raise KVShrinkError(f"cos/sin must be (1, {T}, {D}) for the cache's positions, got {tuple(cos.shape)}")
    return cos.float().reshape(1, T, D), sin.float().reshape(1, T, D)


def _window_dtype(dtype: torch.dtype) -> torch.dtype:
    """The window is stored as-is when it is 16-bit (bit-exact), as fp16 when it is fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
