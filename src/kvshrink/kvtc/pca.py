"""KVTC's feature space and its PCA basis (paper §3.1, Eqs. 2–3).

One feature vector per token: that token's keys (RoPE undone) or values concatenated over all layers
and KV heads, in the order [layer 0 head 0 d0..D−1, layer 0 head 1, …, layer L−1 head H−1], so
p = L·H·D and each layer owns a contiguous block of columns. Heads and layers share a subspace, which is
why one PCA over all of them beats per-head or per-layer PCA (paper App. B.10). Keys and values each
get their own basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import undo_rope

COVARIANCE_MAX_FEATURES = 16_384  # a float64 p x p covariance of 2 GiB

def token_features(x: torch.Tensor) -> torch.Tensor:
    """(L, H, T, D) -> (T, L·H·D)."""
    L, H, T, D = x.shape
    return x.permute(2, 0, 1, 3).reshape(T, L * H * D)


def from_features(f: torch.Tensor, layers: int, heads: int, head_dim: int) -> torch.Tensor:
    """(T, L·H·D) -> (L, H, T, D)."""
    return f.reshape(f.shape[0], layers, heads, head_dim).permute(1, 2, 0, 3)


def features(K: torch.Tensor, V: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K (post-RoPE), V: (L, H, T, D); cos, sin: (1, T, D) -> key features (RoPE undone), value features (T, p) fp32."""
    return token_features(undo_rope(K.float(), cos.float(), sin.float())), token_features(V.float())


def cache_features(keys, values, cos, sin, sinks: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rows from one cache: (T − sinks, p) key features and value features.

    keys (post-RoPE), values: per layer (1, H, T, D); cos, sin: (1, T, D). Sinks are left out as in the
    paper: they are never compressed, and their outlying statistics would skew the basis.
    """
    K, V = torch.cat(list(keys))[:, :, sinks:], torch.cat(list(values))[:, :, sinks:]
    return features(K, V, cos[:, sinks:], sin[:, sinks:])


@dataclass(frozen=True)
class PCABasis:
    """Mean μ (p,) and orthonormal components V (p, r), by descending variance; D = (X − μ)V, X̂ = D Vᵀ + μ."""

    mean: torch.Tensor
    components: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, rank: int | None = None, niter: int = 8, seed: int = 0, method: str = "auto",
            chunk: int = 8192) -> PCABasis:
        """x: (n, p) feature rows; neither method makes a centred copy of x (100K rows of a small model's
        features are already gigabytes).

        covariance: exact PCA, the eigenvectors of the p x p covariance accumulated in float64 over row
          chunks; the default while p <= COVARIANCE_MAX_FEATURES (then it is also the cheaper one).
        randomized: randomized SVD (Halko et al., as in the paper) of the implicitly centred rows, for
          larger p with a rank cap (paper: 8-10K)."""
        n, p = x.shape
        rank = min(rank or min(n, p), n, p)
        if method == "auto":
            method = "covariance" if p <= COVARIANCE_MAX_FEATURES else "randomized"
        if method not in ("covariance", "randomized"):
            raise ValueError(f"PCA method must be covariance or randomized (got {method!r})")
        mean = sum(x[i:i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
        if method == "covariance":
            cov = torch.zeros(p, p, dtype=torch.float64)
            for i in range(0, n, chunk):
                rows = x[i:i + chunk].double() - mean  # float64: squaring in float32 would blur the small components
                cov += rows.T @ rows
            _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
            components = vectors.flip(1)[:, :rank].float()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _, _, components = torch.svd_lowrank(x.float(), q=rank, niter=niter, M=mean.float()[None])
        # eigen/singular vectors have no sign of their own; fix one (sklearn's svd_flip: each component's
        # largest loading positive) so that both methods, and every BLAS, give the same basis
        flip = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
        return cls(mean.float(), (components * flip).contiguous())

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def project(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """(n, p) -> (n, rank) coordinates on the leading `rank` components."""
        return (x.float() - self.mean) @ self.components[:, :rank]

    def reconstruct(self, d: torch.Tensor) -> torch.Tensor:
        """(n, k) coordinates on the leading k components -> (n, p)."""
        return d @ self.components[:, : d.shape[1]].T + self.mean

    def truncate(self, rank: int) -> PCABasis:
        return PCABasis(self.mean, self.components[:, :rank].contiguous())
