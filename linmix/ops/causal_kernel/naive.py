"""Token-by-token causal kernels: the executable spec of both forms."""

import torch


def naive_dense(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_{s <= t} kernel[t, s] x[s]``, one output position at a time.

    Only ``kernel[t, :t + 1]`` is read, so entries above the diagonal get exactly zero gradient.

    Args:
        x: input, ``[B, T, F]``.
        kernel: position-indexed kernel, ``[W, W]`` with ``W >= T``.

    Returns:
        ``y`` of shape ``[B, T, F]``.
    """
    T = x.shape[1]
    kernel_rows = kernel[:T].unbind(0)  # T rows of [W]
    rows = [torch.einsum("s,bsf->bf", kernel_rows[t][: t + 1], x[:, : t + 1]) for t in range(T)]
    return torch.stack(rows, dim=1)  # [B, T, F]


def naive_toeplitz(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_{l <= min(L - 1, t)} kernel[l] x[t - l]`` per head, one position at a time.

    Args:
        x: input, ``[B, T, H, D]``.
        kernel: one filter per head, ``[H, L]``; ``kernel[:, 0]`` weights the current position.

    Returns:
        ``y`` of shape ``[B, T, H, D]``.
    """
    T, L = x.shape[1], kernel.shape[1]
    rows = []
    for t in range(T):
        taps = min(L, t + 1)
        past = x[:, t - taps + 1 : t + 1].flip(1)  # [B, taps, H, D], past[:, l] = x[:, t - l]
        rows.append(torch.einsum("hl,blhd->bhd", kernel[:, :taps], past))
    return torch.stack(rows, dim=1)  # [B, T, H, D]
