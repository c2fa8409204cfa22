"""A KVTC calibration: everything fitted once per model and shared by every cache it compresses.

It holds the model's identity, one PCA basis for keys and one for values, and one DP plan per
compression ratio (paper App. B.1: the basis is shared by all ratios, only the allocation changes).
The bases are trimmed to the largest rank any plan uses, since the rest is never read. Saved as
safetensors (tensors + JSON metadata); loading refuses a file fitted for another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import KVShrinkError
from ..shapes import kv_head_dim
from .allocate import GROUP_SIZES, Plan, allocate, budget_bits
from .errors import KVTCFormatError
from .pca import PCABasis

FORMAT, VERSION = "kvshrink-kvtc-calibration", "1"


SAME_WEIGHTS_TOLERANCE = 5e-3  # bf16 rounding moves a signature ~2e-3; a LoRA fine-tune of the same base ~1e-2


@dataclass(frozen=True)
class ModelIdentity:
    """What a calibration must agree with: the cache's shape and the model's k_proj/v_proj weights."""

    layers: int
    kv_heads: int
    head_dim: int
    fingerprint: str = ""  # exact: a hash of the weights cast to fp16
    signature: tuple[float, ...] = field(default=(), compare=False)  # approximate: random sketches of the weights

    @property
    def features(self) -> int:
        return self.layers * self.kv_heads * self.head_dim

    @classmethod
    def from_model(cls, model) -> ModelIdentity:
        """Fingerprint: a hash of every layer's k_proj and v_proj weights, cast to fp16. Signature: 16
        fixed random projections of each of those weights (R_out · W · R_in), which the same weights
        loaded in another dtype (bf16 rounds differently, and merges a LoRA in bf16) move only slightly."""
        cfg = model.config
        digest = hashlib.blake2b(digest_size=8)
        signature = []
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                weight = proj.weight.detach().cpu()
                digest.update(weight.to(torch.float16).contiguous().numpy().tobytes())
                g = torch.Generator().manual_seed(weight.shape[0] * 100_003 + weight.shape[1])
                r_out, r_in = torch.randn(4, weight.shape[0], generator=g), torch.randn(weight.shape[1], 4, generator=g)
                signature += (r_out @ weight.float() @ r_in).flatten().tolist()
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, kv_head_dim(cfg), digest.hexdigest(),
                   tuple(round(x, 6) for x in signature))

    def matches(self, other: ModelIdentity) -> bool:
        """Same cache shape and the same weights: bit for bit (fingerprint), or up to dtype rounding
        (signatures within SAME_WEIGHTS_TOLERANCE, relative), so that a calibration fitted in fp32 serves
        the model loaded in bf16."""
        if (self.layers, self.kv_heads, self.head_dim) != (other.layers, other.kv_heads, other.head_dim):
            return False
        if self.fingerprint == other.fingerprint:
            return True
        if not self.signature or len(self.signature) != len(other.signature):
            return False
        a, b = torch.tensor(self.signature), torch.tensor(other.signature)
        return float((a - b).norm() / a.norm().clamp(min=1e-12)) < SAME_WEIGHTS_TOLERANCE

    def __str__(self) -> str:
        return f"layers={self.layers} kv_heads={self.kv_heads} head_dim={self.head_dim} fingerprint={self.fingerprint or '-'}"


@dataclass(frozen=True)
class Calibration:
    """Per-model KVTC state; immutable, so the digest written into blobs always names what decodes them."""

    identity: ModelIdentity
    keys: PCABasis
    values: PCABasis
    plans: dict[float, tuple[Plan, Plan]]  # compression ratio -> (key plan, value plan)

    @classmethod
    def fit(cls, identity: ModelIdentity, key_features: torch.Tensor, value_features: torch.Tensor,
            ratios=(16.0,), rank: int | None = None, dp_rows: int = 4096, niter: int = 8, seed: int = 0,
            sizes=GROUP_SIZES) -> Calibration:
        """key_features, value_features: (n, p) rows from `cache_features` over the calibration set.

        rank caps the PCA (paper: 8–10K); the DP runs on the first `dp_rows` rows (paper: 32K, on GPU).
        """
        if any(r <= 0 for r in ratios):
            raise KVShrinkError(f"compression ratios must be positive, got {ratios}")
        bases, plans = [], {float(cr): [] for cr in ratios}
        for x in (key_features, value_features):
            if x.shape[1] != identity.features:
                raise KVShrinkError(f"features have {x.shape[1]} columns, {identity} needs {identity.features}")
            basis = PCABasis.fit(x, rank, niter, seed)
            P = basis.project(x[:dp_rows])
            for cr, plan in zip(plans, allocate(P, [budget_bits(identity.features, cr) for cr in plans], sizes)):
                plans[cr].append(plan)
            bases.append(basis)
        used = max((p.rank for pair in plans.values() for p in pair), default=0)
        keys, values = (b.truncate(used) for b in bases)
        return cls(identity, keys, values, {cr: tuple(pair) for cr, pair in plans.items()})

    def plan(self, cr: float) -> tuple[Plan, Plan]:
        if float(cr) not in self.plans:
            raise KVTCFormatError(f"this calibration has no plan for cr={cr:g}; it was fitted for {self._ratios()}")
        return self.plans[float(cr)]

    def check(self, identity: ModelIdentity) -> None:
        if not self.identity.matches(identity):
            raise KVTCFormatError(f"KVTC calibration does not match the model: fitted for {self.identity}, model has {identity}")

    @cached_property
    def codec_tables(self) -> dict:
        """Scratch space where the codec keeps what it derives per plan (matmul-ready basis rows); built on
        first use, never saved or digested."""
        return {}

    @cached_property
    def digest(self) -> bytes:
        """8 bytes naming this exact calibration, written into every blob so a blob is decoded only with it."""
        meta = self._metadata()
        h = hashlib.blake2b((meta["identity"] + meta["plans"]).encode(), digest_size=8)
        for t in self._tensors().values():
            h.update(t.cpu().numpy().tobytes())
        return h.digest()

    def save(self, path) -> None:
        save_file(self._tensors(), str(path), metadata=self._metadata())

    @classmethod
    def load(cls, path, expect: ModelIdentity | None = None) -> Calibration:
        """Read a calibration; with `expect`, refuse one fitted for a different model."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise KVTCFormatError(f"{path} is not a version-{VERSION} KVTC calibration")
            fields_ = json.loads(meta["identity"])
            identity = ModelIdentity(**{**fields_, "signature": tuple(fields_.get("signature", ()))})
            plans = {float(cr): (Plan.from_json(k), Plan.from_json(v)) for cr, (k, v) in json.loads(meta["plans"]).items()}
            bases = [PCABasis(tensors[f"{s}.mean"].float(), tensors[f"{s}.components"].float()) for s in ("keys", "values")]
        except KVTCFormatError:
            raise
        except Exception as e:  # safetensors, JSON and missing fields all mean the same to the user
            raise KVTCFormatError(f"{path} is not a readable KVTC calibration ({type(e).__name__}: {e})") from None
        p = identity.features
        if any(b.mean.shape != (p,) or b.components.shape[0] != p for b in bases) or \
                any(plan.rank > basis.rank for pair in plans.values() for plan, basis in zip(pair, bases)):
            raise KVTCFormatError(f"{path} is inconsistent: its bases or plans do not fit {identity}")
        calib = cls(identity, *bases, plans)
        if expect is not None:
            calib.check(expect)
        return calib

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"keys.mean": self.keys.mean, "keys.components": self.keys.components,
                "values.mean": self.values.mean, "values.components": self.values.components}

    def _metadata(self) -> dict[str, str]:
        plans = {repr(cr): [k.to_json(), v.to_json()] for cr, (k, v) in self.plans.items()}
        return {"format": FORMAT, "version": VERSION, "identity": json.dumps(asdict(self.identity)), "plans": json.dumps(plans)}

    def _ratios(self) -> str:
        return ", ".join(f"{cr:g}" for cr in sorted(self.plans)) or "no ratio"
