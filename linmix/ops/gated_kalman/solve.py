"""The ridge solve of Gated KalmaNet: Chebyshev iteration, and the implicit gradient every backend shares.

For a token with Gram state ``H`` (symmetric PSD) and ``F = max(||H||_F, FLOOR)``, the system is
``A x = q`` with ``A = H + lambda I``, ``lambda = ridge * F``. The spectrum of ``A`` lies in
``[mu, L] = [lambda, lambda + F]`` (``||H||_2 <= ||H||_F``), so Chebyshev iteration with the step
``h = 2 / (L + mu) = 2 / ((1 + 2 ridge) F)`` and ``rho = (L - mu) / (L + mu) = 1 / (1 + 2 ridge)``
converges for every token at the rate ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)``, ``kappa <= (1 + ridge) / ridge``
(spec/gated_kalmanet.md §2). ``rho`` is the same for every token, so the weights ``omega_n`` are
numbers known before any data (``omegas``); only ``h`` changes per token.

The iteration is run on the scaled system ``(h A) x = h q``: ``h A = h H + c I`` with the constant
``c = h lambda = 2 ridge / (1 + 2 ridge)``. Starting from ``xi_{-1} = 0``, ``xi_0 = h q``, ``omega_0 = 2``,
step ``n = 1..iters``: ``omega_n = 1 / (1 - rho^2 omega_{n-1} / 4)`` and
``xi_n = xi_{n-1} - omega_n (h A xi_{n-1} - h q) + (omega_n - 1) (xi_{n-1} - xi_{n-2})``.

Gradient (spec §2 "Backward", §5 item 7: implicit differentiation): ``x`` is treated as the exact
solution of ``A(theta) x = q``. For a cotangent ``dx``, ``w = A^{-1} dx`` (the same Chebyshev run:
its map is a symmetric matrix polynomial in ``A``, spec Lemma 2), ``dq = w`` and every parameter
``theta`` of ``A`` (the Gram state, hence keys, gates, strengths and the initial state, and
``lambda`` through ``||H||_F``) gets ``-d<w, A(theta) x>/d theta``. The backends get that from
autograd with one surrogate term: ``x = x_cheb + S(q - A(theta) x_cheb)``, where ``x_cheb`` is the
iteration's result (no graph) and ``S`` is an autograd function whose value is zero and whose
backward applies ``A^{-1}`` by Chebyshev (``ImplicitSolve``). So ``x`` keeps the iteration's value
exactly, and autograd differentiates the residual ``q - A(theta) x_cheb``, whatever form the
backend computes ``A(theta) x`` in (a full ``H_t``, or a chunk's start state plus its keys).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLOOR = 1e-12  # smallest ||H||_F of the solve: an all-zero Gram state (no key yet) gives x = q / (ridge * FLOOR)


def omegas(ridge: float, iters: int) -> tuple[float, ...]:
    """The weights ``omega_1 .. omega_iters`` of the iteration (``omega_0 = 2``, ``rho = 1 / (1 + 2 ridge)``)."""
    rho = 1.0 / (1.0 + 2.0 * ridge)
    weights, omega = [], 2.0
    for _ in range(iters):
        omega = 1.0 / (1.0 - 0.25 * rho * rho * omega)
        weights.append(omega)
    return tuple(weights)


def shift(ridge: float) -> float:
    """``c = h lambda = 2 ridge / (1 + 2 ridge)``, the identity's weight in the scaled matrix ``h A``."""
    return 2.0 * ridge / (1.0 + 2.0 * ridge)


def frobenius(squared: torch.Tensor) -> torch.Tensor:
    """``F = max(||H||_F, FLOOR)`` from ``||H||_F^2`` (zero gradient below the floor, no ``sqrt'(0)``)."""
    return squared.clamp_min(FLOOR * FLOOR).sqrt()


def step_size(F: torch.Tensor, ridge: float) -> torch.Tensor:
    """``h = 2 / (L + mu) = 2 / ((1 + 2 ridge) F)``."""
    return (2.0 / (1.0 + 2.0 * ridge)) / F


def chebyshev(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, ridge: float,
              iters: int) -> torch.Tensor:
    """``x ~ A^{-1} b`` by ``iters`` Chebyshev steps, given ``apply(x) = h A x`` and ``rhs = h b`` (module docstring).

    Returns ``xi_iters`` (``rhs`` itself for ``iters = 0``); ``iters`` products with ``h A``.
    """
    x_prev, x = None, rhs
    for omega in omegas(ridge, iters):
        residual = apply(x) - rhs
        momentum = x if x_prev is None else x - x_prev
        x, x_prev = torch.add(x, momentum, alpha=omega - 1.0).sub_(residual, alpha=omega), x
    return x


# ---- the token form: one full Gram state per token --------------------------------------------------


def token_matrix(H: torch.Tensor, h: torch.Tensor, ridge: float) -> torch.Tensor:
    """The scaled matrix ``h A = h H + c I`` ``[..., K, K]`` of one token per batch entry (``h [...]``)."""
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return h[..., None, None] * H + shift(ridge) * eye


def token_chebyshev(scaled: torch.Tensor, h: torch.Tensor, b: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``A^{-1} b`` by Chebyshev for ``scaled = h A`` ``[..., K, K]``, ``h [...]``, ``b [..., K]``."""
    return chebyshev(lambda x: (scaled @ x[..., None])[..., 0], h[..., None] * b, ridge, iters)


class TokenImplicitSolve(torch.autograd.Function):
    """Zero, whose backward applies ``A^{-1}`` (Chebyshev) to its cotangent: the surrogate ``S`` of the
    module docstring for the token form."""

    @staticmethod
    def forward(ctx, residual, scaled, h, ridge, iters):
        ctx.save_for_backward(scaled, h)
        ctx.ridge, ctx.iters = ridge, iters
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        scaled, h = ctx.saved_tensors
        return token_chebyshev(scaled, h, grad, ctx.ridge, ctx.iters), None, None, None, None


def token_solve(H: torch.Tensor, q: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``x ~ (H + lambda I)^{-1} q`` by Chebyshev, ``lambda = ridge * max(||H||_F, FLOOR)``, implicit gradient.

    Args:
        H: Gram states ``[..., K, K]`` (symmetric PSD).
        q: right-hand sides ``[..., K]``.
        ridge: the ridge ratio.
        iters: the number of Chebyshev steps.

    Returns:
        ``x [..., K]``.
    """
    F = frobenius(H.square().sum(dim=(-2, -1)))  # [...]
    h = step_size(F, ridge)
    with torch.no_grad():
        scaled = token_matrix(H.detach(), h.detach(), ridge)
        x = token_chebyshev(scaled, h.detach(), q.detach(), ridge, iters)
    if not (torch.is_grad_enabled() and (H.requires_grad or q.requires_grad)):
        return x
    residual = q - (H @ x[..., None])[..., 0] - (ridge * F)[..., None] * x  # q - A(theta) x
    return x + TokenImplicitSolve.apply(residual, scaled, h.detach(), ridge, iters)


def token_exact_solve(H: torch.Tensor, q: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(H + lambda I)^{-1} q`` by ``torch.linalg.solve`` (LU), gradient by autograd: the ground truth."""
    F = frobenius(H.square().sum(dim=(-2, -1)))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H + (ridge * F)[..., None, None] * eye, q)
