"""Token-by-token delta rule: the executable spec of the op (spec/preconditioned_delta.md §2 and §6).

Per position, key head ``h`` and value head ``j`` (``h = j // (HV // H)``), with q and k L2-normalised
and q scaled:

1. with a preconditioner: ``A = exp(g^P) A + beta^P k^2`` (per key head) and the write key
   ``kw = gain(A) * k``; without one ``kw = k``;
2. ``S = alpha S`` (``alpha = exp(g)``: one per value head, or one per key channel, on the rows of S);
3. ``u = beta (v - S^T k)``;
4. ``S = S + kw u^T``;
5. ``o = S^T q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops.delta_rule.precond import write_gain

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def value_heads(x: torch.Tensor, HV: int, dim: int) -> torch.Tensor:
    """Key-head tensor ``x`` repeated for its value heads along ``dim`` (value head j reads key head j // (HV // H))."""
    H = x.shape[dim]
    return x if H in (0, HV) else x.repeat_interleave(HV // H, dim=dim)


def delta_step(q, k, v, beta, g, precond_g, precond_beta, precond_center, *, scale: float, normalize_qk: bool,
               x: float, eps: float, S: torch.Tensor, A: torch.Tensor | None):
    """One position of the recurrence on tensors of one dtype.

    Args:
        q: ``[B, H, K]``, raw (normalised here if ``normalize_qk``).
        k: ``[B, H, K]``, raw.
        v: ``[B, HV, V]``.
        beta: ``[B, HV]``.
        g: None, ``[B, HV]`` or ``[B, HV, K]`` (log decay).
        precond_g: None or ``[B, H]`` (log decay of A).
        precond_beta: None or ``[B, H]``.
        precond_center: None or ``[H]``.
        scale: factor of the queries.
        normalize_qk: whether to L2-normalise q and k.
        x: the preconditioner's range.
        eps: the preconditioner's epsilon.
        S: ``[B, HV, K, V]``, the state after the previous position.
        A: ``[B, H, K]`` key statistics (with a preconditioner), else None.

    Returns:
        ``o [B, HV, V]``, the new ``S`` and the new ``A`` (None without a preconditioner).
    """
    HV = v.shape[1]
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    kw = k
    if precond_g is not None:
        A = torch.exp(precond_g)[..., None] * A + precond_beta[..., None] * k * k  # [B, H, K]
        kw = write_gain(A, precond_center[:, None], x, eps) * k  # [B, H, K]
    q, k, kw = (value_heads(t, HV, dim=1) for t in (q, k, kw))  # [B, HV, K]
    if g is not None:
        decay = torch.exp(g)  # [B, HV] or [B, HV, K]
        S = (decay[..., None, None] if g.dim() == 2 else decay[..., None]) * S  # [B, HV, K, V]
    u = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))  # [B, HV, V]
    S = S + kw[..., None] * u[..., None, :]  # [B, HV, K, V]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, S)  # [B, HV, V]
    return o, S, A


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    precond_g: torch.Tensor | None = None,
    precond_beta: torch.Tensor | None = None,
    precond_center: torch.Tensor | None = None,
    *,
    scale: float,
    normalize_qk: bool,
    x: float,
    eps: float,
    initial_state: State | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, State | None]:
    """Run the recurrence one position at a time.

    Inputs are validated and already in the compute dtype (see ``linmix.ops.delta_rule``).

    Args:
        q: ``[B, T, H, K]``.
        k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``.
        beta: ``[B, T, HV]``.
        g: None, ``[B, T, HV]`` or ``[B, T, HV, K]``.
        precond_g: None or ``[B, T, H]``.
        precond_beta: None or ``[B, T, H]``.
        precond_center: None or ``[H]``.
        scale: factor of the queries.
        normalize_qk: whether to L2-normalise q and k.
        x: the preconditioner's range.
        eps: the preconditioner's epsilon.
        initial_state: ``S [B, HV, K, V]``, the pair ``(S, A [B, H, K])`` with a preconditioner, or None.
        output_final_state: whether to return the state after the last position.

    Returns:
        ``o [B, T, HV, V]`` and the final state (``S``, or ``(S, A)``) or None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    precond = precond_g is not None
    if initial_state is None:
        S, A = q.new_zeros(B, HV, K, V), (q.new_zeros(B, H, K) if precond else None)
    else:
        S, A = initial_state if precond else (initial_state, None)
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    kw = k
    if precond:
        stats = []
        for t in range(T):
            A = torch.exp(precond_g[:, t])[..., None] * A + precond_beta[:, t, :, None] * k[:, t] * k[:, t]  # [B, H, K]
            stats.append(A)
        if stats:
            kw = write_gain(torch.stack(stats, dim=1), precond_center[:, None], x, eps) * k  # [B, T, H, K]
    q, k, kw = (value_heads(t, HV, dim=2) for t in (scale * q, k, kw))  # [B, T, HV, K]
    decay = None if g is None else torch.exp(g if g.dim() == 4 else g[..., None])  # [B, T, HV, K or 1]
    outputs = []
    for t in range(T):
        if decay is not None:
            S = decay[:, t, :, :, None] * S  # [B, HV, K, V]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))  # [B, HV, V]
        S = S + kw[:, t, :, :, None] * u[:, :, None, :]  # [B, HV, K, V]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))  # [B, HV, V]
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, HV, V)  # [B, T, HV, V]
    if not output_final_state:
        return o, None
    return o, ((S, A) if precond else S)
