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
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, bias: bool = True) -> nn.Module:
    """Build a norm by name: "rmsnorm" or "layernorm" (optionally without bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {kind!r}")
