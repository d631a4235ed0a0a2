"""Learned causal kernels applied along the sequence axis.

Two forms: ``dense``, a position-indexed ``[W, W]`` matrix (the K-Operators ``K_base``) of which the
top-left ``T x T`` lower triangle is used; and ``toeplitz``, a relative-position filter ``[L]``
shared by all channels or ``[H, L]`` with one filter per head.

The state of the map is the inputs it still reads: for the Toeplitz form the last ``L - 1``
(zeros before position 0), for the dense form every input so far (its length is the position
the next input takes).
"""

import math

import torch

from linmix.ops._dispatch import Backend, Op, compute_dtype, dispatch, register_op
from linmix.ops._validate import (
    check_choice,
    check_cu_seqlens,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    shape_str,
)
from linmix.ops.causal_kernel.dense import matmul_dense
from linmix.ops.causal_kernel.history import with_history
from linmix.ops.causal_kernel.naive import naive_dense, naive_toeplitz
from linmix.ops.causal_kernel.toeplitz import conv_toeplitz, matmul_toeplitz
from linmix.ops.causal_kernel.triton import triton_toeplitz

FORMS = ("auto", "dense", "toeplitz")


def resolve_form(kernel: torch.Tensor, form: str) -> str:
    """The form ``"auto"`` means for this kernel (a square 2-D kernel is dense), or the explicit one."""
    check_choice("form", form, FORMS)
    if form != "auto":
        return form
    return "dense" if kernel.dim() == 2 and kernel.shape[0] == kernel.shape[1] else "toeplitz"


def state_length(kernel: torch.Tensor, form: str, positions: int) -> int:
    """Positions a state holds after ``positions`` inputs: ``L - 1`` (Toeplitz) or all of them (dense)."""
    return kernel.shape[-1] - 1 if form == "toeplitz" else positions


def _check_taps(kernel: torch.Tensor, form: str) -> None:
    """Raise ValueError unless a Toeplitz kernel has at least one tap."""
    if form == "toeplitz" and kernel.shape[-1] == 0:
        raise ValueError(f"kernel must have at least one tap, got shape {shape_str(kernel)}")


def _validate_kernel(x: torch.Tensor, kernel: torch.Tensor, form: str, positions: int) -> None:
    """Check the kernel against ``x`` (``[B, T, ...]`` or one position ``[B, ...]``) once the form is known.

    Args:
        x: the input.
        kernel: the kernel.
        form: ``"dense"`` or ``"toeplitz"``.
        positions: the last position the call reaches plus one (the dense form needs ``W >= positions``).
    """
    if form == "dense":
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"kernel for the dense form must be square [W, W], got shape {shape_str(kernel)}")
        W = kernel.shape[0]
        if positions > W:
            raise ValueError(f"x: sequence length T={positions} (past positions included) exceeds the kernel "
                             f"window W={W} of kernel {shape_str(kernel)}")
        return
    _check_taps(kernel, form)
    heads_dim = x.dim() - 2  # the H axis of [B, T, H, D] or of one position [B, H, D]
    if kernel.dim() == 2 and (x.dim() not in (3, 4) or x.shape[heads_dim] != kernel.shape[0] or heads_dim < 1):
        raise ValueError(
            f"a per-head kernel [H, L] = {shape_str(kernel)} needs x of shape [B, T, H, D] with "
            f"H={kernel.shape[0]}, got x of shape {shape_str(x)}"
        )


def _validate(x, kernel, form, initial_state, cu_seqlens, backend) -> str:
    """Check the arguments of ``causal_kernel``; return the resolved form."""
    check_tensor("x", x)
    check_tensor("kernel", kernel)
    check_ndim("x", x, (3, 4), "[B, T, D] or [B, T, H, D]")
    check_ndim("kernel", kernel, (1, 2), "[W, W] (dense), [L] or [H, L] (toeplitz)")
    check_same_dtype(("x", x), ("kernel", kernel))
    check_same_device(("x", x), ("kernel", kernel))
    check_choice("backend", backend, OP.backend_names())
    form = resolve_form(kernel, form)
    _check_taps(kernel, form)
    B, T = x.shape[:2]
    sequences, layout = B, "[B, P, *x.shape[2:]]"
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("x", x))
        sequences, layout = cu_seqlens.shape[0] - 1, "[N, P, *x.shape[2:]] (N sequences in cu_seqlens)"
    past = 0
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_same_device(("x", x), ("initial_state", initial_state))
        check_ndim("initial_state", initial_state, (x.dim(),), layout)
        past = initial_state.shape[1]
        rows = state_length(kernel, form, past)
        check_shape("initial_state", initial_state, (sequences, rows, *x.shape[2:]),
                    layout + (" with P = L - 1 past inputs" if form == "toeplitz" else " with P past inputs"))
    _validate_kernel(x, kernel, form, past + T)  # a packed sequence is at most T long
    return form


def causal_kernel(
    x: torch.Tensor,
    kernel: torch.Tensor,
    *,
    form: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mix positions along dim 1 with a learned causal kernel.

    Dense form: ``y[:, t] = sum_{s <= t} kernel[t, s] x[:, s]`` with a ``[W, W]`` kernel and
    ``T <= W``; kernel entries above the diagonal are never read and get zero gradient.
    Toeplitz form: ``y[:, t] = sum_{l <= min(L - 1, t)} kernel[l] x[:, t - l]`` with a ``[L]``
    kernel shared by all channels or an ``[H, L]`` kernel, one filter per head of a 4-D ``x``.
    With ``initial_state`` the call continues a sequence: the state holds the inputs before ``x``
    (see the module docstring) and positions count from its length. fp16/bf16 inputs are computed
    in float32 and returned in their own dtype.

    Zero sizes, alike on every backend: ``B``, ``T`` or a channel dimension of 0 gives an empty
    ``y`` and a final state that is the initial state for ``T = 0`` (for none: ``L - 1`` zeros in
    the Toeplitz form, no position in the dense one) and empty otherwise; gradients are zeros (the
    initial state's is the final state's for ``T = 0``). A Toeplitz kernel without taps (``L = 0``)
    is refused (ValueError), and so is ``T = 0`` with ``cu_seqlens``.

    Size limit: the ``"matmul"`` backend builds a ``[T, T]`` matrix (``[H, T, T]`` in the Toeplitz
    form, ``T`` counting the initial state's positions); a call whose matrix would take more than
    ``linmix.ops.max_dense_bytes()`` (4 GiB unless raised with ``linmix.ops.limit_dense_bytes`` or
    ``LINMIX_MAX_DENSE_BYTES``) is refused with a ValueError giving the bytes it needs.

    Args:
        x: input, ``[B, T, D]`` or ``[B, T, H, D]``.
        kernel: ``[W, W]`` (dense), ``[L]`` or ``[H, L]`` (toeplitz); same dtype and device as ``x``.
        form: ``"dense"``, ``"toeplitz"`` or ``"auto"``: a 1-D kernel is toeplitz, a square 2-D
            kernel is dense, any other 2-D kernel is toeplitz per head. Pass the form explicitly
            for an ``[H, L]`` kernel with ``H == L``.
        initial_state: the inputs before ``x``, ``[B, P, *x.shape[2:]]`` with ``P = L - 1``
            (toeplitz) or the positions already consumed (dense); ``[N, P, ...]`` with
            ``cu_seqlens``. None starts at position 0.
        output_final_state: whether to return the state after the last position (not with
            ``cu_seqlens`` in the dense form, whose packed sequences' states differ in length).
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T, on
            ``x``'s device (``B = 1``); each sequence starts afresh. None for a plain batch.
        backend: ``"naive"`` (token loop), ``"matmul"`` (``[T, T]`` matrix), ``"conv"`` (toeplitz
            only, ``O(T L)``), ``"triton"`` (toeplitz only, fused kernel on CUDA) or ``"auto"``
            (matmul for dense; for toeplitz triton on CUDA where installed, else conv).

    Returns:
        ``y`` with the shape and dtype of ``x``, and the final state (float32, float64 for float64
        inputs) or None unless ``output_final_state``.
    """
    form = _validate(x, kernel, form, initial_state, cu_seqlens, backend)
    if form == "dense" and cu_seqlens is not None and output_final_state:
        raise ValueError("output_final_state=True with cu_seqlens is not supported by the dense form: its state "
                         "holds every input of a sequence, so packed sequences have states of different lengths")
    return dispatch(OP, backend, dict(x=x, kernel=kernel), dict(form=form), initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def causal_kernel_step(
    x: torch.Tensor,
    kernel: torch.Tensor,
    state: torch.Tensor,
    *,
    form: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of ``causal_kernel`` from a carried state: the decoding step.

    Toeplitz: the output weighs the last ``L`` inputs and the state drops its oldest; dense: the
    output is row ``P`` of the kernel (``P`` = the state's length) against every input so far, and
    the state grows by one. It computes in the wider of the state's and the input's dtypes.

    Args:
        x: input of the new position, ``[B, D]`` or ``[B, H, D]``.
        kernel: ``[W, W]`` (dense), ``[L]`` or ``[H, L]`` (toeplitz).
        state: the inputs before it, ``[B, P, *x.shape[1:]]`` (see ``causal_kernel``).
        form: as in ``causal_kernel``.

    Returns:
        ``y`` shaped like ``x`` in its dtype, and the new state in the compute dtype.
    """
    check_tensor("x", x)
    check_tensor("kernel", kernel)
    check_tensor("state", state)
    check_ndim("x", x, (2, 3), "[B, D] or [B, H, D]")
    form = resolve_form(kernel, form)
    if state.dim() != x.dim() + 1 or state.shape[0] != x.shape[0] or state.shape[2:] != x.shape[1:]:
        raise ValueError(f"state must have shape [B, P, *x.shape[1:]] = [{x.shape[0]}, P, "
                         f"{', '.join(map(str, x.shape[1:]))}], got {shape_str(state)}")
    past = state.shape[1]
    if form == "toeplitz" and past != kernel.shape[-1] - 1:
        raise ValueError(f"state must hold the last L - 1 = {kernel.shape[-1] - 1} inputs, got {past}")
    _validate_kernel(x[:, None], kernel, form, past + 1)
    dtype = torch.promote_types(state.dtype, compute_dtype(x.dtype))
    window = torch.cat([state.to(dtype), x.to(dtype)[:, None]], dim=1)  # [B, P + 1, ...]
    if form == "dense":
        weights = kernel[past, : past + 1].to(dtype)  # [P + 1], row P of the kernel
        y = torch.einsum("s,bs...->b...", weights, window)
        return y.to(x.dtype), window
    taps = kernel.to(dtype).flip(-1)  # [..., L], taps[..., j] weighs window[:, j]
    if kernel.dim() == 2:  # per head: window [B, L, H, D]
        y = torch.einsum("hl,blhd->bhd", taps, window)
    else:
        y = torch.einsum("l,bl...->b...", taps, window)
    return y.to(x.dtype), window[:, 1:]


def _result_shapes(tensors: dict, settings: dict, initial_state: torch.Tensor | None,
                   sequences: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``y`` shaped like ``x`` and the final state ``[N, P, *x.shape[2:]]`` (N = B, or the packed sequences)."""
    x, kernel = tensors["x"], tensors["kernel"]
    past = 0 if initial_state is None else initial_state.shape[1]
    rows = state_length(kernel, settings["form"], past + x.shape[1])
    return tuple(x.shape), (sequences, rows, *x.shape[2:])


def _matmul_materializes(x: torch.Tensor, kernel: torch.Tensor, form: str, initial_state: torch.Tensor | None,
                         output_final_state: bool) -> tuple[int, str]:
    """The bytes and description of the matmul backend's largest tensor: its ``[N, N]`` (dense) or
    ``[H, N, N]`` (Toeplitz) mixing matrix over the ``N`` positions of ``initial_state`` and ``x``."""
    positions = x.shape[1] + (0 if initial_state is None else initial_state.shape[1])
    heads = kernel.shape[0] if form == "toeplitz" and kernel.dim() == 2 else 1
    shape = (positions, positions) if form == "dense" else (heads, positions, positions)
    past = "" if initial_state is None else f" after the {initial_state.shape[1]} positions of initial_state"
    what = (f"a {list(shape)} {str(x.dtype).removeprefix('torch.')} {form} mixing matrix for x of shape "
            f"{shape_str(x)}{past}")
    return math.prod(shape) * x.element_size(), what


OP = register_op(Op(
    name="causal_kernel",
    module=__name__,
    fn=causal_kernel,
    backends={
        "naive": Backend(with_history({"dense": naive_dense, "toeplitz": naive_toeplitz}),
                         "token-by-token loop: the executable spec", max_T=2048, limit="token-by-token loop"),
        "matmul": Backend(with_history({"dense": matmul_dense, "toeplitz": matmul_toeplitz}),
                          "one masked [T, T] matrix product", max_T=4096, limit="quadratic memory",
                          materializes=_matmul_materializes),
        "conv": Backend(with_history({"toeplitz": conv_toeplitz}), "depthwise convolution, O(T L)",
                        takes={"form": ("toeplitz",)}),
        "triton": Backend(with_history({"toeplitz": triton_toeplitz}), "fused Triton kernel (CUDA)",
                          native_dtypes=True, float64=False, needs_cuda=True, interpretable=True, requires="triton",
                          takes={"form": ("toeplitz",)}),
    },
    auto=("triton", "conv", "matmul"),
    per_token={"x": (3, 4)},
    step=causal_kernel_step,
    result_shapes=_result_shapes,
))

__all__ = ["OP", "causal_kernel", "causal_kernel_step", "resolve_form"]
