"""The diagonal preconditioner of the write key (Preconditioned DeltaNet, spec/preconditioned_delta.md §2).

Per key head a running second moment of the (L2-normalised) keys, ``A_t = exp(g_t) A_{t-1} + beta_t k_t^2``
(``A in R^K``, ``A_0 = 0`` unless given), is squashed into a per-channel gain in ``[1/x, x]``:
``r = log(A_t + eps) - center``, ``s = r / (1 + |r|)``, ``gain = exp(-log(x) s)``; the write key is
``gain * k_t``. The gain falls as ``A`` grows, like an inverse; ``x = 1`` gives a gain of 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiagonalPreconditioner:
    """The preconditioner of ``linmix.ops.delta_rule``: its per-token gates, its centre and its range.

    Attributes:
        g: natural log of the decay of the key statistics ``A``, ``<= 0``: ``[B, T, H]`` (one per
            key head and position; ``[B, H]`` for ``delta_rule_step``).
        beta: strength of each key's contribution to ``A``, in ``[0, 1]``, shaped like ``g``.
        center: ``[H]``, the per-head centre of ``log(A + eps)`` (learnable; fla's ``log_atk_scale``,
            initialised to -0.2 in the paper).
        x: the gain's range ``[1/x, x]``, ``x >= 1`` (1.5 in the paper; 1 turns the preconditioner off;
            ``x <= 2`` keeps the write eigenvalue in ``[-1, 1]`` for ``beta <= 1``).
        eps: added to ``A`` inside the log, ``> 0``.
    """

    g: torch.Tensor
    beta: torch.Tensor
    center: torch.Tensor
    x: float = 1.5
    eps: float = 1e-6


def write_gain(A: torch.Tensor, center: torch.Tensor, x: float, eps: float) -> torch.Tensor:
    """The per-channel gain of the write key, in ``[1/x, x]``.

    Args:
        A: key statistics, ``>= 0``.
        center: the per-head centre, shaped to broadcast against ``A`` (``[H, 1]`` for ``A [B, H, K]``).
        x: the range of the gain.
        eps: added to ``A`` inside the log.

    Returns:
        ``exp(-log(x) * r / (1 + |r|))`` with ``r = log(A + eps) - center``, shaped like ``A``.
    """
    r = torch.log(A + eps) - center
    return torch.exp(-math.log(x) * (r / (1.0 + r.abs())))
