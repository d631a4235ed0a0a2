"""The delta rule: DeltaNet, Gated DeltaNet, KDA and their preconditioned forms (PDN, PGDN, PKDA).

``S_t = (I - beta_t kw_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t kw_t v_t^T`` and ``o_t = S_t^T q_t``, with q and
k L2-normalised (q scaled), ``alpha_t = exp(g_t)`` (1 without ``g``; a scalar per value head, or one per
key channel) and the write key ``kw_t = k_t``, or ``gain(A_t) * k_t`` with a ``DiagonalPreconditioner``
(spec/preconditioned_delta.md). States are key-major ``[K, V]`` like fla's.
"""

from __future__ import annotations

import torch

from linmix.ops._dispatch import Backend, Op, dispatch, register_op
from linmix.ops._validate import check_choice
from linmix.ops.delta_rule.chunk import chunk_delta_rule
from linmix.ops.delta_rule.fla import fla_delta_rule
from linmix.ops.delta_rule.naive import State, delta_step, naive_delta_rule
from linmix.ops.delta_rule.precond import DiagonalPreconditioner
from linmix.ops.delta_rule.triton import triton_delta_rule
from linmix.ops.delta_rule.validate import check_arguments, check_ranges


def _unpacked(precond: DiagonalPreconditioner | None) -> dict:
    """The preconditioner's fields as the keyword arguments of ``delta_rule_unpacked`` (none without one)."""
    if precond is None:
        return {}
    if not isinstance(precond, DiagonalPreconditioner):
        raise TypeError(f"precond must be a linmix.ops.DiagonalPreconditioner or None, got {type(precond).__name__}")
    return dict(precond_g=precond.g, precond_beta=precond.beta, precond_center=precond.center, x=precond.x,
                eps=precond.eps)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    precond: DiagonalPreconditioner | None = None,
    scale: float | None = None,
    normalize_qk: bool = True,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> tuple[torch.Tensor, State | None]:
    """The delta rule over a sequence: DN, GDN or KDA by the shape of ``g``, preconditioned with ``precond``.

    Per position, key head ``h`` and value head ``j`` (GVA: value head ``j`` reads key head
    ``j // (HV // H)``; the preconditioner's statistics are per key head):

    1. ``q <- scale * q / |q|``, ``k <- k / |k|`` (unless ``normalize_qk=False``);
    2. with ``precond``: ``A = exp(precond.g) A + precond.beta * k^2`` and the write key
       ``kw = gain(A) * k``, ``gain = exp(-log(x) * r / (1 + |r|))`` with ``r = log(A + eps) - center``
       (in ``[1/x, x]``); without it ``kw = k``;
    3. ``S = exp(g) S`` (a scalar per value head, or per key channel on the rows of ``S``);
    4. ``S = S + beta * kw (v - S^T k)^T``; ``o = S^T q``.

    Variants: ``g=None`` DeltaNet, ``g [B, T, HV]`` Gated DeltaNet, ``g [B, T, HV, K]`` KDA; with
    ``precond`` PDN, PGDN, PKDA (PDN is PGDN with ``g = 0``, our reading of the paper).

    fp16/bf16 inputs are computed in float32, float64 inputs in float64 (on ``"chunk"`` for backends
    whose kernels stop at float32). With ``cu_seqlens`` (FlashAttention's and fla's convention) the
    batch holds ``N`` sequences packed along T with ``B = 1``; each runs as if alone from its row of
    ``initial_state``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``, q's dtype and device.
        v: values ``[B, T, HV, V]``, q's dtype; ``HV`` a positive multiple of ``H``.
        beta: write strength ``[B, T, HV]`` in ``[0, 1]`` (one per value head, as in fla).
        g: natural-log decay ``<= 0``: None, ``[B, T, HV]`` or ``[B, T, HV, K]`` (per value head, as in fla).
        precond: a ``DiagonalPreconditioner`` with ``g`` and ``beta`` ``[B, T, H]`` (per key head),
            ``center [H]``, ``x >= 1`` and ``eps > 0``; applied to the write key only.
        scale: factor of the queries; None means ``K ** -0.5``.
        normalize_qk: whether to L2-normalise q and k (False: the caller's are used as they are).
        initial_state: ``S [B, HV, K, V]`` (``[N, ...]`` with ``cu_seqlens``); with ``precond`` the pair
            ``(S, A [B, H, K])``, ``A >= 0``; or None for zeros.
        output_final_state: whether to return the state after the last position.
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T (``B = 1``),
            on q's device; None for a plain batch.
        backend: ``"naive"`` (token loop), ``"chunk"`` (chunked WY form in PyTorch), ``"triton"``
            (chunked Triton kernels on CUDA, forward and backward), ``"fla"``
            (flash-linear-attention's kernels on CUDA, where installed; ``normalize_qk=True`` only)
            or ``"auto"`` (``"triton"`` on CUDA, else ``"chunk"``).
        check_values: whether to read the gates, strengths, centre and A back (one read) and check
            their ranges. On a GPU the read waits for the device; a caller whose values are in range
            by construction passes False. Shapes, dtypes and devices are always checked.

    Returns:
        ``o``: ``[B, T, HV, V]`` in q's dtype.
        ``final_state``: ``S [B, HV, K, V]`` (``[N, ...]`` with ``cu_seqlens``), or with ``precond`` the
        pair ``(S, A [B, H, K])``, float32 (float64 for float64 inputs); None unless
        ``output_final_state``.

    Examples::
        >>> q, k = torch.randn(2, 100, 4, 64), torch.randn(2, 100, 4, 64)
        >>> v, beta = torch.randn(2, 100, 8, 64), torch.rand(2, 100, 8)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 100, 8))
        >>> precond = DiagonalPreconditioner(g=-torch.rand(2, 100, 4), beta=torch.rand(2, 100, 4),
        ...                                  center=torch.full((4,), -0.2))
        >>> o, (S, A) = delta_rule(q, k, v, beta, g=g, precond=precond, output_final_state=True)  # PGDN, GVA
    """
    return delta_rule_unpacked(q, k, v, beta, g=g, **_unpacked(precond), scale=scale, normalize_qk=normalize_qk,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, backend=backend, check_values=check_values)


def delta_rule_unpacked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    precond_g: torch.Tensor | None = None,
    precond_beta: torch.Tensor | None = None,
    precond_center: torch.Tensor | None = None,
    x: float = 1.5,
    eps: float = 1e-6,
    scale: float | None = None,
    normalize_qk: bool = True,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> tuple[torch.Tensor, State | None]:
    """``delta_rule`` with the preconditioner's fields as arguments of their own (all three tensors or none).

    This is the registered form of the op (``linmix.ops.OPS["delta_rule"].fn``): the dispatch cuts
    the per-token ``precond_g`` and ``precond_beta`` of packed sequences like any tensor, and the
    contract suite and the benchmark pass every tensor by name. ``x`` and ``eps`` are used only
    with a preconditioner.
    """
    given = [t is not None for t in (precond_g, precond_beta, precond_center)]
    if any(given) and not all(given):
        raise ValueError("precond_g, precond_beta and precond_center come together (a preconditioner), got "
                         + ", ".join(n for n, t in zip(("precond_g", "precond_beta", "precond_center"), given,
                                                       strict=True) if t) + " alone")
    precond = (precond_g, precond_beta, precond_center) if all(given) else None
    check_arguments(q=q, k=k, v=v, beta=beta, g=g, precond=precond, x=x, eps=eps, scale=scale,
                    normalize_qk=normalize_qk, state=initial_state, state_name="initial_state", step=False,
                    cu_seqlens=cu_seqlens)
    check_choice("backend", backend, OP.backend_names())
    if check_values:
        check_ranges(beta=beta, g=g, precond=precond, state=initial_state, state_name="initial_state")
    tensors = dict(q=q, k=k, v=v, beta=beta)
    if g is not None:
        tensors["g"] = g
    if precond is not None:
        tensors.update(precond_g=precond_g, precond_beta=precond_beta, precond_center=precond_center)
        initial_state = None if initial_state is None else tuple(initial_state)
    settings = dict(scale=q.shape[-1] ** -0.5 if scale is None else float(scale), normalize_qk=normalize_qk,
                    x=float(x), eps=float(eps))
    return dispatch(OP, backend, tensors, settings, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    precond: DiagonalPreconditioner | None = None,
    scale: float | None = None,
    normalize_qk: bool = True,
    state: State | None,
) -> tuple[torch.Tensor, State]:
    """One position of ``delta_rule`` from a carried state: the decoding step.

    A few batched tensor operations (no check that reads values back from the device), so every
    backend decodes through it. It computes in the wider of the state's and the inputs' dtypes
    (float32 for 16-bit inputs and a float32 state).

    Args:
        q: queries of the new position ``[B, H, K]``.
        k: keys ``[B, H, K]``.
        v: values ``[B, HV, V]``.
        beta: ``[B, HV]``.
        g: None, ``[B, HV]`` or ``[B, HV, K]`` (log decay).
        precond: a ``DiagonalPreconditioner`` with ``g`` and ``beta`` ``[B, H]`` and ``center [H]``, or None.
        scale: factor of the queries; None means ``K ** -0.5``.
        normalize_qk: whether to L2-normalise q and k.
        state: ``S [B, HV, K, V]``, or ``(S, A [B, H, K])`` with ``precond``: the state after the previous
            position (None for zeros).

    Returns:
        ``o [B, HV, V]`` in v's dtype and the new state (``S``, or ``(S, A)``) in the compute dtype.
    """
    return delta_rule_step_unpacked(q, k, v, beta, g=g, **_unpacked(precond), scale=scale,
                                    normalize_qk=normalize_qk, state=state)


def delta_rule_step_unpacked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    precond_g: torch.Tensor | None = None,
    precond_beta: torch.Tensor | None = None,
    precond_center: torch.Tensor | None = None,
    x: float = 1.5,
    eps: float = 1e-6,
    scale: float | None = None,
    normalize_qk: bool = True,
    state: State | None,
) -> tuple[torch.Tensor, State]:
    """``delta_rule_step`` with the preconditioner's fields as arguments (the registered step, ``Op.step``)."""
    precond = (precond_g, precond_beta, precond_center) if precond_g is not None else None
    check_arguments(q=q, k=k, v=v, beta=beta, g=g, precond=precond, x=x, eps=eps, scale=scale,
                    normalize_qk=normalize_qk, state=state, state_name="state", step=True)
    B, H, K = q.shape
    HV, V = v.shape[1:]
    if state is None:
        dtype = torch.promote_types(q.dtype, torch.float32)
        S = q.new_zeros(B, HV, K, V, dtype=dtype)
        A = q.new_zeros(B, H, K, dtype=dtype) if precond is not None else None
    else:
        S, A = state if precond is not None else (state, None)
    dtype = torch.promote_types(S.dtype, q.dtype)
    o, S, A = delta_step(*(_cast(t, dtype) for t in (q, k, v, beta, g, precond_g, precond_beta, precond_center)),
                         scale=K ** -0.5 if scale is None else float(scale), normalize_qk=normalize_qk, x=float(x),
                         eps=float(eps), S=S.to(dtype), A=_cast(A, dtype))
    return o.to(v.dtype), ((S, A) if precond is not None else S)


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def _result_shapes(tensors: dict, settings: dict, initial_state: State | None, sequences: int):
    """``o [B, T, HV, V]`` and the final state: ``S [N, HV, K, V]``, and ``A [N, H, K]`` with a preconditioner."""
    q, v = tensors["q"], tensors["v"]
    S = (sequences, v.shape[2], q.shape[3], v.shape[3])
    return tuple(v.shape), ((S, (sequences, *q.shape[2:])) if "precond_g" in tensors else S)


# The backends, in listing order, and the preference order of backend="auto": a new backend is one
# entry here (and a place in AUTO); the contract suite and the benchmark pick it up.
BACKENDS = {
    "naive": Backend(naive_delta_rule, "token loop: the executable spec", max_T=2048, limit="token loop"),
    "chunk": Backend(chunk_delta_rule, "chunked WY (UT-transform) form in PyTorch (CPU and GPU)"),
    "triton": Backend(triton_delta_rule, "chunked WY Triton kernels, float32 states (CUDA; Triton's CPU "
                      "interpreter in the tests)", native_dtypes=True, varlen=True,
                      float64=False, needs_cuda=True, interpretable=True, requires="triton"),
    "fla": Backend(fla_delta_rule, "flash-linear-attention's chunk kernels (CUDA)", native_dtypes=True, varlen=True,
                   float64=False, needs_cuda=True, requires="fla", takes={"normalize_qk": (True,)}),
}
AUTO = ("triton", "chunk")

OP = register_op(Op(
    name="delta_rule",
    module=__name__,
    fn=delta_rule_unpacked,
    backends=BACKENDS,
    auto=AUTO,
    per_token={"q": (4,), "k": (4,), "v": (4,), "beta": (3,), "g": (3, 4), "precond_g": (3,), "precond_beta": (3,)},
    float32_args=("g", "precond_g", "precond_center"),
    step=delta_rule_step_unpacked,
    result_shapes=_result_shapes,
))

__all__ = ["OP", "DiagonalPreconditioner", "delta_rule", "delta_rule_step", "delta_rule_step_unpacked",
           "delta_rule_unpacked"]
