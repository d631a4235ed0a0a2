"""Token-by-token structured mixing: the executable spec of the op.

``y_t = alpha_t x_t + sum_k beta_{t,k} y_{t - f(k)}`` per batch row and head, where ``y_{-p}`` for
``p >= 1`` is read from the state: the last ``S = f(K - 1)`` outputs before the sequence.
"""

import torch

from linmix.ops.structured_mix.patterns import Offsets


def naive_structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    pattern: Offsets,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence one position at a time, one level at a time.

    Inputs are validated and already in the compute dtype (see ``structured_mix``).

    Args:
        x: inputs, ``[B, T, H, D]``.
        alpha: direct coefficients, ``[B, T, H]``.
        beta: recurrent coefficients, ``[B, T, H, K]``, level ``k`` at offset ``pattern.offsets[k]``.
        pattern: the translation-invariant offsets.
        initial_state: ``[B, H, S, D]``, the outputs at positions ``-S .. -1`` (oldest first), or None for zeros.
        output_final_state: whether to return the last ``S`` outputs.

    Returns:
        ``o`` of shape ``[B, T, H, D]`` and the final state ``[B, H, S, D]`` (or None).
    """
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
