"""The quantizers KVTC allocates between, and their bit packing.

Each group is a run of values (one token's consecutive PCA components, or one sink vector) that shares
a 16-bit shift and a 16-bit scale; shift and scale are stored as fp16, so both quantizing and the DP's
simulation use the fp16-rounded values the decoder will see.

- int2 / int4: KIVI's asymmetric min–max, shift = min, scale = (max − min) / (2^bits − 1),
  code = clamp(round((x − shift) / scale), 0, 2^bits − 1).
- fp8: E4M3 of (x − shift) / scale with shift = the group's midpoint and scale = half-range / 448, so
  the group fills E4M3's signed range (the paper leaves the fp8 convention open; this is one choice).
A constant group (or one whose scale underflows fp16) gets scale 1: its codes are 0 and x̂ = shift.
"""

from __future__ import annotations

import numpy as np
import torch

BITS = {"int2": 2, "int4": 4, "fp8": 8}  # "none" (component dropped) costs nothing and is not stored
GROUP_OVERHEAD_BITS = 32  # fp16 shift + fp16 scale per group and token
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP16_MAX = 65504.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP16_MAX, FP16_MAX).half()


def quantize(x: torch.Tensor, kind: str, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: fp32, one group per vector along `dim` -> codes (x's shape) uint8, shift, scale (x's shape without
    `dim`) fp16. The codec quantizes along dim 1 of (groups, size, tokens), its storage order."""
    lo, hi = x.amin(dim), x.amax(dim)
    if kind == "fp8":
        shift = _fp16((lo + hi) / 2)
        scale = _fp16(torch.maximum(hi - shift.float(), shift.float() - lo) / FP8_MAX)
    else:
        shift = _fp16(lo)
        scale = _fp16((hi - lo) / (2 ** BITS[kind] - 1))
    scale = scale.masked_fill(scale == 0, 1.0)
    y = (x - shift.float().unsqueeze(dim)).div_(scale.float().unsqueeze(dim))
    if kind == "fp8":
        codes = y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        codes = y.round_().clamp_(0, 2 ** BITS[kind] - 1).to(torch.uint8)
    return codes, shift, scale


def dequantize(codes: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, kind: str, dim: int = -1) -> torch.Tensor:
    q = codes.view(torch.float8_e4m3fn).float() if kind == "fp8" else codes.float()
    return q.mul_(scale.float().unsqueeze(dim)).add_(shift.float().unsqueeze(dim))


def fake_quant(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What the decoder will reconstruct from x: the DP measures its error with exactly this."""
    return dequantize(*quantize(x, kind), kind)


def pack(codes: torch.Tensor, kind: str) -> bytes:
    """Codes (any shape, uint8, each < 2^bits) -> bytes, 8/bits codes per byte, LSB first.

    One OR per field over strided columns: a sum over the short last dim is a slow reduction in torch."""
    bits = BITS[kind]
    per = 8 // bits
    flat = codes.reshape(-1)
    if flat.numel() % per:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per)])
    fields = flat.view(-1, per)
    out = fields[:, 0].clone()
    for k in range(1, per):
        out |= fields[:, k] << (k * bits)  # the shifted fields do not overlap
    return out.numpy().tobytes()


def unpack(buf: bytes, kind: str, count: int) -> torch.Tensor:
    """Inverse of `pack`: the first `count` codes, flat uint8."""
    bits = BITS[kind]
    per = 8 // bits
    packed = from_bytes(buf, torch.uint8, (-1,))
    out = torch.empty(packed.numel(), per, dtype=torch.uint8)
    for k in range(per):
        torch.bitwise_and(packed >> (k * bits), 2 ** bits - 1, out=out[:, k])
    return out.view(-1)[:count]


def packed_bytes(count: int, kind: str) -> int:
    return -(-count * BITS[kind] // 8)


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def from_bytes(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:  # numpy gives an empty buffer a stride that torch cannot reinterpret
        return torch.empty(0, dtype=dtype).reshape(shape)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy()).view(dtype).reshape(shape)
