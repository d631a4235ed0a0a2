"""Gated KalmaNet (GKA): the output of a decayed test-time ridge regression (spec/gated_kalmanet.md).

``H_t = gamma_t H_{t-1} + k_t k_t^T`` and ``U_t = gamma_t U_{t-1} + k_t v_t^T`` (keys and values scaled by
``beta_t``), ``x_t ~ (H_t + lambda_t I)^{-1} q_t`` with the adaptive ridge ``lambda_t = ridge ||H_t||_F`` by
Chebyshev iteration, and ``o_t = scale U_t^T (q_t + alpha_t (x_t - q_t))``. States are key-major like fla's.
"""

from __future__ import annotations

import torch

from linmix.ops._dispatch import Backend, Op, dispatch, register_op
from linmix.ops._validate import check_choice
from linmix.ops.gated_kalman.chunk import chunk_gated_kalman
from linmix.ops.gated_kalman.naive import State, exact_gated_kalman, gka_step, naive_gated_kalman
from linmix.ops.gated_kalman.solve import token_solve
from linmix.ops.gated_kalman.triton import triton_gated_kalman
from linmix.ops.gated_kalman.validate import check_arguments, check_ranges


def gated_kalman(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    ridge: float = 0.02,
    iters: int = 30,
    alpha: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> tuple[torch.Tensor, State | None]:
    """Gated KalmaNet over a sequence: a decayed ridge regression read out at every position.

    Per position and head (spec/gated_kalmanet.md §2, §6):

    1. ``k <- beta k``, ``v <- beta v`` (so the states accumulate ``beta^2``);
    2. ``H = exp(g) H + k k^T`` ``[K, K]`` and ``U = exp(g) U + k v^T`` ``[K, V]``;
    3. ``x ~ (H + lambda I)^{-1} q`` with ``lambda = ridge * ||H||_F``, by ``iters`` Chebyshev steps on the
       eigenvalue bounds ``[lambda, lambda + ||H||_F]`` (``omega_0 = 2``; condition number at most
       ``(1 + ridge) / ridge``, 51 at the default; an all-zero ``H`` takes ``||H||_F = 1e-12``);
    4. ``o = scale * U^T (q + alpha (x - q))``: ``alpha = None`` means 1, the pure ridge readout
       (the reference code's "no alpha connection"); ``alpha = 0`` is scalar-gated linear attention.

    q and k are used as given (the layer L2-normalises them). The gradient is implicit
    differentiation, as in the paper: the gradient of the exact solve at the iteration's result
    (``linmix.ops.gated_kalman.solve``); ``backend="exact"`` solves exactly. fp16/bf16 inputs are
    computed in float32, float64 inputs in float64. With ``cu_seqlens`` (FlashAttention's and fla's
    convention) the batch holds ``N`` sequences packed along T with ``B = 1``; each runs as if alone
    from its row of ``initial_state``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``, q's dtype and device.
        v: values ``[B, T, H, V]``, q's dtype.
        g: natural-log decay ``[B, T, H]``, finite and ``<= 0`` (one for both states).
        beta: strength ``[B, T, H]``, finite and ``>= 0``: scales keys and values (the layer passes
            ``sigmoid + 1e-6``).
        ridge: ``lambda_t = ridge * ||H_t||_F``, ``> 0`` (0.02 in the paper).
        iters: Chebyshev steps per position, ``>= 0`` (30 in the paper: relative error about 3e-4 at
            ``ridge = 0.02``).
        alpha: mixing weight ``[B, T, H]`` in ``[0, 1]``, or None for 1.
        scale: factor of the readout; None means ``K ** -0.5``.
        initial_state: the pair ``(H [B, H, K, K], U [B, H, K, V])`` (``[N, ...]`` with ``cu_seqlens``),
            ``H`` symmetric positive semi-definite; or None for zeros.
        output_final_state: whether to return the state after the last position.
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T (``B = 1``),
            on q's device; None for a plain batch.
        backend: ``"naive"`` (token loop, Chebyshev), ``"exact"`` (token loop, ``torch.linalg.solve``;
            ``iters`` unused), ``"chunk"`` (chunked PyTorch), ``"triton"`` (Triton kernels, ``K <= 128``)
            or ``"auto"`` (``"triton"`` on CUDA, else ``"chunk"``).
        check_values: whether to read the gates, strengths, mixing weights and the initial Gram state
            back (one read) and check their ranges. On a GPU the read waits for the device; a caller
            whose values are in range by construction passes False. Shapes, dtypes and devices are
            always checked.

    Returns:
        ``o``: ``[B, T, H, V]`` in q's dtype.
        ``final_state``: ``(H [B, H, K, K], U [B, H, K, V])`` (``[N, ...]`` with ``cu_seqlens``) in
        float32 (float64 for float64 inputs), or None unless ``output_final_state``.

    Examples::
        >>> q, k = (torch.nn.functional.normalize(torch.randn(2, 100, 4, 64), dim=-1) for _ in range(2))
        >>> v, g = torch.randn(2, 100, 4, 64), torch.nn.functional.logsigmoid(3 + torch.randn(2, 100, 4))
        >>> beta, alpha = torch.rand(2, 100, 4), torch.rand(2, 100, 4)
        >>> o, (H, U) = gated_kalman(q, k, v, g, beta, alpha=alpha, output_final_state=True)
    """
    check_arguments(q=q, k=k, v=v, g=g, beta=beta, alpha=alpha, ridge=ridge, iters=iters, scale=scale,
                    state=initial_state, state_name="initial_state", step=False, cu_seqlens=cu_seqlens)
    check_choice("backend", backend, OP.backend_names())
    if check_values:
        check_ranges(g=g, beta=beta, alpha=alpha, state=initial_state, state_name="initial_state")
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta)
    if alpha is not None:
        tensors["alpha"] = alpha
    settings = dict(ridge=float(ridge), iters=iters, scale=q.shape[-1] ** -0.5 if scale is None else float(scale))
    initial_state = None if initial_state is None else tuple(initial_state)
    return dispatch(OP, backend, tensors, settings, initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens)


def gated_kalman_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    ridge: float = 0.02,
    iters: int = 30,
    alpha: torch.Tensor | None = None,
    scale: float | None = None,
    state: State | None,
) -> tuple[torch.Tensor, State]:
    """One position of ``gated_kalman`` from a carried state: the decoding step (Chebyshev solve, O(iters K^2)).

    A few batched tensor operations (no check that reads values back from the device), so every
    backend decodes through it. It computes in the wider of the state's and the inputs' dtypes
    (float32 for 16-bit inputs and a float32 state).

    Args:
        q, k: ``[B, H, K]``.
        v: ``[B, H, V]``.
        g, beta: ``[B, H]``.
        ridge, iters, scale: as ``gated_kalman``.
        alpha: ``[B, H]`` or None (1).
        state: ``(H [B, H, K, K], U [B, H, K, V])`` after the previous position, or None for zeros.

    Returns:
        ``o [B, H, V]`` in v's dtype and the new state ``(H, U)`` in the compute dtype.
    """
    check_arguments(q=q, k=k, v=v, g=g, beta=beta, alpha=alpha, ridge=ridge, iters=iters, scale=scale,
                    state=state, state_name="state", step=True)
    B, Hh, K = q.shape
    V = v.shape[-1]
    if state is None:
        dtype = torch.promote_types(q.dtype, torch.float32)
        H, U = q.new_zeros(B, Hh, K, K, dtype=dtype), q.new_zeros(B, Hh, K, V, dtype=dtype)
    else:
        H, U = state
    dtype = torch.promote_types(H.dtype, q.dtype)
    ridge = float(ridge)
    o, H, U = gka_step(*(None if t is None else t.to(dtype) for t in (q, k, v, g, beta, alpha)),
                       H=H.to(dtype), U=U.to(dtype), scale=K ** -0.5 if scale is None else float(scale),
                       solve=lambda H, x: token_solve(H, x, ridge, iters))
    return o.to(v.dtype), (H, U)


def _result_shapes(tensors: dict, settings: dict, initial_state: State | None, sequences: int):
    """``o [B, T, H, V]`` and the final state ``(H [N, H, K, K], U [N, H, K, V])``."""
    q, v = tensors["q"], tensors["v"]
    Hh, K = q.shape[2:]
    return tuple(v.shape), ((sequences, Hh, K, K), (sequences, Hh, K, v.shape[3]))


# The backends, in listing order, and the preference order of backend="auto".
BACKENDS = {
    "naive": Backend(naive_gated_kalman, "token loop with the Chebyshev solve: the executable spec", max_T=2048,
                     limit="token loop"),
    "exact": Backend(exact_gated_kalman, "token loop with exact solves (torch.linalg.solve): the ground truth",
                     max_T=2048, limit="token loop"),
    "chunk": Backend(chunk_gated_kalman, "chunked PyTorch: closed-form norms, batched Chebyshev (CPU and GPU)"),
    "triton": Backend(triton_gated_kalman, "chunked Triton kernels: Chebyshev on chip, float32 states, K <= 128 "
                      "(CUDA; Triton's CPU interpreter in the tests)", native_dtypes=True,
                      varlen=True, float64=False, needs_cuda=True, interpretable=True, requires="triton"),
}
AUTO = ("triton", "chunk")

OP = register_op(Op(
    name="gated_kalman",
    module=__name__,
    fn=gated_kalman,
    backends=BACKENDS,
    auto=AUTO,
    per_token={"q": (4,), "k": (4,), "v": (4,), "g": (3,), "beta": (3,), "alpha": (3,)},
    float32_args=("g",),
    step=gated_kalman_step,
    result_shapes=_result_shapes,
))

__all__ = ["OP", "gated_kalman", "gated_kalman_step"]
