"""Token-by-token structured mixing: the executable spec of the op.

``y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}`` per batch row and head. For an ``Offsets``
pattern ``y_{-p}`` (``p >= 1``) is read from the state, the last ``S = f(K - 1)`` outputs before
the sequence. For a ``Lattice`` the state is the decoder's shift register (one slot per level)
and the absolute position of the next token; each token reads the slots of the levels it has
reached and the register then advances (``Lattice.shifting``, spec §3.4).
"""

import torch

from linmix.ops.structured_mix.patterns import Lattice, Offsets


def lattice_step(
    pattern: Lattice,
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    slots: torch.Tensor,
    position: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of a lattice pattern: read the register, then advance it (the multi-rate shift register).

    Args:
        pattern: the lattice.
        x: the token's input, ``[B, H, D]``.
        alpha: its direct coefficient, ``[B, H]``, in ``x``'s dtype.
        beta: its recurrent coefficients, ``[B, H, K]``, in ``x``'s dtype.
        slots: ``[B, H, K, D]``, slot ``k`` the output level ``k`` reads at ``position``.
        position: ``[B]`` int64, the token's absolute 0-based position.

    Returns:
        ``y [B, H, D]``, the advanced slots ``[B, H, K, D]`` and ``position + 1``.
    """
    K = pattern.levels
    reached = pattern.reached(position).to(beta.dtype)  # [B, K]
    y = alpha[..., None] * x + torch.einsum("bhk,bhkd->bhd", beta * reached[:, None], slots)  # [B, H, D]
    shifts = pattern.shifting(position + 1) | (torch.arange(K, device=slots.device) == 0)  # [B, K], slot 0 takes y
    moved = torch.cat([y[:, :, None], slots[:, :, :-1]], dim=2)  # [B, H, K, D]: slot k - 1 into slot k
    return y, torch.where(shifts[:, None, :, None], moved, slots), position + 1


def _naive_lattice(x, alpha, beta, pattern: Lattice, initial_state, output_final_state):
    """The token loop of ``lattice_step`` from ``initial_state = (slots, position)`` (zeros at position 0 if None)."""
    B, T, H, D = x.shape
    if initial_state is None:
        slots = x.new_zeros(B, H, pattern.levels, D)
        position = torch.zeros(B, dtype=torch.int64, device=x.device)
    else:
        slots, position = initial_state
    outputs = []
    for t in range(T):
        y, slots, position = lattice_step(pattern, x[:, t], alpha[:, t], beta[:, t], slots, position)
        outputs.append(y)
    return torch.stack(outputs, dim=1), ((slots, position) if output_final_state else None)


def naive_structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    pattern: Offsets | Lattice,
    initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]:
    """Run the recurrence one position at a time, one level at a time.

    Inputs are validated and already in the compute dtype (see ``structured_mix``).

    Args:
        x: inputs, ``[B, T, H, D]``.
        alpha: direct coefficients, ``[B, T, H]``.
        beta: recurrent coefficients, ``[B, T, H, K]``, level ``k`` at offset ``pattern.offsets[k]``.
        pattern: the translation-invariant offsets, or a lattice.
        initial_state: for offsets ``[B, H, S, D]``, the outputs at positions ``-S .. -1`` (oldest
            first); for a lattice ``(slots [B, H, K, D], position [B] int64)``; None for zeros (at
            position 0).
        output_final_state: whether to return the state after the last position.

    Returns:
        ``o`` of shape ``[B, T, H, D]`` and the final state (or None), laid out as ``initial_state``.
    """
    if isinstance(pattern, Lattice):
        return _naive_lattice(x, alpha, beta, pattern, initial_state, output_final_state)
    B, T, H, D = x.shape
    S = pattern.max_offset
    past = x.new_zeros(B, H, S, D) if initial_state is None else initial_state
    ys = list(past.unbind(dim=2))  # S outputs [B, H, D], oldest first; y_t is appended at index S + t
    for t in range(T):
        y = alpha[:, t, :, None] * x[:, t]  # [B, H, D]
        for k, f in enumerate(pattern.offsets):
            y = y + beta[:, t, :, k, None] * ys[S + t - f]
        ys.append(y)
    o = torch.stack(ys[S:], dim=1)  # [B, T, H, D]
    return o, (torch.stack(ys[-S:], dim=2) if output_final_state else None)
