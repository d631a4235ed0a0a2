"""Structured generalized linear mixing: ``Y = (I - B)^{-1} A X`` per head (spec/structured_mixing.md §2, §5).

A is diagonal (``alpha_t`` on ``x_t``) and B strictly lower triangular, supported on a pattern of
offsets ``f(0) < ... < f(K - 1)`` (``linmix.ops.structured_mix.patterns``):

    y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}

with input-dependent coefficients ``alpha [B, T, H]`` and ``beta [B, T, H, K]`` (the coefficient map
of §5.3 that produces them is the layer's business). The state is the last ``S = f(K - 1)``
outputs, oldest first: positions before the sequence read it, so a sequence split in two with the
state carried gives the same outputs as the whole.

A ``Lattice`` pattern (the cache-efficient one of §3.4) reads, at level ``k``, a position snapped
to a lattice of step ``a_k``, which depends on the absolute position. Its state is the decoder's
shift register and where it stands: ``(slots [B, H, K, D], position [B] int64)``, slot ``k`` the
output that level ``k`` of the token at ``position`` reads (whatever it holds for a level the token
has not reached, ``f(k) > position``, passes through until the level is reached), ``position``
the absolute 0-based position of the next token. The position is a counter: never cast, not
differentiated (``Op.counters``).
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
from linmix.ops.structured_mix.naive import lattice_step, naive_structured_mix
from linmix.ops.structured_mix.patterns import Lattice, Offsets

LatticeState = tuple[torch.Tensor, torch.Tensor]  # (slots [B, H, K, D], position [B] int64)


def as_pattern(pattern: object) -> Offsets | Lattice:
    """``pattern`` as a pattern: itself (``Offsets`` or ``Lattice``), or the ``Offsets`` of a sequence of ints.

    Raises:
        TypeError: neither a pattern nor a sequence of ints.
        ValueError: offsets that are not positive and strictly increasing.
    """
    if isinstance(pattern, (Offsets, Lattice)):
        return pattern
    if isinstance(pattern, Sequence) and not isinstance(pattern, (str, bytes)):
        return Offsets(tuple(pattern))
    raise TypeError(f"pattern must be an Offsets or Lattice pattern or a sequence of ints, "
                    f"got {type(pattern).__name__}")


def _check_state(name: str, state: object, pattern: Offsets | Lattice, x: torch.Tensor, rows: int,
                 rows_name: str) -> None:
    """Check a state of ``rows`` rows for ``pattern`` and ``x [..., H, D]``: ``[rows, H, S, D]`` on ``x``'s
    device, or a lattice's ``(slots [rows, H, K, D], position [rows] int64)``; TypeError/ValueError naming it."""
    H, D = x.shape[-2:]
    if isinstance(pattern, Offsets):
        check_tensor(name, state)
        check_same_device(("x", x), (name, state))
        check_shape(name, state, (rows, H, pattern.max_offset, D),
                    f"[{rows_name}, H, S, D] with S = the largest offset")
        return
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} of a lattice pattern must be a tuple (slots [{rows_name}, H, K, D], "
                        f"position [{rows_name}] int64), got {type(state).__name__}")
    slots, position = state
    check_tensor(f"{name}[0]", slots)
    check_shape(f"{name}[0]", slots, (rows, H, pattern.levels, D),
                f"[{rows_name}, H, K, D] (the slots, K = {pattern.levels} levels)")
    if not isinstance(position, torch.Tensor) or position.dtype != torch.int64:
        raise TypeError(f"{name}[1] must be an int64 torch.Tensor (the position of the next token), got "
                        f"{getattr(position, 'dtype', type(position).__name__)}")
    check_shape(f"{name}[1]", position, (rows,), f"[{rows_name}] (the position of the next token)")
    check_same_device(("x", x), (f"{name}[0]", slots), (f"{name}[1]", position))


def _validate(x, alpha, beta, pattern: Offsets, initial_state, cu_seqlens, backend) -> None:
    """Check the arguments of ``structured_mix``; raise ValueError/TypeError naming the culprit."""
    for name, tensor in (("x", x), ("alpha", alpha), ("beta", beta)):
        check_tensor(name, tensor)
    check_ndim("x", x, (4,), "[B, T, H, D]")
    B, T, H, D = x.shape
    K = pattern.levels
    check_shape("alpha", alpha, (B, T, H), "[B, T, H] like x")
    check_shape("beta", beta, (B, T, H, K), f"[B, T, H, K] like x with K = {K} levels of the pattern")
    check_same_dtype(("x", x), ("alpha", alpha), ("beta", beta))
    check_same_device(("x", x), ("alpha", alpha), ("beta", beta))
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("x", x))
    if initial_state is not None:
        rows, rows_name = (B, "B") if cu_seqlens is None else (cu_seqlens.shape[0] - 1, "N")
        _check_state("initial_state", initial_state, pattern, x, rows, rows_name)
    check_choice("backend", backend, OP.backend_names())


def structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    pattern: Offsets | Lattice | Sequence[int],
    initial_state: torch.Tensor | LatticeState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | LatticeState | None]:
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
            ``powers_of_two(K)``, ``squares_plus_one(K)``, ``dense_window(W)``) or its offsets as
            ints; or a ``Lattice`` (``Lattice.of(powers_of_two(K))``), whose level ``k`` reads the
            position ``Lattice.index_table`` gives at the token's absolute position.
        initial_state: for offsets, ``[B, H, S, D]`` (``[N, H, S, D]`` with ``cu_seqlens``), the
            outputs at positions ``-S .. -1``, oldest first, ``S = pattern.max_offset``. For a
            lattice, ``(slots [B, H, K, D], position [B] int64)`` (``N`` rows with ``cu_seqlens``):
            the shift register before the first token and that token's absolute position (module
            docstring). None: zeros (a lattice at position 0).
        output_final_state: whether to return the state after the last position: the last ``S``
            outputs (the initial state's rows where ``T < S``), or a lattice's register and ``position + T``.
        cu_seqlens: ``[N + 1]`` int32 or int64 boundaries of ``N`` sequences packed along T, or None.
        backend: ``"naive"`` (token loop), ``"dense"`` (one triangular solve of the ``[T, T]``
            system per batch row and head), ``"chunk"`` (blocked solve over chunks of 64 positions,
            adjoint backward) or ``"auto"`` (``"chunk"``).

    Returns:
        ``o``: ``[B, T, H, D]`` in ``x``'s dtype.
        ``final_state``: laid out as ``initial_state`` (one row per sequence with ``cu_seqlens``),
        the outputs or slots in float32 (float64 for float64 inputs), or None unless ``output_final_state``.
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
    pattern: Offsets | Lattice | Sequence[int],
    state: torch.Tensor | LatticeState,
) -> tuple[torch.Tensor, torch.Tensor | LatticeState]:
    """One position of ``structured_mix`` from the carried state: the decoding step.

    ``y = alpha x + sum_k beta_k state[S - f(k)]``, then the state shifts by one and takes ``y`` as
    its newest row. For a lattice, ``y = alpha x + sum_{k: f(k) <= position} beta_k slots[k]``, then
    the shift register advances (spec §3.4: slot ``k`` takes slot ``k - 1`` where level ``k``'s
    lattice steps, slot 0 takes ``y``) and the position by one. It computes in the wider of the
    state's and the inputs' dtypes.

    Args:
        x: the new position's input, ``[B, H, D]``.
        alpha: its direct coefficient, ``[B, H]``.
        beta: its recurrent coefficients, ``[B, H, K]``.
        pattern: as for ``structured_mix``.
        state: ``[B, H, S, D]``, the last ``S`` outputs, oldest first; for a lattice
            ``(slots [B, H, K, D], position [B] int64)``.

    Returns:
        ``y`` of shape ``[B, H, D]`` in ``x``'s dtype and the new state (the slots or outputs in the
        compute dtype).
    """
    pattern = as_pattern(pattern)
    for name, tensor in (("x", x), ("alpha", alpha), ("beta", beta)):
        check_tensor(name, tensor)
    check_ndim("x", x, (3,), "[B, H, D]")
    B, H, D = x.shape
    check_shape("alpha", alpha, (B, H), "[B, H] like x")
    check_shape("beta", beta, (B, H, pattern.levels), f"[B, H, K] like x with K = {pattern.levels} levels")
    _check_state("state", state, pattern, x, B, "B")
    if isinstance(pattern, Lattice):
        slots, position = state
        dtype = torch.promote_types(slots.dtype, x.dtype)
        y, slots, position = lattice_step(pattern, x.to(dtype), alpha.to(dtype), beta.to(dtype), slots.to(dtype),
                                          position)
        return y.to(x.dtype), (slots, position)
    dtype = torch.promote_types(state.dtype, x.dtype)
    state = state.to(dtype)
    slots = [pattern.max_offset - f for f in pattern.offsets]  # the state row of each level
    read = torch.einsum("bhk,bhkd->bhd", beta.to(dtype), state[:, :, slots])  # [B, H, D]
    y = alpha.to(dtype)[..., None] * x.to(dtype) + read  # [B, H, D]
    state = torch.cat([state[:, :, 1:], y[:, :, None]], dim=2)  # [B, H, S, D]
    return y.to(x.dtype), state


def _result_shapes(tensors: dict, settings: dict, initial_state: torch.Tensor | None,
                   sequences: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``o [B, T, H, D]`` and the final state ``[N, H, S, D]``, or a lattice's ``([N, H, K, D], [N])``
    (N = B, or the packed sequences)."""
    x, pattern = tensors["x"], settings["pattern"]
    if isinstance(pattern, Lattice):
        return tuple(x.shape), ((sequences, x.shape[2], pattern.levels, x.shape[3]), (sequences,))
    return tuple(x.shape), (sequences, x.shape[2], pattern.max_offset, x.shape[3])


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
    counters=(1,),  # a lattice state's position
))

__all__ = ["OP", "Lattice", "LatticeState", "Offsets", "as_pattern", "structured_mix", "structured_mix_step"]
