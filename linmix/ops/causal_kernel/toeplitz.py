"""Toeplitz (relative-position) causal kernels: a depthwise convolution and a dense reference."""

import torch
import torch.nn.functional as F


def conv_toeplitz(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_{l <= min(L - 1, t)} kernel[l] x[t - l]`` per head as a depthwise conv; ``O(T L)``.

    Args:
        x: input, ``[B, T, H, D]``.
        kernel: one filter per head, ``[H, L]``; ``kernel[:, 0]`` weights the current position.

    Returns:
        ``y`` of shape ``[B, T, H, D]``.
    """
    B, T, H, D = x.shape
    L = kernel.shape[1]
    channels = x.permute(0, 2, 3, 1).reshape(B, H * D, T)  # [B, H*D, T]
    channels = F.pad(channels, (L - 1, 0))  # [B, H*D, L-1+T], zeros before the first position
    # conv1d correlates, so the taps are flipped: weight[..., L-1-l] multiplies x[t - l].
    weight = kernel.flip(-1)[:, None, None, :].expand(H, D, 1, L).reshape(H * D, 1, L)
    y = F.conv1d(channels, weight, groups=H * D)  # [B, H*D, T]
    return y.reshape(B, H, D, T).permute(0, 3, 1, 2)  # [B, T, H, D]


def matmul_toeplitz(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same map through a materialised ``[H, T, T]`` Toeplitz matrix; ``O(T^2 D)``, a reference.

    The matrix is the only ``T x T`` tensor built: sliding windows of the zero-padded filter.

    Args:
        x: input, ``[B, T, H, D]``.
        kernel: one filter per head, ``[H, L]``.

    Returns:
        ``y`` of shape ``[B, T, H, D]``.
    """
    T = x.shape[1]
    taps = kernel[:, :T]  # [H, min(L, T)]: lags past T - 1 reach no output
    by_lag = F.pad(taps, (T - 1, T - taps.shape[1]))  # [H, 2T - 1], by_lag[:, T - 1 + l] = kernel[:, l], 0 elsewhere
    mixing = by_lag.unfold(-1, T, 1).flip(-1)  # [H, T, T], mixing[h, t, s] = by_lag[h, T - 1 + t - s]
    return torch.einsum("hts,bshd->bthd", mixing, x)
