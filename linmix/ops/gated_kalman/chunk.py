"""Chunked Gated KalmaNet in plain PyTorch (spec/gated_kalmanet.md §3).

In a chunk of ``C`` positions entered with states ``H_c, U_c``, write ``G_t`` for the log decay from the
chunk start to position ``t`` and ``M_tj = exp(G_t - G_j)`` for ``j <= t`` (0 above), every exponent a
sum of log decays over a span, summed directly (``segsum``): ``<= 0``, so nothing overflows however
strong the decay. With ``k <- beta k`` and ``v <- beta v``:

* ``H_t = e^{G_t} H_c + sum_{j<=t} M_tj k_j k_j^T`` is never formed. Its norm, in closed form for
  all rows: ``||H_t||_F^2 = e^{2 G_t} ||H_c||_F^2 + 2 e^{G_t} sum_j M_tj k_j^T H_c k_j
  + sum_{j,j'} M_tj M_tj' (k_j . k_j')^2`` (every term ``>= 0``; the last one a row sum of
  ``M o (M (KK^T o KK^T))``).
* The Chebyshev products of all rows at once (``X [C, K]``, one row per position):
  ``X H_t = e^{G} o (X H_c^T) + ((X K^T) o M) K`` (H_c^T: ``H_t x``, for any start state), three
  matrix products per step, every chunk of the sequence in one batch.
* Readout, scalar-gated GLA: ``O = scale (e^{G} o (Q_mix U_c) + ((Q_mix K^T) o M) V)``.
* Across chunks, sequentially: ``[H | U] <- e^{G_C} [H | U] + A^T [A | B]`` with
  ``A = e^{(G_C - G)/2} o K`` and ``B = e^{(G_C - G)/2} o V`` (so the Gram part is ``A^T A``).

The gradient is implicit (``linmix.ops.gated_kalman.solve``): the iteration runs without a graph and
autograd differentiates the residual ``Q - (X H_t + lambda o X)`` of its result in the closed forms above.
"""

from __future__ import annotations

import torch

from linmix.ops.common.chunk import heads_chunks, heads_unchunk, segsum, suffix_after
from linmix.ops.gated_kalman.naive import State
from linmix.ops.gated_kalman.solve import chebyshev, frobenius, shift, step_size


def gram_norms_squared(Hc: torch.Tensor, k: torch.Tensor, decay: torch.Tensor,
                       from_start: torch.Tensor) -> torch.Tensor:
    """``||H_t||_F^2`` of every position in closed form, without forming ``H_t`` (module docstring).

    Args:
        Hc: the Gram states entering the chunks ``[..., K, K]``.
        k: the chunks' keys (strength applied) ``[..., C, K]``.
        decay: ``M [..., C, C]``, ``exp(G_t - G_j)`` for ``j <= t``, else 0.
        from_start: ``exp(G_t)`` ``[..., C, 1]``.

    Returns:
        ``[..., C, 1]``, a sum of three terms ``>= 0`` for a PSD ``H_c``.
    """
    gram = k @ k.transpose(-1, -2)  # [..., C, C]
    quad = ((k @ Hc) * k).sum(dim=-1, keepdim=True)  # [..., C, 1]: k_j^T H_c k_j
    return (from_start.square() * Hc.square().sum(dim=(-2, -1))[..., None, None]
            + 2.0 * from_start * (decay @ quad)
            + (decay * (decay @ gram.square())).sum(dim=-1, keepdim=True))


class _Chunks:
    """One call's chunked tensors and the products with ``H_t`` of every row (module docstring)."""

    def __init__(self, Hc: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, from_start: torch.Tensor):
        self.Hc, self.k, self.decay, self.from_start = Hc, k, decay, from_start

    def detached(self) -> _Chunks:
        return _Chunks(*(x.detach() for x in (self.Hc, self.k, self.decay, self.from_start)))

    def scaled(self, h: torch.Tensor) -> _Chunks:
        """The rows of ``H_t`` scaled by ``h [..., C, 1]``: ``gram_times`` then gives ``h_t H_t x_t``."""
        return _Chunks(self.Hc, self.k, h * self.decay, h * self.from_start)

    def gram_times(self, X: torch.Tensor) -> torch.Tensor:
        """``X H_t`` row by row: ``H_t x_t`` for each position t (``X [B, H, N, C, K]``)."""
        scores = (X @ self.k.transpose(-1, -2)) * self.decay  # [B, H, N, C, C]
        return self.from_start * (X @ self.Hc.transpose(-1, -2)) + scores @ self.k


class ChunkImplicitSolve(torch.autograd.Function):
    """Zero, whose backward applies ``A^{-1}`` to its cotangent by Chebyshev over every chunk's rows
    (the surrogate of ``linmix.ops.gated_kalman.solve`` for the chunked form)."""

    @staticmethod
    def forward(ctx, residual, Hc, k, decay, from_start, h, ridge, iters):
        ctx.save_for_backward(Hc, k, decay, from_start, h)
        ctx.ridge, ctx.iters = ridge, iters
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        Hc, k, decay, from_start, h = ctx.saved_tensors
        w = _chebyshev(_Chunks(Hc, k, decay, from_start), h, grad, ctx.ridge, ctx.iters)
        return w, None, None, None, None, None, None, None


def _chebyshev(chunks: _Chunks, h: torch.Tensor, b: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """``A_t^{-1} b_t`` for every row by Chebyshev (``h [..., C, 1]``, ``b [..., C, K]``), without a graph."""
    c = shift(ridge)
    with torch.no_grad():
        scaled = chunks.scaled(h)
        return chebyshev(lambda X: torch.add(scaled.gram_times(X), X, alpha=c), h * b, ridge, iters)


def chunk_gated_kalman(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State | None]:
    """Gated KalmaNet in chunked form: ``O(iters T (K^2 + C K))`` for the solve, ``O(T K (K + V))`` across chunks.

    Inputs are validated and already in the compute dtype (see ``linmix.ops.gated_kalman``); the
    arguments are ``naive_gated_kalman``'s. Padding positions have zero keys, values and queries and
    no decay, so they leave the states unchanged.

    Returns:
        ``o [B, T, H, V]`` and the final state ``(H, U)`` or None.
    """
    B, T, Hh, K = q.shape
    V = v.shape[-1]
    k, v = beta[..., None] * k, beta[..., None] * v
    q, k, v = (heads_chunks(x, chunk_size) for x in (q, k, v))  # [B, H, N, C, K|V]
    g = heads_chunks(g, chunk_size)  # [B, H, N, C]
    decay = torch.exp(segsum(g))  # [B, H, N, C, C]
    from_start = torch.exp(g.cumsum(dim=-1))[..., None]  # [B, H, N, C, 1]
    half_to_end = torch.exp(0.5 * suffix_after(g))[..., None]  # [B, H, N, C, 1]

    # Across chunks: the states [H | U] entering each chunk.
    H, U = (q.new_zeros(B, Hh, K, K), q.new_zeros(B, Hh, K, V)) if initial_state is None else initial_state
    state = torch.cat([H, U], dim=-1)  # [B, H, K, K + V]
    starts = []
    for n in range(q.shape[2]):
        starts.append(state)
        a = half_to_end[:, :, n] * k[:, :, n]  # [B, H, C, K]
        written = a.transpose(-1, -2) @ torch.cat([a, half_to_end[:, :, n] * v[:, :, n]], dim=-1)
        state = from_start[:, :, n, -1, :, None] * state + written  # [B, H, K, K + V]
    Hc, Uc = torch.stack(starts, dim=2).split([K, V], dim=-1)  # [B, H, N, K, K], [B, H, N, K, V]

    F = frobenius(gram_norms_squared(Hc, k, decay, from_start))  # [B, H, N, C, 1]: ||H_t||_F, floored
    h = step_size(F, ridge)

    # The solve: Chebyshev without a graph, then the implicit gradient's surrogate.
    chunks = _Chunks(Hc, k, decay, from_start)
    x = _chebyshev(chunks.detached(), h.detach(), q.detach(), ridge, iters)  # [B, H, N, C, K]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, Hc, k, decay)):
        residual = q - chunks.gram_times(x) - (ridge * F) * x
        x = x + ChunkImplicitSolve.apply(residual, *(t.detach() for t in (Hc, k, decay, from_start, h)), ridge,
                                         iters)
    if alpha is not None:
        x = q + heads_chunks(alpha, chunk_size)[..., None] * (x - q)

    o = scale * (from_start * (x @ Uc) + ((x @ k.transpose(-1, -2)) * decay) @ v)  # [B, H, N, C, V]
    o = heads_unchunk(o, T)
    if not output_final_state:
        return o, None
    H, U = state.split([K, V], dim=-1)
    return o, (H, U)
