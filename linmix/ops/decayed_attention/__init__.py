"""Decayed (gated linear) attention with a per-key-channel decay.

``S_t = diag(gamma_t) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t``: fla's ``chunk_gla`` with
``g = log_gamma``, and the K-Operators K2 decay path (one head, K = r, V = d, scale 1).
"""

import torch

from linmix.ops._dispatch import Backend, Op, dispatch, register_op
from linmix.ops._validate import (
    check_choice,
    check_cu_seqlens,
    check_finite_number,
    check_log_decay,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    shape_str,
)
from linmix.ops.decayed_attention.chunk import chunk_decayed_attention
from linmix.ops.decayed_attention.fla import fla_decayed_attention
from linmix.ops.decayed_attention.mask import mask_decayed_attention
from linmix.ops.decayed_attention.naive import naive_decayed_attention
from linmix.ops.decayed_attention.triton import triton_decayed_attention


def _validate(q, k, v, log_gamma, scale, initial_state, cu_seqlens, backend, check_values: bool) -> None:
    """Check the arguments of ``decayed_attention``; raise ValueError/TypeError naming the culprit."""
    for name, x in (("q", q), ("k", k), ("v", v), ("log_gamma", log_gamma)):
        check_tensor(name, x)
    check_ndim("q", q, (4,), "[B, T, H, K]")
    check_ndim("k", k, (4,), "[B, T, H, K]")
    check_ndim("v", v, (4,), "[B, T, H, V]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_shape("k", k, (B, T, H, K), "[B, T, H, K] like q")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V] like q, got {shape_str(v)}")
    if K == 0:
        raise ValueError(f"q must have at least one key channel, got K=0 (shape {shape_str(q)}): the state "
                         "[B, H, K, V] would hold nothing and scale=None means K ** -0.5")
    check_same_dtype(("q", q), ("k", k), ("v", v))
    check_same_device(("q", q), ("k", k), ("v", v), ("log_gamma", log_gamma))
    if log_gamma.shape not in ((H, K), (B, T, H, K)):
        raise ValueError(
            f"log_gamma must have shape [H, K] = [{H}, {K}] (constant) or [B, T, H, K] = [{B}, {T}, {H}, {K}] "
            f"(per token), got {shape_str(log_gamma)}"
        )
    if check_values:
        check_log_decay("log_gamma", log_gamma)
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("q", q))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_same_device(("q", q), ("initial_state", initial_state))
        if cu_seqlens is None:
            check_shape("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
        else:
            N = cu_seqlens.shape[0] - 1
            check_shape("initial_state", initial_state, (N, H, K, V), "[N, H, K, V] (N sequences in cu_seqlens)")
    if scale is not None:
        check_finite_number("scale", scale)
    check_choice("backend", backend, OP.backend_names())


def decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention whose state decays per key channel.

    ``S_t = diag(exp(log_gamma_t)) S_{t-1} + k_t v_t^T`` with ``S_0 = initial_state`` (zeros if None),
    and ``o_t = scale * S_t^T q_t``: the current position is included. fp16/bf16 inputs are
    computed in float32, float64 inputs in float64 (on the ``"chunk"`` form for the ``"triton"``
    and ``"fla"`` backends, whose kernels stop at float32).

    With ``cu_seqlens`` (FlashAttention's and fla's convention) the batch holds ``N`` sequences
    packed along T with ``B = 1``; each runs as if alone, its state starting from its row of
    ``initial_state`` (zeros if None).

    Zero sizes, alike on every backend: ``B``, ``T``, ``H`` or ``V`` of 0 gives an empty ``o`` and
    a final state that is the initial state for ``T = 0`` (zeros if None) and empty otherwise;
    gradients are zeros (the initial state's is the final state's for ``T = 0``). ``K = 0`` is
    refused (ValueError), and so is ``T = 0`` with ``cu_seqlens`` (every packed sequence holds a
    position).

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``, same dtype and device as ``q``.
        v: values, ``[B, T, H, V]``, same dtype and device as ``q``.
        log_gamma: natural log of the decay, ``<= 0`` and finite: ``[H, K]`` for a decay constant
            in time, or ``[B, T, H, K]`` for one per token.
        scale: factor applied to every output; None means ``K ** -0.5`` (the K2 mixer passes 1.0).
        initial_state: ``[B, H, K, V]`` state before the first position (``[N, H, K, V]``, one
            per sequence, with ``cu_seqlens``), or None.
        output_final_state: whether to return the state after the last position.
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T, on
            ``q``'s device: 0 first, T last, strictly increasing; requires ``B = 1``. None for a
            plain batch.
        backend: ``"naive"`` (token loop), ``"mask"`` (quadratic), ``"chunk"`` (chunked),
            ``"triton"`` (fused kernels, where triton is installed), ``"fla"`` (fla's
            ``chunk_gla`` on CUDA, where flash-linear-attention is installed) or ``"auto"``
            (a fused kernel on CUDA when registered, else ``"chunk"``).
        check_values: whether to read ``log_gamma`` back and check that it is finite and ``<= 0``.
            On a GPU that read waits for the device; a caller whose decays are in range by
            construction (the K2 mixer) passes False. Shapes, dtypes and devices are always checked.

    Returns:
        ``o``: ``[B, T, H, V]`` in ``v``'s dtype.
        ``final_state``: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) in float32
        (float64 for float64 inputs), or None unless ``output_final_state``.
    """
    _validate(q, k, v, log_gamma, scale, initial_state, cu_seqlens, backend, check_values)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return dispatch(OP, backend, dict(q=q, k=k, v=v, log_gamma=log_gamma), dict(scale=scale),
                    initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def decayed_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of ``decayed_attention`` from a carried state: the decoding step.

    ``S = diag(exp(log_gamma)) state + k v^T`` and ``o = scale * S^T q``, in a few batched tensor
    operations (no kernel launch per chunk, no check that reads values back from the device), so
    every backend decodes through it. It computes in the wider of the state's and the inputs' dtypes
    (float32 for 16-bit inputs and a float32 state).

    Args:
        q: queries of the new position, ``[B, H, K]``.
        k: keys, ``[B, H, K]``.
        v: values, ``[B, H, V]``.
        log_gamma: log decay ``<= 0``, ``[H, K]`` (constant) or ``[B, H, K]`` (this position's).
        state: ``[B, H, K, V]``, the state after the previous position.
        scale: factor applied to the output; None means ``K ** -0.5``.

    Returns:
        ``o`` of shape ``[B, H, V]`` in ``v``'s dtype and the new state ``[B, H, K, V]`` in the compute dtype.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("log_gamma", log_gamma), ("state", state)):
        check_tensor(name, x)
    check_ndim("q", q, (3,), "[B, H, K]")
    check_ndim("v", v, (3,), "[B, H, V]")
    B, H, K = q.shape
    V = v.shape[-1]
    check_shape("k", k, (B, H, K), "[B, H, K] like q")
    check_shape("v", v, (B, H, V), "[B, H, V]")
    check_shape("state", state, (B, H, K, V), "[B, H, K, V]")
    if K == 0:
        raise ValueError(f"q must have at least one key channel, got K=0 (shape {shape_str(q)})")
    if log_gamma.shape not in ((H, K), (B, H, K)):
        raise ValueError(
            f"log_gamma must have shape [H, K] = [{H}, {K}] or [B, H, K] = [{B}, {H}, {K}], got {shape_str(log_gamma)}"
        )
    scale = K**-0.5 if scale is None else float(scale)
    dtype = torch.promote_types(state.dtype, q.dtype)
    gamma = torch.exp(log_gamma.to(dtype))  # [H, K] or [B, H, K]
    state = gamma[..., None] * state.to(dtype) + k.to(dtype)[..., None] * v.to(dtype)[..., None, :]  # [B, H, K, V]
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(dtype), state)  # [B, H, V]
    return o.to(v.dtype), state


def _result_shapes(tensors: dict, settings: dict, initial_state: torch.Tensor | None,
                   sequences: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``o [B, T, H, V]`` and the final state ``[N, H, K, V]`` (N = B, or the packed sequences)."""
    q, v = tensors["q"], tensors["v"]
    return tuple(v.shape), (sequences, *q.shape[2:], v.shape[3])


OP = register_op(Op(
    name="decayed_attention",
    module=__name__,
    fn=decayed_attention,
    backends={
        "naive": Backend(naive_decayed_attention, "token-by-token loop: the executable spec", max_T=2048,
                         limit="token-by-token loop"),
        "mask": Backend(mask_decayed_attention, "quadratic, through an explicit [T, T] decay tensor", max_T=4096,
                        limit="quadratic memory"),
        "chunk": Backend(chunk_decayed_attention, "chunked parallel form in PyTorch (CPU and GPU)"),
        "triton": Backend(triton_decayed_attention, "fused chunked Triton kernels, float32 states",
                          native_dtypes=True, varlen=True, float64=False, needs_cuda=True, interpretable=True,
                          requires="triton"),
        "fla": Backend(fla_decayed_attention, "flash-linear-attention's chunk_gla (CUDA)", native_dtypes=True,
                       varlen=True, float64=False, needs_cuda=True, requires="fla"),
    },
    auto=("triton", "chunk"),
    per_token={"q": (4,), "k": (4,), "v": (4,), "log_gamma": (4,)},
    float32_args=("log_gamma",),
    step=decayed_attention_step,
    result_shapes=_result_shapes,
))

__all__ = ["OP", "decayed_attention", "decayed_attention_step"]
