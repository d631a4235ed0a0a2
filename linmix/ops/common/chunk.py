"""Chunk layout helpers of the chunked PyTorch forms."""

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Zero-pad ``[B, T, ...]`` to a multiple of ``chunk_size`` and reshape to ``[B, N, C, ...]``.

    Args:
        x: a tensor with the sequence on dim 1.
        chunk_size: positions per chunk ``C``.

    Returns:
        ``[B, N, C, ...]`` with ``N = ceil(T / C)``; the positions past ``T`` are zeros.
    """
    B, T = x.shape[:2]
    pad = -T % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(B, (T + pad) // chunk_size, chunk_size, *x.shape[2:])


def heads_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, H, ...]`` zero-padded and cut into ``[B, H, N, C, ...]`` (heads before chunks)."""
    return to_chunks(x, chunk_size).movedim(3, 1)


def heads_unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """The inverse of ``heads_chunks``: ``[B, H, N, C, ...]`` to ``[B, T, H, ...]``."""
    x = x.movedim(1, 3)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]


def segsum(g: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` log decays to ``[..., C, C]``: ``sum_{j < r <= i} g_r`` for ``j <= i``, ``-inf`` above.

    Summed directly down each column (no difference of prefix sums), so every entry is exact to
    rounding of its own span and ``exp`` of it is the decay product a recurrence multiplies.
    """
    C = g.shape[-1]
    pos = torch.arange(C, device=g.device)
    steps = g[..., :, None].masked_fill(pos[:, None] <= pos[None, :], 0.0)  # [..., C, C]: g_i where j < i
    return steps.cumsum(dim=-2).masked_fill(pos[:, None] < pos[None, :], -torch.inf)


def suffix_after(g: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``sum_{r > j} g_r`` along ``dim`` (0 at the last position)."""
    inclusive = g.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([inclusive.narrow(dim, 1, g.shape[dim] - 1), torch.zeros_like(g.narrow(dim, 0, 1))], dim=dim)
