"""KVTC's codec: one cache (all layers, batch 1) <-> one self-checking blob (paper §3, Fig. 1).

Along the tokens a cache is [sinks | middle | window]. The first `sinks` tokens (attention sinks, 4)
are kept in fp8 with a per-vector shift/scale and the last `window` tokens (128) as-is in 16 bits:
compressing either costs accuracy (paper Table 6, 13). Only the middle is transform-coded: keys lose
their RoPE, both streams are centred and projected on the calibration basis, each plan group is
quantized per token, the codes are packed component-major in one stream per (kind, size) (runs of
one component across tokens suit LZ77), and everything is entropy-coded with zstd, or zlib's DEFLATE
(the paper's coder) where zstandard is not installed.

For a DMS cache, `live` marks evicted (layer, head, token) slots. The mask travels in the blob, so
nothing evicted is stored twice over: the window keeps only its live vectors, middle tokens evicted in
every (layer, head) are left out, and the other middle tokens' evicted slots are filled with the
calibration mean (zero in PCA coordinates), after which each such token's coordinates are fitted to its
live slots alone (`_fit_live`). Evicted slots come back as zeros.

Speed (benchmarks/kvtc_speed.py): the projection and reconstruction matmuls are nearly all the work.
They multiply only the components the plan quantizes, in bfloat16 where the CPU does so natively (see
`_Stream`), on 256-token chunks held token-major in fp32, so that RoPE, centring and layout copies
run on data in cache.

Blob: b"KVTC" | version | blake2b-128 of the body | body = header | sinks K, V | live bits | window K, V
(live vectors only when masked) | entropy-coded middle. A blob that fails any check raises KVTCFormatError.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

from ..errors import KVShrinkError
from ..loading import cpu_has_fast_bf16
from .allocate import Plan
from .calibration import Calibration, ModelIdentity
from .errors import KVTCFormatError
from .pca import PCABasis
from .quant import dequantize, from_bytes, pack, packed_bytes, quantize, to_bytes, unpack

try:
    import zstandard
except ImportError:  # optional: DEFLATE compresses about as well (paper Table 14)
    zstandard = None
_ZSTD_ERROR = zstandard.ZstdError if zstandard else ValueError

SINKS, WINDOW = 4, 128
CHUNK = 256  # tokens the middle is built/projected in: 6 MB of SmolLM2-135M's fp32 features, matmuls still efficient
FIT_RIDGE = 0.01  # keeps the fit of a token with few live slots from blowing up its coordinates (see _fit_live)
FIT_STEPS = 8  # conjugate-gradient steps fitting a DMS token's coordinates to its live slots (0: the mean fill alone)
MAGIC, VERSION = b"KVTC", 2  # 2: a masked blob stores only live window vectors and middle tokens
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
    masked: int  # 1 if a live mask follows the sinks
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
    L, H, T, D, dtype = _check(keys, values, calib.identity)
    keys, values = [x.cpu() for x in keys], [x.cpu() for x in values]  # where the codec runs
    cos, sin = _tables(cos, sin, T, D)
    s = min(sinks, T)
    w = min(window, T - s)
    mid = slice(s, T - w)
    key_stream, value_stream = _streams(calib, cr)
    mask = None if live is None else _stack_live(live, (L, H, T))

    kept = _middle_tokens(mask, mid)
    mid_keys, mid_values = ([x[:, :, kept] for x in layers] for layers in (keys, values))  # views unless masked
    dead = None if mask is None else ~mask[:, :, kept].permute(2, 0, 1)[..., None]  # (t, L, H, 1)
    middle = _encode_middle(key_stream, mid_keys, dead, cos[0, kept], sin[0, kept]) + \
        _encode_middle(value_stream, mid_values, dead)
    coder, coded = _entropy_encode(middle)

    header = _HEADER.pack(calib.digest, float(cr), L, H, D, T, s, w, DTYPES.index(dtype), coder, mask is not None, len(middle))
    wdtype = _window_dtype(dtype)
    parts = [header]
    for layers in (keys, values):
        parts.append(_encode_sinks(_stack(layers, slice(0, s))))
    parts.append(b"" if mask is None else np.packbits(mask.numpy().reshape(-1)).tobytes())
    for layers in (keys, values):
        recent = _stack(layers, slice(T - w, T)).to(wdtype)
        parts.append(to_bytes(recent if mask is None else recent[mask[:, :, T - w:]]))
    parts.append(coded)
    body = b"".join(parts)
    return MAGIC + bytes([VERSION]) + checksum(body) + body


def decompress(blob: bytes, calib: Calibration, cos: torch.Tensor, sin: torch.Tensor) -> KVLayers:
    """Inverse of `compress`; cos, sin must be for the same positions as when compressing."""
    h, body = _open(blob)
    ident = calib.identity
    if h.calibration != calib.digest or (h.layers, h.heads, h.head_dim) != (ident.layers, ident.kv_heads, ident.head_dim):
        raise KVTCFormatError("this KVTC blob was written with a different calibration")
    key_plan, value_plan = calib.plan(h.cr)
    L, H, T, D, s, w = h.layers, h.heads, h.tokens, h.head_dim, h.sinks, h.window
    cos, sin = _tables(cos, sin, T, D)
    key_stream, value_stream = _streams(calib, h.cr)

    Ks, Vs = _decode_sinks(body, (L, H, s, D)), _decode_sinks(body, (L, H, s, D))
    mask = _read_mask(body, h)
    kept = _middle_tokens(mask, slice(s, T - w))
    n = _count(kept)
    if h.middle_bytes != _middle_bytes(key_plan, n) + _middle_bytes(value_plan, n):
        raise KVTCFormatError("KVTC blob's middle does not match its calibration's plan")
    dtype = DTYPES[h.dtype]
    K, V = torch.empty(L, H, T, D, dtype=dtype), torch.empty(L, H, T, D, dtype=dtype)  # masked: dead slots zeroed below
    recent = None if mask is None else mask[:, :, T - w:]
    for x, sink in ((K, Ks), (V, Vs)):
        x[:, :, :s] = sink
        x[:, :, T - w:] = _read_window(body, h, recent)
    middle = _Reader(_entropy_decode(h.coder, body.rest(), h.middle_bytes))
    _decode_middle(key_stream, middle, K, kept, cos[0, kept], sin[0, kept])
    _decode_middle(value_stream, middle, V, kept)
    if mask is not None:
        K.masked_fill_(~mask[..., None], 0)
        V.masked_fill_(~mask[..., None], 0)
    return KVLayers(list(K.split(1)), list(V.split(1)), None if mask is None else list(mask.unbind(0)))


def blob_stats(blob: bytes) -> dict:
    """Sizes and ratios of a (checked) blob against fp16 storage: whole cache, and the compressed middle
    alone (the paper's headline ratio, which leaves the window out)."""
    h, body = _open(blob)
    L, H, T, D = h.layers, h.heads, h.tokens, h.head_dim
    middle_tokens = T - h.sinks - h.window
    body.take(2 * _sinks_bytes(h))
    mask = _read_mask(body, h)
    body.take(2 * _window_bytes(h, None if mask is None else mask[:, :, T - h.window:]))
    middle = len(body.rest())
    fp16_per_token = 2 * L * H * D * 2  # K and V
    return {"tokens": T, "compressed_tokens": middle_tokens, "cr": h.cr, "bytes": len(blob), "middle_bytes": middle,
            "ratio": fp16_per_token * T / len(blob),
            "middle_ratio": fp16_per_token * middle_tokens / middle if middle_tokens else None,
            "coder": "zstd" if h.coder == ZSTD else "zlib"}


# -- the middle: PCA coordinates, quantized group by group -------------------------------------------------
BF16_MATMUL = cpu_has_fast_bf16()  # read when a calibration's streams are built; tests switch it


class _Stream(NamedTuple):
    """One stream's (keys' or values') plan as matmul rows: the basis components its groups quantize.

    Rows are ordered so that every (kind, size) bucket is one contiguous block, (groups, size, tokens)
    once projected: the order its codes are stored in, so there is no gather and no transpose. Components
    inside the plan's rank that get no bits have no row. Size-1 groups come first: their value is kept
    whole in the fp16 shift, so they are projected and reconstructed in fp32. Every other group's codes
    have at most 8 bits (int2, int4, or fp8's 3-bit mantissa), so with BF16_MATMUL those rows, nearly
    all of the codec's arithmetic, are multiplied in bfloat16 (fp32 accumulation): on a SmolLM2-shaped
    cache at cr 16 that adds 0.14% to the keys' relative error (0.00177 -> 0.00178) and 0.006% to the
    values', and runs ~3x faster."""

    buckets: list[tuple[str, int, int, int]]  # (kind, size, groups, first row), in plan.buckets() order
    fp32_rows: int  # rows [0, fp32_rows) are in `exact`, the rest in `coarse`
    exact: torch.Tensor  # (fp32_rows, p) fp32
    coarse: torch.Tensor | None  # (rows - fp32_rows, p) bf16
    mean: torch.Tensor  # (p,)

    @property
    def rows(self) -> int:
        return self.fp32_rows + (0 if self.coarse is None else self.coarse.shape[0])


def _streams(calib: Calibration, cr: float) -> tuple[_Stream, _Stream]:
    """The key and value streams for ratio `cr`, built once per calibration."""
    key = (float(cr), BF16_MATMUL)
    if key not in calib.codec_tables:
        pairs = zip((calib.keys, calib.values), calib.plan(cr))
        calib.codec_tables[key] = tuple(_stream(basis, plan) for basis, plan in pairs)
    return calib.codec_tables[key]


def _stream(basis: PCABasis, plan: Plan) -> _Stream:
    buckets = plan.buckets()
    order = sorted(range(len(buckets)), key=lambda i: buckets[i][1] > 1)  # size-1 buckets first
    sizes = [buckets[i][2].numel() for i in order]
    first = {i: sum(sizes[:k]) for k, i in enumerate(order)}
    columns = torch.cat([buckets[i][2].reshape(-1) for i in order] or [torch.zeros(0, dtype=torch.long)])
    rows = basis.components[:, columns].T.contiguous()  # (rows, p)
    split = sum(idx.numel() for _, size, idx in buckets if size == 1) if BF16_MATMUL else rows.shape[0]
    return _Stream([(kind, size, idx.shape[0], first[i]) for i, (kind, size, idx) in enumerate(buckets)], split,
                   rows[:split], rows[split:].bfloat16() if split < rows.shape[0] else None, basis.mean)


def _encode_middle(stream: _Stream, layers, dead=None, cos=None, sin=None) -> bytes:
    """The middle tokens, as per-layer (1, H, T, D) caches of them alone -> quantized, packed codes; keys
    (given cos, sin: (T, D)) lose their RoPE, dead (T, L, H, 1) slots become the mean.

    Features are built and projected CHUNK tokens at a time: a chunk's fp32 features stay in cache, where
    a whole cache's would be ~100 MB written and read back several times (and page-faulted in afresh)."""
    T = layers[0].shape[2]
    d = torch.empty(stream.rows, T)
    for c in _chunks(T):
        x = _gather(layers, c)
        if cos is None:
            x.sub_(stream.mean.view(x.shape[1:]))
        else:
            x = _undo_rope(x, stream.mean.view(x.shape[1:]), cos[c], sin[c])
        if dead is not None:
            x.masked_fill_(dead[c], 0)
        _project(stream, x.view(x.shape[0], -1), d[:, c])
        if dead is not None:
            _fit_live(stream, dead[c], d[:, c], FIT_STEPS)
    out = []
    for kind, size, groups, row in stream.buckets:
        codes, shift, scale = quantize(d[row:row + groups * size].view(groups, size, T), kind, dim=1)
        out += [to_bytes(shift), to_bytes(scale), pack(codes, kind)]  # (G, T), (G, T), (G, size, T)
    return b"".join(out)


def _decode_middle(stream: _Stream, reader: _Reader, out: torch.Tensor, tokens, cos=None, sin=None) -> None:
    """Inverse of `_encode_middle`, into out[:, :, tokens] ((L, H, T, D), the output dtype; tokens: the
    `_middle_tokens`), CHUNK tokens at a time; keys (given cos, sin: (t, D)) get their RoPE back."""
    T = _count(tokens)
    d = torch.empty(stream.rows, T)
    for kind, size, G, row in stream.buckets:
        shift = from_bytes(reader.take(2 * G * T), torch.float16, (G, T))
        scale = from_bytes(reader.take(2 * G * T), torch.float16, (G, T))
        codes = unpack(reader.take(packed_bytes(G * size * T, kind)), kind, G * size * T)
        d[row:row + G * size] = dequantize(codes.view(G, size, T), shift, scale, kind, dim=1).view(G * size, T)
    L, H, _, D = out.shape
    for c in _chunks(T):
        x = _reconstruct(stream, d[:, c]).view(-1, L, H, D)
        if cos is not None:
            x = _redo_rope(x, cos[c], sin[c])
        _scatter(out, x, slice(tokens.start + c.start, tokens.start + c.stop) if isinstance(tokens, slice) else tokens[c])


def _fit_live(stream: _Stream, dead: torch.Tensor, d: torch.Tensor, steps: int) -> None:
    """Refine, in place, the coordinates d (rows, t) of t tokens whose `dead` (t, L, H, 1) slots were
    mean-filled: towards the least-squares fit of their live slots alone, min ||live·(reconstruction - x)||²,
    by conjugate gradients on the normal equations V·diag(live)·Vᵀ d = d0 (d0, the mean fill's projection,
    is V·x with x zero where dead), one system per token, batched. Why: under DMS-8x most of a token's
    (layer, head) slots are evicted, so the mean-filled vector lies far from the caches the basis was
    fitted on, and its truncated projection spreads large errors over the few live slots (on `tiny-dms8`
    at 16x, before quantization, relative error 0.21 / 0.49 for keys / values against a vanilla cache's
    0.03 / 0.07). Fitted, the live slots come back nearly as well as a vanilla cache's.

    A token with fewer live features than components has many exact fits; unregularized, CG heads for
    large coordinates that quantize badly (the tests' tiny DMS model: logits off by 2x their scale). A
    small ridge (FIT_RIDGE·I added to the normal matrix, whose eigenvalues lie in [0, 1]) keeps them near
    the mean fill's, at no cost on `tiny-dms8` (0.050 / 0.120 against 0.051 / 0.122)."""
    t, shape = d.shape[1], (d.shape[1],) + dead.shape[1:-1] + (stream.mean.numel() // dead[0].numel(),)

    def normal(v: torch.Tensor) -> torch.Tensor:  # (V·diag(live)·Vᵀ + ridge) v
        out = torch.empty_like(v)
        _project(stream, _reconstruct(stream, v, centred=True).view(shape).masked_fill_(dead, 0).view(t, -1), out)
        return out.add_(v, alpha=FIT_RIDGE)

    start = d.clone()
    r = d - normal(d)
    p, rr = r.clone(), r.square().sum(0)
    for _ in range(steps):
        q = normal(p)
        curvature = (p * q).sum(0)
        # bf16 rounding can leave a direction with no curvature: that ends the token's fit
        ok = curvature > 1e-6 * p.square().sum(0)
        alpha = torch.where(ok, rr / torch.where(ok, curvature, 1.0), 0.0)
        d.add_(alpha * p)
        r.sub_(alpha * q)
        rr, previous = r.square().sum(0), rr
        p = r + torch.where(previous > 0, rr / torch.where(previous > 0, previous, 1.0), 0.0) * p
    diverged = ~torch.isfinite(d).all(0)
    d[:, diverged] = start[:, diverged]  # a fit that diverged keeps the mean fill's coordinates


def _chunks(T: int) -> list[slice]:
    return [slice(t, min(t + CHUNK, T)) for t in range(0, T, CHUNK)]


def _gather(layers, tokens: slice) -> torch.Tensor:
    """Per-layer (1, H, T, D) -> (t, L, H, D) fp32 of `tokens`: token-major from the first copy, so later
    passes are contiguous fp32 arithmetic (torch's mixed fp16/fp32 arithmetic is several times slower)."""
    _, H, _, D = layers[0].shape
    x = torch.empty(tokens.stop - tokens.start, len(layers), H, D)
    for i, layer in enumerate(layers):
        x[:, i] = layer[0, :, tokens].transpose(0, 1)
    return x


def _scatter(out: torch.Tensor, x: torch.Tensor, tokens: slice | torch.Tensor) -> None:
    """(t, L, H, D) fp32 -> out[:, :, tokens] ((L, H, T, D), the output dtype; a slice or (t,) positions)."""
    x = x.permute(1, 2, 0, 3)
    out[:, :, tokens] = x if isinstance(tokens, slice) else x.to(out.dtype)  # index_put does not cast


def _undo_rope(y: torch.Tensor, mean: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(t, L, H, D) post-RoPE keys -> RoPE undone, minus mean (L, H, D); cos, sin: (t, D). As in
    rope.undo_rope, x = (y·cos − rotate_half(y)·sin) / (cos² + sin²), one half of the pairs at a time."""
    norm = cos * cos + sin * sin
    a, b = (cos / norm)[:, None, None], (sin / norm)[:, None, None]
    x, h = torch.empty_like(y), y.shape[-1] // 2
    torch.addcmul(-mean[..., :h], y[..., :h], a[..., :h], out=x[..., :h]).addcmul_(y[..., h:], b[..., :h])
    torch.addcmul(-mean[..., h:], y[..., h:], a[..., h:], out=x[..., h:]).addcmul_(y[..., :h], b[..., h:], value=-1)
    return x


def _redo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(t, L, H, D) keys -> RoPE applied (rope.redo_rope: y = x·cos + rotate_half(x)·sin); cos, sin: (t, D)."""
    c, s, y, h = cos[:, None, None], sin[:, None, None], torch.empty_like(x), x.shape[-1] // 2
    torch.mul(x[..., :h], c[..., :h], out=y[..., :h]).addcmul_(x[..., h:], s[..., :h], value=-1)
    torch.mul(x[..., h:], c[..., h:], out=y[..., h:]).addcmul_(x[..., :h], s[..., h:])
    return y


def _project(stream: _Stream, x: torch.Tensor, out: torch.Tensor) -> None:
    """(t, p) centred features -> out (rows, t) fp32 coordinates (bf16 rows are widened on the copy)."""
    out[:stream.fp32_rows] = torch.mm(stream.exact, x.T)
    if stream.coarse is not None:
        out[stream.fp32_rows:] = torch.mm(stream.coarse, x.bfloat16().T)


def _reconstruct(stream: _Stream, d: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """(rows, t) coordinates -> (t, p) fp32 features, mean added unless `centred`."""
    if stream.coarse is None:
        return torch.mm(d.T, stream.exact) if centred else torch.addmm(stream.mean, d.T, stream.exact)
    x = torch.mm(d[stream.fp32_rows:].bfloat16().T, stream.coarse).float().addmm_(d[:stream.fp32_rows].T, stream.exact)
    return x if centred else x.add_(stream.mean)


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


def _middle_tokens(mask: torch.Tensor | None, mid: slice) -> slice | torch.Tensor:
    """The middle tokens that are stored: all of them (the slice), or for a DMS cache the (t,) positions
    live in some (layer, head) (a token every head evicted needs no bits)."""
    return mid if mask is None else torch.arange(mid.start, mid.stop)[mask[:, :, mid].any(0).any(0)]


def _count(tokens: slice | torch.Tensor) -> int:
    return tokens.stop - tokens.start if isinstance(tokens, slice) else len(tokens)


def _read_mask(reader: _Reader, h: _Header) -> torch.Tensor | None:
    if not h.masked:
        return None
    n = h.layers * h.heads * h.tokens
    bits = np.unpackbits(np.frombuffer(reader.take(_mask_bytes(h)), dtype=np.uint8), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(h.layers, h.heads, h.tokens)


def _read_window(reader: _Reader, h: _Header, live: torch.Tensor | None) -> torch.Tensor:
    """One stream's window (L, H, w, D): all of it, or only its `live` (L, H, w) vectors (the rest zeros)."""
    dtype, shape = _window_dtype(DTYPES[h.dtype]), (h.layers, h.heads, h.window, h.head_dim)
    data = reader.take(_window_bytes(h, live))
    if live is None:
        return from_bytes(data, dtype, shape)
    out = torch.zeros(shape, dtype=dtype)
    out[live] = from_bytes(data, dtype, (len(data) // (2 * h.head_dim), h.head_dim))
    return out


def _window_bytes(h: _Header, live: torch.Tensor | None) -> int:
    """One stream's stored window: every vector, or only the `live` (L, H, w) ones, 16 bits each."""
    vectors = h.layers * h.heads * h.window if live is None else int(live.sum())
    return 2 * vectors * h.head_dim


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
def _check(keys, values, identity: ModelIdentity) -> tuple[int, int, int, int, torch.dtype]:
    """(L, H, T, D, dtype) of per-layer (1, H, T, D) keys and values; refuses another model's cache."""
    for layers in (keys, values):
        shapes = sorted({tuple(x.shape) for x in layers})
        fits = len(layers) == identity.layers and len(shapes) == 1 and len(shapes[0]) == 4 and \
            (shapes[0][0], shapes[0][1], shapes[0][3]) == (1, identity.kv_heads, identity.head_dim)
        if not fits or len({x.dtype for x in layers}) != 1 or layers[0].dtype not in DTYPES:
            raise KVShrinkError(f"cache does not fit the KVTC calibration ({identity}): need {identity.layers} layers of "
                                f"(1, {identity.kv_heads}, T, {identity.head_dim}) fp16/bf16/fp32, got {len(layers)} of {shapes}")
    if keys[0].shape != values[0].shape or keys[0].dtype != values[0].dtype:
        raise KVShrinkError(f"keys {tuple(keys[0].shape)} {keys[0].dtype} and values {tuple(values[0].shape)} {values[0].dtype} differ")
    _, H, T, D = keys[0].shape
    return len(keys), H, T, D, keys[0].dtype


def _stack(layers, tokens: slice) -> torch.Tensor:
    """Per-layer (1, H, T, D) -> (L, H, t, D) of the `tokens` slice."""
    return torch.cat([x[:, :, tokens] for x in layers])


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
