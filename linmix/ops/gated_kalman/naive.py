"""Token-by-token Gated KalmaNet: the executable spec of the op (spec/gated_kalmanet.md §2 and §6).

Per position and head, with ``k <- beta k`` and ``v <- beta v`` and ``gamma = exp(g)``:

1. ``H = gamma H + k k^T`` and ``U = gamma U + k v^T``;
2. ``lambda = ridge * ||H||_F`` and ``x ~ (H + lambda I)^{-1} q`` (``iters`` Chebyshev steps; ``exact``:
   ``torch.linalg.solve``);
3. ``q_mix = x`` without ``alpha`` (alpha = 1, the ridge readout), else ``q + alpha (x - q)``;
4. ``o = scale * U^T q_mix``.

The states run token by token; the solves, independent of each other given the ``H_t``, run for all
tokens at once (``[B, T, H, K, K]`` Gram states: a reference's memory, ``T K^2`` per head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from linmix.ops.gated_kalman.solve import token_exact_solve, token_solve

State = tuple[torch.Tensor, torch.Tensor]


def _mixed(q: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """The readout query: ``x`` without ``alpha``, else ``q + alpha (x - q)`` (``alpha`` one per head)."""
    return x if alpha is None else q + alpha[..., None] * (x - q)


def gka_step(q, k, v, g, beta, alpha, *, H: torch.Tensor, U: torch.Tensor, scale: float,
             solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """One position of the recurrence on tensors of one dtype.

    Args:
        q, k: ``[B, H, K]``.
        v: ``[B, H, V]``.
        g, beta: ``[B, H]``.
        alpha: ``[B, H]`` or None (alpha = 1).
        H: ``[B, H, K, K]``, the Gram state after the previous position.
        U: ``[B, H, K, V]``, the key-value state after the previous position.
        scale: factor of the readout.
        solve: ``(H, q) -> x``, the ridge solve.

    Returns:
        ``o [B, H, V]``, the new ``H`` and the new ``U``.
    """
    k, v = beta[..., None] * k, beta[..., None] * v
    decay = torch.exp(g)[..., None, None]  # [B, H, 1, 1]
    H = decay * H + k[..., :, None] * k[..., None, :]  # [B, H, K, K]
    U = decay * U + k[..., :, None] * v[..., None, :]  # [B, H, K, V]
    o = scale * (_mixed(q, solve(H, q), alpha)[..., None, :] @ U)[..., 0, :]  # [B, H, V]
    return o, H, U


def _loop(q, k, v, g, beta, alpha, *, scale: float, initial_state: State | None, output_final_state: bool,
          solve) -> tuple[torch.Tensor, State | None]:
    """The states token by token, then every token's solve (independent given its ``H_t``) and readout at once."""
    B, T, Hh, K = q.shape
    V = v.shape[-1]
    H, U = (q.new_zeros(B, Hh, K, K), q.new_zeros(B, Hh, K, V)) if initial_state is None else initial_state
    k, v = beta[..., None] * k, beta[..., None] * v
    decay = torch.exp(g)[..., None, None]  # [B, T, H, 1, 1]
    grams, states = [], []
    for t in range(T):
        H = decay[:, t] * H + k[:, t, :, :, None] * k[:, t, :, None, :]  # [B, H, K, K]
        U = decay[:, t] * U + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        grams.append(H)
        states.append(U)
    if T == 0:
        return v.new_zeros(B, 0, Hh, V), ((H, U) if output_final_state else None)
    x = solve(torch.stack(grams, dim=1), q)  # [B, T, H, K]
    o = scale * (_mixed(q, x, alpha)[..., None, :] @ torch.stack(states, dim=1))[..., 0, :]  # [B, T, H, V]
    return o, ((H, U) if output_final_state else None)


def naive_gated_kalman(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    ridge: float,
    iters: int,
    scale: float,
    initial_state: State | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, State | None]:
    """Run the recurrence one position at a time, each solve by ``iters`` Chebyshev steps.

    Inputs are validated and already in the compute dtype (see ``linmix.ops.gated_kalman``).

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g, beta: ``[B, T, H]``.
        alpha: ``[B, T, H]`` or None.
        ridge: the ridge ratio.
        iters: Chebyshev steps per token.
        scale: factor of the readout.
        initial_state: ``(H [B, H, K, K], U [B, H, K, V])`` or None for zeros.
        output_final_state: whether to return the state after the last position.

    Returns:
        ``o [B, T, H, V]`` and the final state ``(H, U)`` or None.
    """
    return _loop(q, k, v, g, beta, alpha, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, solve=lambda H, x: token_solve(H, x, ridge, iters))


def exact_gated_kalman(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    ridge: float,
    iters: int,
    scale: float,
    initial_state: State | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, State | None]:
    """The recurrence with every solve exact (``torch.linalg.solve``; ``iters`` is not used), gradient by
    autograd through the solve: the limit of ``naive`` as ``iters`` grows, and the ground truth of its
    gradient (implicit differentiation is the exact solve's gradient). Arguments as ``naive_gated_kalman``.
    """
    return _loop(q, k, v, g, beta, alpha, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, solve=lambda H, x: token_exact_solve(H, x, ridge))
