"""Dense causal kernel as one masked matmul."""

import torch


def matmul_dense(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y = tril(kernel[:T, :T]) @ x`` along the sequence axis; ``O(T^2 F)``.

    ``tril`` passes no gradient above the diagonal, so those kernel entries get exactly zero.

    Args:
        x: input, ``[B, T, F]``.
        kernel: position-indexed kernel, ``[W, W]`` with ``W >= T``.

    Returns:
        ``y`` of shape ``[B, T, F]``.
    """
    T = x.shape[1]
    mixing = torch.tril(kernel[:T, :T])  # [T, T]
    return torch.einsum("ts,bsf->btf", mixing, x)
