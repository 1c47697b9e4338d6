"""Feature maps phi (PAPER.md 1d) and the normalisation of phi(k), phi(q) (PAPER.md 1c).

The layer applies these before the update rule; the ops in ``ops.py`` see only the mapped, normalised keys/queries.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAP_NAMES = ("elu_plus_one", "dpfp", "favor", "silu", "relu", "identity")
QK_NORM_KINDS = ("sum", "l2", "none")


class ElementwiseFeatureMap(nn.Module):
    """phi applied per coordinate; d_dot = head_dim, so it adds no capacity."""

    def __init__(self, name: str, head_dim: int):
        super().__init__()
        self.name = name
        self.out_dim = head_dim

    def forward(self, x):
        if self.name == "elu_plus_one":
            return F.elu(x) + 1.0
        if self.name == "silu":
            return F.silu(x)
        if self.name == "relu":
            return F.relu(x)
        return x

    def redraw(self, generator=None):
        pass

    def extra_repr(self):
        return f"{self.name}, out_dim={self.out_dim}"


class DPFP(nn.Module):
    """Deterministic parameter-free projection (Eqs. 33-37): r = [relu(x), relu(-x)], then the products of r with its
    cyclic shifts 1..nu, concatenated. d_dot = 2 * head_dim * nu."""

    def __init__(self, head_dim: int, nu: int):
        super().__init__()
        if not 1 <= nu < 2 * head_dim:
            raise ValueError(f"dpfp_nu={nu} is not valid; allowed: 1 <= dpfp_nu <= {2 * head_dim - 1} for head_dim={head_dim}.")
        self.nu = nu
        self.out_dim = 2 * head_dim * nu

    def forward(self, x):
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
        return torch.cat([r * torch.roll(r, shifts=j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)

    def redraw(self, generator=None):
        pass

    def extra_repr(self):
        return f"nu={self.nu}, out_dim={self.out_dim}"


def orthogonal_gaussian_matrix(rows: int, cols: int, generator=None, device=None) -> torch.Tensor:
    """A [rows, cols] matrix whose rows are orthogonal within blocks of `cols` and whose row norms follow the norms
    of Gaussian vectors (FAVOR+'s orthogonal random features)."""
    blocks = []
    for start in range(0, rows, cols):
        gaussian = torch.randn(cols, cols, generator=generator, device=device)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T[: min(cols, rows - start)])
    directions = torch.cat(blocks, dim=0)
    norms = torch.randn(rows, cols, generator=generator, device=device).norm(dim=1, keepdim=True)
    return directions * norms


class FavorPlus(nn.Module):
    """FAVOR+ positive random features (Eqs. 31-32): phi(x) = [exp(Rx - |x|^2/2), exp(-Rx - |x|^2/2)] / sqrt(2m).

    R is a saved buffer so a reloaded model computes the same features; the model redraws it before each training
    forward when ``favor_redraw`` is on (as the paper does) and keeps it fixed in eval."""

    def __init__(self, head_dim: int, num_features: int):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"favor_features={num_features} is not valid; it must be an integer >= 1.")
        self.num_features = num_features
        self.out_dim = 2 * num_features
        self.register_buffer("projection", orthogonal_gaussian_matrix(num_features, head_dim))

    @torch.no_grad()
    def redraw(self, generator=None):
        """New random features; pass a seeded CPU `generator` to make the draw reproducible across processes."""
        fresh = orthogonal_gaussian_matrix(*self.projection.shape, generator=generator)
        # A new tensor, not an in-place copy: a previous forward's graph may still hold the old matrix for its backward
        # (two training forwards before one backward, as preference-tuning losses do).
        self.projection = fresh.to(self.projection.device, self.projection.dtype)

    def forward(self, x):
        # exp in (at least) fp32: half precision overflows quickly here.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        u = x32 @ self.projection.to(x32.dtype).T
        half_sq_norm = 0.5 * x32.pow(2).sum(-1, keepdim=True)
        # 1e-4 as in the official LM code, so no feature is exactly zero.
        phi = torch.cat([torch.exp(u - half_sq_norm), torch.exp(-u - half_sq_norm)], dim=-1) + 1e-4
        return (phi / math.sqrt(self.out_dim)).to(x.dtype)

    def extra_repr(self):
        return f"num_features={self.num_features}, out_dim={self.out_dim}"


def build_feature_map(name: str, head_dim: int, dpfp_nu: int = 1, favor_features: int = 64) -> nn.Module:
    """Returns the feature map module `name`; its `out_dim` is the key size the update rule sees."""
    if name == "dpfp":
        return DPFP(head_dim, dpfp_nu)
    if name == "favor":
        return FavorPlus(head_dim, favor_features)
    if name in FEATURE_MAP_NAMES:
        return ElementwiseFeatureMap(name, head_dim)
    raise ValueError(f"feature_map={name!r} is not valid; allowed values: {', '.join(map(repr, FEATURE_MAP_NAMES))}.")


def normalize_qk(x: torch.Tensor, kind: str, eps: float = 1e-5) -> torch.Tensor:
    """'sum': divide by the sum of the features (Eq. 29; eps keeps an all-zero DPFP vector finite);
    'l2': unit L2 norm (modern DeltaNet); 'none': unchanged."""
    if kind == "sum":
        return x / (x.sum(dim=-1, keepdim=True) + eps)
    if kind == "l2":
        return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)
    if kind == "none":
        return x
    raise ValueError(f"qk_norm={kind!r} is not valid; allowed values: {', '.join(map(repr, QK_NORM_KINDS))}.")
