"""The Toeplitz causal kernel on fused Triton kernels, as ``torch.library`` custom ops.

One kernel reads each input tile and its L shifted neighbours once and writes the output: no
padding copy and no layout permutation. The backward kernel produces ``dx`` and per-tile partial
sums of ``dkernel`` together. ``linmix::toeplitz_fwd`` / ``linmix::toeplitz_bwd`` have fake
implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.
"""

import functools
import importlib

import torch

from linmix.ops.common.triton import cdiv, launch_device

BLOCK_T = 32
MAX_BLOCK_D = 128


@functools.cache
def _kernels():
    """The kernel module, imported at the first launch so that TRITON_INTERPRET may be set late."""
    return importlib.import_module("linmix.ops.causal_kernel.triton_kernels")


def _blocks(T: int, D: int) -> tuple[int, int, int, int]:
    """(BT, BD, number of T tiles, number of D tiles)."""
    BD = max(16, min(MAX_BLOCK_D, 1 << (D - 1).bit_length()))
    return BLOCK_T, BD, cdiv(T, BLOCK_T), cdiv(D, BD)


@torch.library.custom_op("linmix::toeplitz_fwd", mutates_args=())
def toeplitz_forward(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y [B, T, H, D] (x's dtype) from x [B, T, H, D] and kernel [H, L] (float32)."""
    B, T, H, D = x.shape
    L = kernel.shape[1]
    x = x.contiguous()
    y = torch.empty_like(x)
    BT, BD, NT, ND = _blocks(T, D)
    with launch_device(x):
        _kernels().toeplitz_fwd_kernel[(NT, ND, B * H)](x, kernel.contiguous(), y, T, H, D, L=L, BT=BT, BD=BD)
    return y


@toeplitz_forward.register_fake
def _(x, kernel):
    return torch.empty_like(x)


@torch.library.custom_op("linmix::toeplitz_bwd", mutates_args=())
def toeplitz_backward(dy: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [B, T, H, D], dkernel [H, L] float32) for the output gradient dy [B, T, H, D]."""
    B, T, H, D = x.shape
    L = kernel.shape[1]
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    BT, BD, NT, ND = _blocks(T, D)
    partial = torch.empty(B, H, NT, ND, L, device=x.device, dtype=torch.float32)
    with launch_device(x):
        _kernels().toeplitz_bwd_kernel[(NT, ND, B * H)](
            x, kernel.contiguous(), dy, dx, partial, T, H, D, NT, ND, L=L, BT=BT, BD=BD
        )
    return dx, partial.sum(dim=(0, 2, 3))


@toeplitz_backward.register_fake
def _(dy, x, kernel):
    return torch.empty_like(x), kernel.new_empty(kernel.shape)


def _setup_context(ctx, inputs, output):
    x, kernel = inputs
    ctx.save_for_backward(x, kernel)


def _backward(ctx, dy):
    x, kernel = ctx.saved_tensors
    dx, dkernel = toeplitz_backward(dy, x, kernel)
    return dx, dkernel.to(kernel.dtype)


toeplitz_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_toeplitz(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Toeplitz causal kernel on Triton: x [B, T, H, D] (fp32/bf16/fp16), kernel [H, L] -> [B, T, H, D].

    Args:
        x: input in its own dtype (sums are float32 inside the kernel).
        kernel: one filter per head; kernel[:, 0] weights the current position.
    Returns:
        y in x's dtype.
    """
    return toeplitz_forward(x, kernel.float())
