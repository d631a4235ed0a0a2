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
