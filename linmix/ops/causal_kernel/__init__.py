"""Learned causal kernels applied along the sequence axis.

Two forms: ``dense``, a position-indexed ``[W, W]`` matrix (the K-Operators ``K_base``) of which the
top-left ``T x T`` lower triangle is used; and ``toeplitz``, a relative-position filter ``[L]``
shared by all channels or ``[H, L]`` with one filter per head.
"""

import importlib.util

import torch

from linmix.ops._validate import (
    check_choice,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_tensor,
    compute_dtype,
    shape_str,
)
from linmix.ops.causal_kernel.dense import matmul_dense
from linmix.ops.causal_kernel.naive import naive_dense, naive_toeplitz
from linmix.ops.causal_kernel.toeplitz import conv_toeplitz, matmul_toeplitz

# form -> backend name -> function. Dense: (x [B, T, F], kernel [W, W]) -> [B, T, F].
# Toeplitz: (x [B, T, H, D], kernel [H, L]) -> [B, T, H, D].
BACKENDS = {
    "dense": {"naive": naive_dense, "matmul": matmul_dense},
    "toeplitz": {"naive": naive_toeplitz, "matmul": matmul_toeplitz, "conv": conv_toeplitz},
}
if importlib.util.find_spec("triton") is not None:  # the fused kernel needs the optional triton package
    from linmix.ops.causal_kernel.triton import triton_toeplitz

    BACKENDS["toeplitz"]["triton"] = triton_toeplitz
AUTO_BACKEND = {"dense": "matmul", "toeplitz": "conv"}
NATIVE_DTYPE_BACKENDS = frozenset({"triton"})  # accumulate in float32 themselves: no upcast copy
ALL_BACKENDS = tuple(dict.fromkeys(name for table in BACKENDS.values() for name in table))
FORMS = ("auto", "dense", "toeplitz")


def _resolve_form(kernel: torch.Tensor, form: str) -> str:
    """The form an ``auto`` request means for this kernel, or the explicit one."""
    check_choice("form", form, FORMS)
    if form != "auto":
        return form
    if kernel.dim() == 2 and kernel.shape[0] == kernel.shape[1]:
        return "dense"
    return "toeplitz"


def _validate(x: torch.Tensor, kernel: torch.Tensor, form: str, backend: str) -> None:
    """Check the arguments of ``causal_kernel`` once ``form`` is resolved."""
    T = x.shape[1]
    if T == 0:
        raise ValueError(f"x has sequence length T=0 (shape {shape_str(x)}); need at least one position")
    if backend != "auto" and backend not in BACKENDS[form]:
        valid = ", ".join(repr(name) for name in (*BACKENDS[form], "auto"))
        raise ValueError(f"backend {backend!r} does not support the {form} form; valid backends for it are {valid}")
    if form == "dense":
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"kernel for the dense form must be square [W, W], got shape {shape_str(kernel)}")
        W = kernel.shape[0]
        if T > W:
            raise ValueError(f"x: sequence length T={T} exceeds the kernel window W={W} of kernel {shape_str(kernel)}")
        return
    if kernel.shape[-1] == 0:
        raise ValueError(f"kernel must have at least one tap, got shape {shape_str(kernel)}")
    if kernel.dim() == 2 and (x.dim() != 4 or x.shape[2] != kernel.shape[0]):
        raise ValueError(
            f"a per-head kernel [H, L] = {shape_str(kernel)} needs x of shape [B, T, H, D] with "
            f"H={kernel.shape[0]}, got x of shape {shape_str(x)}"
        )


def causal_kernel(
    x: torch.Tensor,
    kernel: torch.Tensor,
    *,
    form: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Mix positions along dim 1 with a learned causal kernel.

    Dense form: ``y[:, t] = sum_{s <= t} kernel[t, s] x[:, s]`` with a ``[W, W]`` kernel and
    ``T <= W``; kernel entries above the diagonal are never read and get zero gradient.
    Toeplitz form: ``y[:, t] = sum_{l <= min(L - 1, t)} kernel[l] x[:, t - l]`` with a ``[L]``
    kernel shared by all channels or an ``[H, L]`` kernel, one filter per head of a 4-D ``x``.
    fp16/bf16 inputs are computed in float32 and returned in their own dtype.

    Args:
        x: input, ``[B, T, D]`` or ``[B, T, H, D]``.
        kernel: ``[W, W]`` (dense), ``[L]`` or ``[H, L]`` (toeplitz); same dtype and device as ``x``.
        form: ``"dense"``, ``"toeplitz"`` or ``"auto"``: a 1-D kernel is toeplitz, a square 2-D
            kernel is dense, any other 2-D kernel is toeplitz per head. Pass the form explicitly
            for an ``[H, L]`` kernel with ``H == L``.
        backend: ``"naive"`` (token loop), ``"matmul"`` (``[T, T]`` matrix), ``"conv"`` (toeplitz
            only, ``O(T L)``), ``"triton"`` (toeplitz only, fused kernel; needs triton) or
            ``"auto"`` (matmul for dense; for toeplitz triton on CUDA where installed, else conv).

    Returns:
        ``y`` with the shape and dtype of ``x``.
    """
    check_tensor("x", x)
    check_tensor("kernel", kernel)
    check_ndim("x", x, (3, 4), "[B, T, D] or [B, T, H, D]")
    check_ndim("kernel", kernel, (1, 2), "[W, W] (dense), [L] or [H, L] (toeplitz)")
    check_same_dtype(("x", x), ("kernel", kernel))
    check_same_device(("x", x), ("kernel", kernel))
    check_choice("backend", backend, (*ALL_BACKENDS, "auto"))
    form = _resolve_form(kernel, form)
    _validate(x, kernel, form, backend)
    if backend == "auto":
        backend = "triton" if x.is_cuda and "triton" in BACKENDS[form] else AUTO_BACKEND[form]
    fn = BACKENDS[form][backend]

    dtype = x.dtype if backend in NATIVE_DTYPE_BACKENDS else compute_dtype(x.dtype)
    B, T = x.shape[:2]
    xc, kc = x.to(dtype), kernel.to(dtype)
    if form == "dense":
        y = fn(xc.reshape(B, T, -1), kc)  # [B, T, F], F = all channels
    elif kernel.dim() == 1:
        y = fn(xc.reshape(B, T, 1, -1), kc[None])  # one head holding all channels
    else:
        y = fn(xc, kc)  # [B, T, H, D]
    return y.reshape(x.shape).to(x.dtype)


__all__ = ["AUTO_BACKEND", "BACKENDS", "causal_kernel"]
