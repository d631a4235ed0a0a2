"""The iterative solvers of the Gated KalmaNet solver study (spec/gated_kalmanet.md §4 "Solver study").

Every solver solves a batch of symmetric positive definite systems ``A x = b`` whose spectrum lies
in ``[mu, L]`` and returns its iterates ``[x_0, ..., x_iters]``, where ``x_n`` is what the method
holds after ``n`` products with ``A``. Gradient descent, Nesterov and Chebyshev start from the free
gradient step out of zero (``x_0 = step * b``: the gradient at zero is ``-b``, no product needed);
conjugate gradient starts at ``x_0 = 0``. So at equal ``n`` every method has paid the same number
of products with ``A``.

The Chebyshev iteration is the one the GKA backends run (``linmix.ops.gated_kalman.solve``), with
its bounds ``mu = lambda``, ``L = lambda + ||H||_F`` for ``A = H + lambda I``, ``lambda = ridge ||H||_F``.
Its ``xi_n`` applies a polynomial of degree ``n + 1`` in ``A`` to ``b`` (``xi_0 = h b`` is the first
step), the scaled Chebyshev polynomial on ``[mu, L]``, so both the relative residual and the
relative error obey ``1 / T_{n+1}((L + mu) / (L - mu))`` (``chebyshev_bound``).

Gradients: ``cg_implicit_solve`` is the conjugate-gradient analogue of ``solve.token_solve``
(implicit differentiation, the backward solve done by the same number of CG steps), and
``unrolled_cg_solve`` and ``unrolled_chebyshev_solve`` leave the iteration in the autograd graph, so
that autograd differentiates the finite iteration itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from linmix.ops.gated_kalman.solve import chebyshev, frobenius, step_size, token_chebyshev, token_matrix

Apply = Callable[[torch.Tensor], torch.Tensor]


def matvec(A: torch.Tensor) -> Apply:
    """``x -> A x`` for a batch of matrices ``A [..., D, D]`` and vectors ``x [..., D]``."""
    return lambda x: (A @ x[..., None])[..., 0]


def ridge_system(H: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The GKA system matrix of Gram states ``H [..., D, D]``.

    Returns:
        ``A = H + ridge F I`` ``[..., D, D]`` and ``F = max(||H||_F, FLOOR)`` ``[...]``, differentiable in ``H``.
    """
    F = frobenius(H.square().sum(dim=(-2, -1)))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return H + (ridge * F)[..., None, None] * eye, F


def kappa_bound(ridge: float) -> float:
    """``L / mu = (1 + ridge) / ridge``, the largest condition number a system ``H + ridge ||H||_F I`` can have."""
    return (1.0 + ridge) / ridge


def chebyshev_bound(ridge: float, n: int) -> float:
    """``1 / T_{n+1}((kappa + 1) / (kappa - 1))``: the largest relative residual or error of Chebyshev's ``xi_n``.

    Equal to ``2 s^(n+1) / (1 + s^(2n+2))`` with ``s = (sqrt(kappa) - 1) / (sqrt(kappa) + 1)``,
    ``kappa = kappa_bound(ridge)``.
    """
    root = math.sqrt(kappa_bound(ridge))
    s = (root - 1.0) / (root + 1.0)
    return 2.0 * s ** (n + 1) / (1.0 + s ** (2 * n + 2))


def gradient_descent_bound(ridge: float, n: int) -> float:
    """``rho^(n+1)``, ``rho = (kappa - 1) / (kappa + 1)``: the largest relative residual or error of ``x_n`` of
    gradient descent with the step ``2 / (L + mu)`` (its error polynomial is ``(1 - h A)^(n+1)``)."""
    kappa = kappa_bound(ridge)
    return ((kappa - 1.0) / (kappa + 1.0)) ** (n + 1)


def gradient_descent(apply: Apply, b: torch.Tensor, mu: torch.Tensor, L: torch.Tensor,
                     iters: int) -> list[torch.Tensor]:
    """Gradient descent on ``0.5 x^T A x - b^T x`` with the optimal fixed step ``2 / (L + mu)``.

    Args:
        apply: ``x -> A x`` on ``[..., D]``.
        b: right-hand sides ``[..., D]``.
        mu, L: spectrum bounds ``[...]`` of each system.
        iters: products with ``A``.

    Returns:
        ``iters + 1`` iterates ``[..., D]``.
    """
    step = (2.0 / (L + mu))[..., None]  # [..., 1]
    x = step * b
    iterates = [x]
    for _ in range(iters):
        x = x - step * (apply(x) - b)
        iterates.append(x)
    return iterates


def nesterov(apply: Apply, b: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, iters: int) -> list[torch.Tensor]:
    """Nesterov's accelerated gradient for strongly convex functions: step ``1 / L``, momentum
    ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` with ``kappa = L / mu``.

    Args and Returns: as ``gradient_descent``.
    """
    step = (1.0 / L)[..., None]  # [..., 1]
    root = (L / mu).sqrt()[..., None]
    momentum = (root - 1.0) / (root + 1.0)
    x = step * b
    y = x
    iterates = [x]
    for _ in range(iters):
        x_next = y - step * (apply(y) - b)
        y = x_next + momentum * (x_next - x)
        x = x_next
        iterates.append(x)
    return iterates


def conjugate_gradient(apply: Apply, b: torch.Tensor, iters: int) -> list[torch.Tensor]:
    """Conjugate gradient from ``x_0 = 0``, one product with ``A`` per step; a system whose residual
    has vanished stays where it is.

    Args:
        apply: ``x -> A x`` on ``[..., D]``.
        b: right-hand sides ``[..., D]``.
        iters: products with ``A``.

    Returns:
        ``iters + 1`` iterates ``[..., D]``.
    """
    x = torch.zeros_like(b)
    residual, direction = b, b
    norm2 = residual.square().sum(-1)  # [...]
    iterates = [x]
    for _ in range(iters):
        product = apply(direction)
        curvature = (direction * product).sum(-1)
        alpha = torch.where(curvature > 0, norm2 / curvature.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        x = x + alpha[..., None] * direction
        residual = residual - alpha[..., None] * product
        new_norm2 = residual.square().sum(-1)
        beta = torch.where(norm2 > 0, new_norm2 / norm2.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        direction = residual + beta[..., None] * direction
        norm2 = new_norm2
        iterates.append(x)
    return iterates


def chebyshev_iterates(apply_scaled: Apply, rhs: torch.Tensor, ridge: float, iters: int) -> list[torch.Tensor]:
    """Every iterate ``xi_0 .. xi_iters`` of ``solve.chebyshev`` (the GKA iteration, run unchanged).

    Args:
        apply_scaled: ``x -> h A x`` on ``[..., D]``.
        rhs: ``h b`` ``[..., D]``.
        ridge: the ridge ratio, which fixes the weights ``omega_n``.
        iters: products with ``A``.

    Returns:
        ``iters + 1`` iterates ``[..., D]``.
    """
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:  # step n applies h A to xi_{n-1}
        seen.append(x)
        return apply_scaled(x)

    last = chebyshev(record, rhs, ridge, iters)
    return [*seen, last]


class _CGImplicitSolve(torch.autograd.Function):
    """Zero, whose backward applies ``A^{-1}`` to its cotangent by conjugate gradient (compare
    ``solve.TokenImplicitSolve``, which does it by Chebyshev)."""

    @staticmethod
    def forward(ctx, residual, A, iters):
        ctx.save_for_backward(A)
        ctx.iters = iters
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        (A,) = ctx.saved_tensors
        return conjugate_gradient(matvec(A), grad, ctx.iters)[-1], None, None


def cg_implicit_solve(H: torch.Tensor, q: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``x ~ (H + ridge ||H||_F I)^{-1} q`` by ``iters`` CG steps, gradient by implicit differentiation.

    As ``solve.token_solve``: ``x = x_cg + S(q - A(H) x_cg)`` where ``S`` is zero and its backward
    solves ``A w = dx`` by the same number of CG steps, so ``dq = w`` and ``dH = -d<w, A(H) x_cg>/dH``.

    Args:
        H: Gram states ``[..., D, D]`` (symmetric PSD).
        q: right-hand sides ``[..., D]``.
        ridge: the ridge ratio.
        iters: CG steps, forward and backward.

    Returns:
        ``x [..., D]``.
    """
    with torch.no_grad():
        A, _ = ridge_system(H.detach(), ridge)
        x = conjugate_gradient(matvec(A), q.detach(), iters)[-1]
    A_of_H, _ = ridge_system(H, ridge)
    residual = q - matvec(A_of_H)(x)  # q - A(H) x
    return x + _CGImplicitSolve.apply(residual, A, iters)


def unrolled_cg_solve(H: torch.Tensor, q: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``x ~ (H + ridge ||H||_F I)^{-1} q`` by ``iters`` CG steps kept in the autograd graph: its gradient
    is that of the finite iteration, the function the forward computes (CG is not linear in ``q``).

    Args and Returns: as ``cg_implicit_solve``.
    """
    A, _ = ridge_system(H, ridge)
    return conjugate_gradient(matvec(A), q, iters)[-1]


def unrolled_chebyshev_solve(H: torch.Tensor, q: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``x ~ (H + ridge ||H||_F I)^{-1} q`` by ``iters`` Chebyshev steps kept in the autograd graph:
    its gradient is that of the finite iteration (not the implicit one of ``solve.token_solve``).

    Args:
        H: Gram states ``[..., D, D]`` (symmetric PSD).
        q: right-hand sides ``[..., D]``.
        ridge: the ridge ratio.
        iters: Chebyshev steps.

    Returns:
        ``x [..., D]``.
    """
    F = frobenius(H.square().sum(dim=(-2, -1)))  # [...]
    h = step_size(F, ridge)
    return token_chebyshev(token_matrix(H, h, ridge), h, q, ridge, iters)
