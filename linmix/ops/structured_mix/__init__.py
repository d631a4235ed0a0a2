"""Structured generalized linear mixing: ``Y = (I - B)^{-1} A X`` per head (spec/structured_mixing.md §2, §5).

A is diagonal (``alpha_t`` on ``x_t``) and B strictly lower triangular, supported on a pattern of
offsets ``f(0) < ... < f(K - 1)`` (``linmix.ops.structured_mix.patterns``):

    y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}

with input-dependent coefficients ``alpha [B, T, H]`` and ``beta [B, T, H, K]`` (the coefficient map
of §5.3 that produces them is the layer's business). The state is the last ``S = f(K - 1)``
outputs, oldest first: positions before the sequence read it, so a sequence split in two with the
state carried gives the same outputs as the whole.
"""

from collections.abc import Sequence

import torch

from linmix.ops._dispatch import Backend, Op, dispatch, register_op
from linmix.ops._validate import (
    check_choice,
    check_cu_seqlens,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from linmix.ops.structured_mix.chunk import chunk_structured_mix
from linmix.ops.structured_mix.dense import dense_materializes, dense_structured_mix
from linmix.ops.structured_mix.naive import naive_structured_mix
from linmix.ops.structured_mix.patterns import Lattice, Offsets


def as_pattern(pattern: object) -> Offsets:
    """``pattern`` as an ``Offsets`` pattern: itself, or the pattern of a sequence of ints.

    Raises:
        TypeError: neither a pattern nor a sequence of ints.
        ValueError: a lattice pattern (its positions depend on the absolute position, which the op's
            state does not carry), or offsets that are not positive and strictly increasing.
    """
    if isinstance(pattern, Offsets):
        return pattern
    if isinstance(pattern, Lattice):
        raise ValueError(f"pattern {pattern.name!r} is a lattice pattern, whose positions depend on the absolute "
                         "position; structured_mix takes translation-invariant patterns (Offsets) only")
    if isinstance(pattern, Sequence) and not isinstance(pattern, (str, bytes)):
        return Offsets(tuple(pattern))
    raise TypeError(f"pattern must be an Offsets pattern or a sequence of ints, got {type(pattern).__name__}")


def _validate(x, alpha, beta, pattern: Offsets, initial_state, cu_seqlens, backend) -> None:
    """Check the arguments of ``structured_mix``; raise ValueError/TypeError naming the culprit."""
    for name, tensor in (("x", x), ("alpha", alpha), ("beta", beta)):
        check_tensor(name, tensor)
    check_ndim("x", x, (4,), "[B, T, H, D]")
    B, T, H, D = x.shape
    K, S = pattern.levels, pattern.max_offset
    check_shape("alpha", alpha, (B, T, H), "[B, T, H] like x")
    check_shape("beta", beta, (B, T, H, K), f"[B, T, H, K] like x with K = {K} levels of the pattern")
    check_same_dtype(("x", x), ("alpha", alpha), ("beta", beta))
    check_same_device(("x", x), ("alpha", alpha), ("beta", beta))
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("x", x))
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_same_device(("x", x), ("initial_state", initial_state))
        if cu_seqlens is None:
            check_shape("initial_state", initial_state, (B, H, S, D), "[B, H, S, D] with S = the largest offset")
        else:
            N = cu_seqlens.shape[0] - 1
            check_shape("initial_state", initial_state, (N, H, S, D),
                        "[N, H, S, D] (N sequences in cu_seqlens, S = the largest offset)")
    check_choice("backend", backend, OP.backend_names())


def structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    pattern: Offsets | Sequence[int],
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generalized linear recurrence over a structured pattern of past outputs.

    ``y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}`` per batch row and head, i.e.
    ``Y = (I - B)^{-1} diag(alpha) X``. Outputs before position 0 are read from ``initial_state``
    (zeros if None). The system is always solvable (``I - B`` is unit lower triangular), but it is
    stable only if the coefficients keep it so (e.g. ``sum_k |beta_{t,k}| <= 1``, as a joint softmax
    over the slots or L1-normalised gates give, §5.3); they are not checked. fp16/bf16 inputs are
    computed in float32, float64 inputs in float64.

    With ``cu_seqlens`` the batch holds ``N`` sequences packed along T with ``B = 1``; each runs
    as if alone, from its row of ``initial_state`` (zeros if None).

    Args:
        x: inputs (values), ``[B, T, H, D]``.
        alpha: direct coefficients, ``[B, T, H]``, same dtype and device as ``x``.
        beta: recurrent coefficients, ``[B, T, H, K]``: ``beta[..., k]`` weighs the output
            ``pattern.offsets[k]`` positions back.
        pattern: an ``Offsets`` pattern (``patterns.first_order()``, ``kth_order(k)``,
            ``powers_of_two(K)``, ``squares_plus_one(K)``, ``dense_window(W)``) or its offsets as ints.
        initial_state: ``[B, H, S, D]`` (``[N, H, S, D]`` with ``cu_seqlens``), the outputs at
            positions ``-S .. -1``, oldest first, ``S = pattern.max_offset``; or None.
        output_final_state: whether to return the last ``S`` outputs (the initial state's rows
            where ``T < S``).
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T, or None.
        backend: ``"naive"`` (token loop), ``"dense"`` (one triangular solve of the ``[T, T]``
            system per batch row and head), ``"chunk"`` (blocked solve over chunks of 64 positions,
            adjoint backward) or ``"auto"`` (``"chunk"``).

    Returns:
        ``o``: ``[B, T, H, D]`` in ``x``'s dtype.
        ``final_state``: ``[B, H, S, D]`` (``[N, H, S, D]`` with ``cu_seqlens``) in float32
        (float64 for float64 inputs), or None unless ``output_final_state``.
    """
    pattern = as_pattern(pattern)
    _validate(x, alpha, beta, pattern, initial_state, cu_seqlens, backend)
    return dispatch(OP, backend, dict(x=x, alpha=alpha, beta=beta), dict(pattern=pattern),
                    initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def structured_mix_step(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    pattern: Offsets | Sequence[int],
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of ``structured_mix`` from the carried state: the decoding step.

    ``y = alpha x + sum_k beta_k state[S - f(k)]``, then the state shifts by one and takes ``y`` as
    its newest row. It computes in the wider of the state's and the inputs' dtypes.

    Args:
        x: the new position's input, ``[B, H, D]``.
        alpha: its direct coefficient, ``[B, H]``.
        beta: its recurrent coefficients, ``[B, H, K]``.
        pattern: as for ``structured_mix``.
        state: ``[B, H, S, D]``, the last ``S`` outputs, oldest first.

    Returns:
        ``y`` of shape ``[B, H, D]`` in ``x``'s dtype and the new state ``[B, H, S, D]`` in the compute dtype.
    """
    pattern = as_pattern(pattern)
    for name, tensor in (("x", x), ("alpha", alpha), ("beta", beta), ("state", state)):
        check_tensor(name, tensor)
    check_ndim("x", x, (3,), "[B, H, D]")
    B, H, D = x.shape
    check_shape("alpha", alpha, (B, H), "[B, H] like x")
    check_shape("beta", beta, (B, H, pattern.levels), f"[B, H, K] like x with K = {pattern.levels} levels")
    check_shape("state", state, (B, H, pattern.max_offset, D), "[B, H, S, D] with S = the largest offset")
    dtype = torch.promote_types(state.dtype, x.dtype)
    state = state.to(dtype)
    slots = [pattern.max_offset - f for f in pattern.offsets]  # the state row of each level
    read = torch.einsum("bhk,bhkd->bhd", beta.to(dtype), state[:, :, slots])  # [B, H, D]
    y = alpha.to(dtype)[..., None] * x.to(dtype) + read  # [B, H, D]
    state = torch.cat([state[:, :, 1:], y[:, :, None]], dim=2)  # [B, H, S, D]
    return y.to(x.dtype), state


def _result_shapes(tensors: dict, settings: dict, initial_state: torch.Tensor | None,
                   sequences: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``o [B, T, H, D]`` and the final state ``[N, H, S, D]`` (N = B, or the packed sequences)."""
    x = tensors["x"]
    return tuple(x.shape), (sequences, x.shape[2], settings["pattern"].max_offset, x.shape[3])


OP = register_op(Op(
    name="structured_mix",
    module=__name__,
    fn=structured_mix,
    backends={
        "naive": Backend(naive_structured_mix, "token-by-token, level-by-level loop: the executable spec",
                         max_T=2048, limit="token loop"),
        "dense": Backend(dense_structured_mix, "one [T, T] triangular solve per batch row and head (the oracle)",
                         max_T=4096, limit="quadratic memory", materializes=dense_materializes),
        "chunk": Backend(chunk_structured_mix, "blocked triangular solve over chunks of 64, adjoint backward"),
    },
    auto=("chunk", "dense"),
    per_token={"x": (4,), "alpha": (3,), "beta": (4,)},
    float32_args=("alpha", "beta"),
    step=structured_mix_step,
    result_shapes=_result_shapes,
))

__all__ = ["OP", "Lattice", "Offsets", "as_pattern", "structured_mix", "structured_mix_step"]
