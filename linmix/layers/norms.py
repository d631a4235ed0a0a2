"""Normalisation layers."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias.

    `y = x / sqrt(mean(x^2) + eps) * scale`, eps inside the square root (K-Operators convention).
    """

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in at least float32 (float64 stays float64), returned in x's dtype times the scale."""
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, bias: bool = True) -> nn.Module:
    """Build a norm by name: "rmsnorm" or "layernorm" (optionally without bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {kind!r}")
