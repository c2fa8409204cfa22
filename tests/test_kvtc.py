"""KVTC: RoPE undo/redo, quantizers and packing, the DP against brute force, PCA, the codec and its blob."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import tiny_model
from kvshrink.errors import KVShrinkError
from kvshrink.kvtc import (Calibration, KVTCFormatError, ModelIdentity, PCABasis, allocate, blob_stats, budget_bits,
                           compress, decompress, fake_quant, pack, quantize, redo_rope, rope_tables, undo_rope, unpack)
from kvshrink.kvtc import codec
from kvshrink.kvtc.pca import from_features
from kvshrink.kvtc.quant import BITS, dequantize

LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 32  # p = 256 features per token
P_FEATURES = LAYERS * KV_HEADS * HEAD_DIM
RATIOS = (2.0, 4.0, 8.0, 16.0)
T = 4 + 1024 + 128  # sinks, compressed middle, window


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is as fast, and stays fast on a busy machine


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=LAYERS, hidden=128, heads=4, kv_heads=KV_HEADS)


@pytest.fixture(scope="module")
def rope(model):
    return rope_tables(model.model.rotary_emb, torch.arange(T))


class Source:
    """Synthetic position-free KV features with a decaying spectrum (what real caches look like to PCA)."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(P_FEATURES, P_FEATURES, generator=g))
        self.mix = basis * (4.0 / (1 + torch.arange(P_FEATURES)) ** 0.8)  # column j has scale ~ j^-0.8
        self.mean = torch.randn(P_FEATURES, generator=g)

    def rows(self, n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, P_FEATURES, generator=torch.Generator().manual_seed(seed)) @ self.mix.T + self.mean

    def cache(self, cos, sin, dtype=torch.float16, seed: int = 100):
        """Per-layer (1, H, T, D) keys (RoPE applied) and values, as a model's cache holds them."""
        K = redo_rope(from_features(self.rows(T, seed), LAYERS, KV_HEADS, HEAD_DIM), cos, sin)
        V = from_features(self.rows(T, seed + 1), LAYERS, KV_HEADS, HEAD_DIM)
        return list(K.to(dtype).split(1)), list(V.to(dtype).split(1))


@pytest.fixture(scope="module")
def source():
    return Source(seed=0)


@pytest.fixture(scope="module")
def calib(model, source):
    return Calibration.fit(ModelIdentity.from_model(model), source.rows(4096, 1), source.rows(4096, 2), ratios=RATIOS, dp_rows=1024)


# -- RoPE -------------------------------------------------------------------------------------------------------
def test_rope_undo_redo_round_trip(model):
    positions = torch.arange(4096)
    cos, sin = rope_tables(model.model.rotary_emb, positions)
    x = torch.randn(1, KV_HEADS, 4096, HEAD_DIM) * 8
    _, hf_rotated = apply_rotary_pos_emb(x, x, cos, sin)  # the model's own RoPE
    assert torch.equal(redo_rope(x, cos, sin), hf_rotated)
    assert (undo_rope(hf_rotated, cos, sin) - x).abs().max() <= 1e-5
    assert (redo_rope(undo_rope(hf_rotated, cos, sin), cos, sin) - hf_rotated).abs().max() <= 1e-5
    a = 1.3  # YaRN-style attention factor: cos and sin both scaled
    assert (undo_rope(redo_rope(x, a * cos, a * sin), a * cos, a * sin) - x).abs().max() <= 1e-5


# -- quantizers and packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int2", "int4", "fp8"])
def test_pack_round_trips(kind):
    for n in (0, 1, 3, 5, 1001):
        codes = torch.randint(0, 2 ** BITS[kind], (n,), dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, kind), kind, n), codes)
    x = torch.randn(7, 5, 16) * 3 + 1  # groups of 16 along the last dim
    codes, shift, scale = quantize(x, kind)
    unpacked = unpack(pack(codes, kind), kind, codes.numel()).reshape(codes.shape)
    assert torch.equal(dequantize(unpacked, shift, scale, kind), fake_quant(x, kind))


@pytest.mark.parametrize("kind", ["int2", "int4", "fp8"])
def test_quantizer_error_is_bounded(kind):
    x = torch.randn(1000, 16) * 5
    span = (x.amax(-1) - x.amin(-1))[:, None]
    # int: half a step of span / (2^bits − 1); e4m3: 1/16 of |y| <= 448, i.e. 1/16 of the half-span
    bound = span / 32 if kind == "fp8" else span / (2 ** BITS[kind] - 1) / 2
    assert ((fake_quant(x, kind) - x).abs() <= bound + 1e-2).all()  # + fp16 rounding of shift and scale
    assert torch.equal(fake_quant(torch.full((3, 16), 2.5), kind), torch.full((3, 16), 2.5))  # constant group


# -- DP allocation --------------------------------------------------------------------------------------------
def _compositions(r: int, sizes):
    if r == 0:
        yield ()
    for s in sizes:
        if s <= r:
            for rest in _compositions(r - s, sizes):
                yield (s, *rest)


def _brute_force(P: torch.Tensor, budgets, sizes, kinds) -> list[float]:
    """Least error per budget over every tiling of the components and every kind per group ('none' = dropped)."""
    def error(start, size, kind):
        block = P[:, start:start + size]
        return ((block if kind == "none" else fake_quant(block, kind) - block) ** 2).double().sum().item()

    best = [float("inf")] * len(budgets)
    for parts in _compositions(P.shape[1], sizes):
        starts = [sum(parts[:i]) for i in range(len(parts))]
        for assignment in itertools.product(("none", *kinds), repeat=len(parts)):
            bits = sum(s * BITS[k] + 32 for s, k in zip(parts, assignment) if k != "none")
            err = sum(error(a, s, k) for a, s, k in zip(starts, parts, assignment))
            best = [min(b, err) if bits <= budget else b for b, budget in zip(best, budgets)]
    return best


def _plan_error(P: torch.Tensor, plan) -> float:
    kept = torch.zeros_like(P)
    for g in plan.groups:
        kept[:, g.start:g.start + g.size] = fake_quant(P[:, g.start:g.start + g.size], g.kind)
    return ((P - kept) ** 2).double().sum().item()


@pytest.mark.parametrize("r, sizes", [(5, (1, 2, 4)), (6, (1, 3))])
def test_dp_allocation_equals_brute_force(r, sizes):
    g = torch.Generator().manual_seed(r)
    P = torch.randn(48, r, generator=g) * torch.logspace(0.6, -0.6, r) + torch.randn(r, generator=g)
    budgets = [0, 33, 34, 38, 48, 70, 100, 140, 200, 400]
    kinds = ("int2", "int4", "fp8")
    plans = allocate(P, budgets, sizes=sizes, kinds=kinds)
    for plan, budget, expected in zip(plans, budgets, _brute_force(P, budgets, sizes, kinds)):
        assert plan.bits <= budget
        assert _plan_error(P, plan) == pytest.approx(expected, rel=1e-9)


def test_dp_spends_more_bits_on_leading_components(calib):
    key_plan, _ = calib.plan(16)
    per_component = [g.bits / g.size for g in key_plan.groups]
    assert per_component[0] >= per_component[-1] and key_plan.bits <= budget_bits(P_FEATURES, 16)


# -- PCA ------------------------------------------------------------------------------------------------------
def test_pca_full_rank_reconstructs_exactly(source):
    x = source.rows(512, 3)
    basis = PCABasis.fit(x)  # full rank: exact PCA from the covariance
    assert basis.rank == P_FEATURES
    assert (basis.reconstruct(basis.project(x)) - x).abs().max() < 1e-5


def test_pca_covariance_equals_svd_of_centred_rows():
    """The chunked covariance path (no centred copy) finds the leading components an exact SVD of the
    centred rows finds, up to sign, on a spectrum with distinct singular values."""
    g = torch.Generator().manual_seed(1)
    scales = torch.linspace(4.0, 0.1, P_FEATURES)
    x = torch.randn(2000, P_FEATURES, generator=g) * scales + torch.randn(P_FEATURES, generator=g)
    basis = PCABasis.fit(x, rank=16, method="covariance", chunk=300)
    _, _, vh = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)
    cosines = (basis.components.double().T @ vh[:16].T).diagonal().abs()
    assert cosines.min() > 0.999 and torch.allclose(basis.mean.double(), x.double().mean(0), atol=1e-5)


def test_pca_randomized_svd_finds_a_low_rank_subspace():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, P_FEATURES, generator=g) + 3
    basis = PCABasis.fit(x, rank=8, method="randomized")
    assert torch.allclose(basis.components.T @ basis.components, torch.eye(8), atol=1e-5)
    assert (basis.reconstruct(basis.project(x)) - x).abs().max() < 1e-4


# -- codec ----------------------------------------------------------------------------------------------------
def _rel_error(a: list, b: list, part: slice) -> float:
    a, b = torch.cat(a)[:, :, part].float(), torch.cat(b)[:, :, part].float()
    return ((a - b).norm() / a.norm()).item()


def test_codec_round_trip(calib, source, rope):
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    middle, window = slice(4, T - 128), slice(T - 128, T)
    errors = []
    for cr in RATIOS:
        blob = compress(keys, values, calib, cr, cos, sin)
        out = decompress(blob, calib, cos, sin)
        errors.append((_rel_error(keys, out.keys, middle), _rel_error(values, out.values, middle)))
        for x, y in zip(keys + values, out.keys + out.values):
            assert y.dtype == x.dtype and y.shape == x.shape
            assert torch.equal(y[:, :, window], x[:, :, window])  # the window is stored as-is
            sinks, restored = x[:, :, :4].float(), y[:, :, :4].float()
            span = sinks.amax(-1, keepdim=True) - sinks.amin(-1, keepdim=True)
            assert ((restored - sinks).abs() <= span / 32 + 1e-2).all()  # fp8: 1/16 of the half-span, + fp16 casts
        stats = blob_stats(blob)
        key_plan, value_plan = calib.plan(cr)
        before_entropy = 2 * 16 * P_FEATURES / (key_plan.bits + value_plan.bits)
        assert cr <= before_entropy <= 1.25 * cr  # the DP spends (nearly) the whole budget, never more
        assert before_entropy * 0.99 <= stats["middle_ratio"] <= before_entropy * 1.6  # entropy coding only helps
        assert stats["compressed_tokens"] == 1024 and stats["ratio"] < stats["middle_ratio"]
    assert errors == sorted(errors)  # more bits (lower cr), less error, for keys and values alike
    assert errors[0][0] < 0.05 and errors[-1][0] < 0.5


def test_codec_zlib_fallback_decodes_the_same(calib, source, rope, monkeypatch):
    cos, sin = rope
    keys, values = source.cache(cos, sin, dtype=torch.bfloat16)
    default_blob = compress(keys, values, calib, 8, cos, sin)  # zstd where zstandard is installed
    default = decompress(default_blob, calib, cos, sin)
    monkeypatch.setattr(codec, "zstandard", None)
    zlib_blob = compress(keys, values, calib, 8, cos, sin)
    assert blob_stats(zlib_blob)["coder"] == "zlib"
    out = decompress(zlib_blob, calib, cos, sin)
    assert all(torch.equal(x, y) for x, y in zip(out.keys + out.values, default.keys + default.values))
    assert all(torch.equal(x[:, :, -128:], y[:, :, -128:]) for x, y in zip(keys, out.keys))  # bf16 window bit-exact
    if blob_stats(default_blob)["coder"] == "zstd":
        with pytest.raises(KVTCFormatError, match="zstandard"):
            decompress(default_blob, calib, cos, sin)


def test_codec_bf16_and_fp32_matmuls_agree(calib, source, rope, monkeypatch):
    """Where the CPU multiplies bfloat16 natively, the codec's matmuls run in it (all but size-1 groups);
    the fp32 path taken elsewhere writes the same format, each decodes the other's blobs, and bf16 costs
    next to nothing in accuracy."""
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    middle = slice(4, T - 128)
    blobs, errors = {}, {}
    for bf16 in (False, True):
        monkeypatch.setattr(codec, "BF16_MATMUL", bf16)
        blobs[bf16] = compress(keys, values, calib, 16, cos, sin)
        out = decompress(blobs[bf16], calib, cos, sin)
        errors[bf16] = (_rel_error(keys, out.keys, middle), _rel_error(values, out.values, middle))
    crossed = decompress(blobs[False], calib, cos, sin)  # an fp32 blob, decoded with bf16
    assert _rel_error(keys, crossed.keys, middle) < 1.01 * errors[False][0]
    assert all(b < 1.01 * f for b, f in zip(errors[True], errors[False]))


def test_codec_short_cache_has_no_middle(calib, source, rope):
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    short = [x[:, :, :100] for x in keys], [x[:, :, :100] for x in values]
    out = decompress(compress(*short, calib, 16, cos[:, :100], sin[:, :100]), calib, cos[:, :100], sin[:, :100])
    assert all(torch.equal(x[:, :, 4:], y[:, :, 4:]) for x, y in zip(short[0] + short[1], out.keys + out.values))


def test_codec_live_mask_for_dms_caches(calib, source, rope, monkeypatch):
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    g = torch.Generator().manual_seed(3)
    live = [torch.rand(KV_HEADS, T, generator=g) < 0.5 for _ in range(LAYERS)]
    out = decompress(compress(keys, values, calib, 8, cos, sin, live=live), calib, cos, sin)
    plain = decompress(compress(keys, values, calib, 8, cos, sin), calib, cos, sin)
    monkeypatch.setattr(codec, "FIT_STEPS", 0)  # the mean fill alone
    unfitted = decompress(compress(keys, values, calib, 8, cos, sin, live=live), calib, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out.live, live))
    mask = torch.stack(live)[:, :, :, None]  # (L, H, T, 1)
    for x, y, ref, mean_fill in ((keys, out.keys, plain.keys, unfitted.keys), (values, out.values, plain.values, unfitted.values)):
        x, y, ref, mean_fill = (torch.cat(t).float() for t in (x, y, ref, mean_fill))
        assert (y[~mask.expand_as(y)] == 0).all()
        middle = mask[:, :, 4:-128].expand_as(x[:, :, 4:-128])
        masked_err, plain_err, mean_fill_err = ((z - x)[:, :, 4:-128][middle].norm() / x[:, :, 4:-128][middle].norm()
                                                for z in (y, ref, mean_fill))
        # mean-filled slots pull each token off the basis' subspace, so live slots lose accuracy (~2.5x here);
        # fitting the coordinates to the live slots alone brings most of it back
        assert mean_fill_err > 2 * plain_err and masked_err < 1.5 * plain_err
        recent = mask[:, :, -128:].expand_as(x[:, :, -128:])
        assert torch.equal(y[:, :, -128:][recent], x[:, :, -128:][recent])  # live window vectors: as they were


def test_fit_live_is_the_least_squares_fit_of_the_live_slots(calib, source, monkeypatch):
    """Run to convergence, the conjugate gradients give each token the coordinates that best reconstruct
    its live slots alone, as a per-token least-squares solve does (without the ridge, which only matters
    where a token has fewer live features than components)."""
    monkeypatch.setattr(codec, "BF16_MATMUL", False)
    monkeypatch.setattr(codec, "FIT_RIDGE", 0.0)
    stream = codec._streams(calib, 8)[1]  # values: no RoPE
    rows, t = stream.exact, 6  # rows: (r, p) orthonormal components
    x = source.rows(t, 7) - stream.mean
    dead = torch.rand(t, LAYERS, KV_HEADS, 1, generator=torch.Generator().manual_seed(4)) < 0.5
    live = ~dead.expand(t, LAYERS, KV_HEADS, HEAD_DIM).reshape(t, -1)
    assert int(live.sum(1).min()) > rows.shape[0]  # one solution per token
    d = rows @ x.masked_fill(~live, 0).T
    codec._fit_live(stream, dead, d, steps=rows.shape[0])
    for i in range(t):
        ref = torch.linalg.lstsq(rows.T[live[i]].double(), x[i, live[i]].double()[:, None]).solution[:, 0]
        assert (d[:, i].double() - ref).norm() < 1e-3 * ref.norm()


def test_codec_stores_no_bits_for_evicted_slots(calib, source, rope):
    """A DMS blob leaves out middle tokens evicted in every (layer, head) and the window's evicted vectors:
    evicting them all leaves the sinks, the mask and the window's live vectors, and nothing else."""
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    live = [torch.zeros(KV_HEADS, T, dtype=torch.bool) for _ in range(LAYERS)]
    for m in live:
        m[:, :4] = True
        m[0, -128:] = True  # the window's first head only
    blob = compress(keys, values, calib, 8, cos, sin, live=live)
    sinks = 2 * LAYERS * KV_HEADS * 4 * (4 + HEAD_DIM)
    window = 2 * LAYERS * 128 * HEAD_DIM * 2  # K and V, one head per layer, 16 bits
    mask = -(-LAYERS * KV_HEADS * T // 8)
    assert blob_stats(blob)["middle_bytes"] < 64  # an empty middle, entropy-coded
    assert len(blob) - blob_stats(blob)["middle_bytes"] - (sinks + mask + window) < 100  # + magic, checksum, header
    out = decompress(blob, calib, cos, sin)
    for x, y in ((keys, out.keys), (values, out.values)):
        x, y = torch.cat(x), torch.cat(y)
        assert torch.equal(y[:, 0, -128:], x[:, 0, -128:]) and (y[:, :, 4:-128] == 0).all() and (y[:, 1:, -128:] == 0).all()


# -- blob integrity and refusals --------------------------------------------------------------------------------
def test_corrupted_blobs_raise_format_error_only(calib, source, rope):
    cos, sin = rope
    keys, values = source.cache(cos, sin)
    n = 4 + 24 + 8
    small = [x[:, :, :n] for x in keys], [x[:, :, :n] for x in values]
    blob = compress(*small, calib, 8, cos[:, :n], sin[:, :n], window=8)
    decompress(blob, calib, cos[:, :n], sin[:, :n])  # the intact blob decodes
    rng = random.Random(0)
    for trial in range(1000):
        bad = bytearray(blob)
        if trial % 2:
            del bad[rng.randrange(len(bad)):]
        else:
            for _ in range(rng.randint(1, 3)):
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            if bad == blob:
                continue
        with pytest.raises(KVTCFormatError):
            decompress(bytes(bad), calib, cos[:, :n], sin[:, :n])
    for junk in (blob + b"\0", b"", b"KVTC", bytes(200)):
        with pytest.raises(KVTCFormatError):
            decompress(junk, calib, cos[:, :n], sin[:, :n])


def test_mismatched_calibration_is_refused(model, calib, source, rope, tmp_path):
    cos, sin = rope
    path = tmp_path / "kvtc.safetensors"
    calib.save(path)
    loaded = Calibration.load(path, expect=ModelIdentity.from_model(model))
    assert loaded.digest == calib.digest and loaded.plans == calib.plans

    other_model = tiny_model(layers=LAYERS, hidden=128, heads=4, kv_heads=KV_HEADS, seed=1)
    with pytest.raises(KVTCFormatError, match="does not match"):
        Calibration.load(path, expect=ModelIdentity.from_model(other_model))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # a bf16 checkpoint loaded in bf16 or in fp32 is the same model
    assert ModelIdentity.from_model(bf16) == ModelIdentity.from_model(copy.deepcopy(bf16).float())
    assert ModelIdentity.from_model(bf16) != loaded.identity  # fp32 weights rounded to bf16: another fingerprint,
    Calibration.load(path, expect=ModelIdentity.from_model(bf16))  # but the same model: its calibration serves it
    tuned = copy.deepcopy(model)  # a fine-tune of the same base (weights moved ~2%) is another model
    with torch.no_grad():
        for layer in tuned.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(1 + 0.02 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(KVTCFormatError, match="does not match"):
        Calibration.load(path, expect=ModelIdentity.from_model(tuned))

    keys, values = source.cache(cos, sin)
    blob = compress(keys, values, loaded, 4, cos, sin)
    other = Calibration.fit(calib.identity, Source(1).rows(512, 1), Source(1).rows(512, 2), ratios=(4.0,), dp_rows=128)
    with pytest.raises(KVTCFormatError, match="different calibration"):
        decompress(blob, other, cos, sin)
    with pytest.raises(KVTCFormatError, match="no plan for cr=3"):
        compress(keys, values, calib, 3, cos, sin)
    with pytest.raises(KVShrinkError, match="does not fit"):
        compress([k[:, :1] for k in keys], [v[:, :1] for v in values], calib, 4, cos, sin)  # one KV head, not two

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KVTCFormatError, match="not a readable"):
        Calibration.load(path)
