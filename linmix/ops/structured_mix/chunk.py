"""Chunked structured mixing: a blocked triangular solve with the adjoint backward (spec §3.3, §5.4).

Per batch row and head, the outputs live in one buffer ``ext`` of the ``S`` state rows followed by
the ``T`` outputs (``S = f(K - 1)``), so position ``t`` is row ``S + t``. Split T into chunks of
``C`` positions. In chunk ``c = [c0, c0 + C)`` the entries ``(t, k)`` whose predecessor lies inside
the chunk (``near``: ``t - f(k) >= c0``) form a strictly lower ``C x C`` matrix ``B_cc``; the others
(``far``) read rows already known. Then

    forward:  T_c = (I - B_cc)^{-1}, all chunks at once;  Y_c = T_c (alpha_c x_c + far_c)
    backward: gZ_c = T_c^T (gY_c + acc_c), chunks in reverse; the far entries of chunk c add
              beta[t, k] gZ_t to acc at their predecessor; gbeta[t, k] = <gZ_t, y[t - f(k)]>,
              galpha_t = <gZ_t, x_t>, gx_t = alpha_t gZ_t, and the state gets acc of its rows.

Every far level of a chunk is one contiguous slice of ``ext`` (the pattern is translation
invariant), masked to the rows ``i < f(k)``. Only ``ext`` and the ``T_c`` are kept for the backward.
Cost: ``O(T C D)`` for the ``T_c`` products, ``O(T K D)`` for the far terms, ``O(T C^2)`` to build
the inverses; sequential depth ``T / C``; memory ``O(T (D + C))``.

A lattice pattern (§3.4) reads positions that depend on the absolute position, and its state is
the shift register of K slots: ``ext`` is then the K initial slots followed by the outputs, and
``Lattice.sources`` gives the row of ``ext`` each entry ``(t, k)`` reads (per batch row). The near
entries are scattered into ``B_cc``, the far terms are gathers of those rows, and the backward
scatters their cotangents back (``_LatticeSolve``); the final register is a gather of ``ext``.
"""

import torch
import torch.nn.functional as F

from linmix.ops.structured_mix.dense import gather_rows
from linmix.ops.structured_mix.patterns import Lattice, Offsets

CHUNK = 64  # C: positions per chunk


def _near_inverses(beta: torch.Tensor, offsets: tuple[int, ...], C: int) -> torch.Tensor:
    """``T_c = (I - B_cc)^{-1}`` of every chunk, ``[B, H, N, C, C]``, from chunked ``beta [B, H, N, C, K]``."""
    B, H, N = beta.shape[:3]
    near = torch.zeros(B, H, N, C, C, dtype=beta.dtype, device=beta.device)  # B_cc
    for k, f in enumerate(offsets):
        if f < C:  # row i reads row i - f of its own chunk when i >= f
            near = near + torch.diag_embed(beta[..., f:, k], offset=-f)
    eye = torch.eye(C, dtype=beta.dtype, device=beta.device)
    return torch.linalg.solve_triangular(eye - near, eye.expand_as(near), upper=False, unitriangular=True)


def _far_masks(offsets: tuple[int, ...], C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[K, C]``: 1 where row ``i`` of a chunk reads level ``k`` before the chunk (``i < f(k)``)."""
    rows = torch.arange(C, device=device)
    return (rows < torch.tensor(offsets, device=device)[:, None]).to(dtype)


class _ChunkedSolve(torch.autograd.Function):
    """``(o, final_state)`` of the chunked solve, with the adjoint backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, alpha, beta, past, offsets, T):
        # x [B, H, Tp, D], alpha [B, H, Tp], beta [B, H, Tp, K] (zero past T), past [B, H, S, D]
        B, H, Tp, D = x.shape
        S, C = past.shape[2], min(CHUNK, Tp)
        chunked_beta = beta.view(B, H, Tp // C, C, len(offsets))
        inverses = _near_inverses(chunked_beta, offsets, C)  # [B, H, N, C, C]
        masks = _far_masks(offsets, C, x.dtype, x.device)  # [K, C]
        z = alpha[..., None] * x  # [B, H, Tp, D]
        ext = torch.cat([past, torch.zeros_like(x)], dim=2)  # [B, H, S + Tp, D]
        for c0 in range(0, Tp, C):
            rhs = z[:, :, c0:c0 + C]  # [B, H, C, D]
            for k, f in enumerate(offsets):
                weight = chunked_beta[:, :, c0 // C, :, k] * masks[k]  # [B, H, C]
                rhs = rhs + weight[..., None] * ext[:, :, S + c0 - f:S + c0 + C - f]
            ext[:, :, S + c0:S + c0 + C] = inverses[:, :, c0 // C] @ rhs
        ctx.save_for_backward(x, alpha, beta, ext, inverses)
        ctx.offsets, ctx.T = offsets, T
        return ext[:, :, S:S + T].clone(), ext[:, :, T:T + S].clone()

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        # grad_o [B, H, T, D], grad_final [B, H, S, D]
        x, alpha, beta, ext, inverses = ctx.saved_tensors
        offsets, T = ctx.offsets, ctx.T
        B, H, Tp, D = x.shape
        S, C = ext.shape[2] - Tp, inverses.shape[-1]
        chunked_beta = beta.view(B, H, Tp // C, C, len(offsets))
        masks = _far_masks(offsets, C, x.dtype, x.device)
        acc = torch.zeros_like(ext)  # [B, H, S + Tp, D]: cotangents of the rows, from the outputs and later rows
        acc[:, :, S:S + T] += grad_o
        acc[:, :, T:T + S] += grad_final
        grad_z = torch.zeros_like(x)  # [B, H, Tp, D]
        for c0 in reversed(range(0, Tp, C)):
            g = inverses[:, :, c0 // C].mT @ acc[:, :, S + c0:S + c0 + C]  # [B, H, C, D]
            grad_z[:, :, c0:c0 + C] = g
            for k, f in enumerate(offsets):
                weight = chunked_beta[:, :, c0 // C, :, k] * masks[k]  # [B, H, C]
                acc[:, :, S + c0 - f:S + c0 + C - f] += weight[..., None] * g
        grad_beta = torch.stack([(grad_z * ext[:, :, S - f:S - f + Tp]).sum(-1) for f in offsets], dim=-1)
        grad_alpha = (grad_z * x).sum(-1)  # [B, H, Tp]
        return alpha[..., None] * grad_z, grad_alpha, grad_beta, acc[:, :, :S], None, None


def _scatter_rows(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """The adjoint of ``gather_rows``: add ``values [B, H, ..., D]`` into ``buffer [B, H, R, D]`` at
    ``rows [B, ...]``."""
    B, H, _, D = buffer.shape
    flat = rows.reshape(B, 1, -1, 1).expand(B, H, -1, D)  # [B, H, M, D]
    buffer.scatter_add_(2, flat, values.reshape(flat.shape))


class _LatticeSolve(torch.autograd.Function):
    """``(o, final slots)`` of the chunked solve of a lattice call: near entries in ``B_cc``, far ones gathered."""

    @staticmethod
    def forward(ctx, x, alpha, beta, slots, rows, present, T):
        # x [B, H, Tp, D], alpha [B, H, Tp], beta [B, H, Tp, K] (zero past T), slots [B, H, K, D],
        # rows [B, Tp + 1, K] into ext = [slots; outputs], present [B, Tp + 1, K]
        B, H, Tp, D = x.shape
        K, C = slots.shape[2], min(CHUNK, Tp)
        N = Tp // C
        reads = rows[:, :Tp]  # [B, Tp, K]
        chunk_start = torch.arange(Tp, device=x.device) // C * C  # [Tp]
        local = reads - K - chunk_start[:, None]  # [B, Tp, K], the column inside the token's own chunk if >= 0
        weight = beta * present[:, None, :Tp].to(beta.dtype)  # [B, H, Tp, K]
        near = (local >= 0)[:, None].to(beta.dtype)  # [B, 1, Tp, K]
        columns = local.clamp_min(0).view(B, 1, N, C, K).expand(B, H, N, C, K)
        near_matrix = torch.zeros(B, H, N, C, C, dtype=x.dtype, device=x.device).scatter_add_(
            -1, columns, (weight * near).view(B, H, N, C, K))  # B_cc
        eye = torch.eye(C, dtype=x.dtype, device=x.device)
        inverses = torch.linalg.solve_triangular(eye - near_matrix, eye.expand_as(near_matrix), upper=False,
                                                 unitriangular=True)  # [B, H, N, C, C]
        far = weight * (1 - near)  # [B, H, Tp, K]
        z = alpha[..., None] * x  # [B, H, Tp, D]
        ext = torch.cat([slots, torch.zeros_like(x)], dim=2)  # [B, H, K + Tp, D]
        for c0 in range(0, Tp, C):
            gathered = gather_rows(ext, reads[:, c0:c0 + C])  # [B, H, C, K, D]
            rhs = z[:, :, c0:c0 + C] + torch.einsum("bhik,bhikd->bhid", far[:, :, c0:c0 + C], gathered)
            ext[:, :, K + c0:K + c0 + C] = inverses[:, :, c0 // C] @ rhs
        ctx.save_for_backward(x, alpha, weight, far, present, rows, ext, inverses)
        ctx.T = T
        return ext[:, :, K:K + T].clone(), gather_rows(ext, rows[:, T])

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        # grad_o [B, H, T, D], grad_final [B, H, K, D]
        x, alpha, weight, far, present, rows, ext, inverses = ctx.saved_tensors
        T = ctx.T
        B, H, Tp, D = x.shape
        K, C = ext.shape[2] - Tp, inverses.shape[-1]
        reads = rows[:, :Tp]  # [B, Tp, K]
        acc = torch.zeros_like(ext)  # [B, H, K + Tp, D]: cotangents of the rows, from the outputs and later rows
        acc[:, :, K:K + T] += grad_o
        _scatter_rows(acc, rows[:, T], grad_final)
        grad_z = torch.zeros_like(x)  # [B, H, Tp, D]
        for c0 in reversed(range(0, Tp, C)):
            g = inverses[:, :, c0 // C].mT @ acc[:, :, K + c0:K + c0 + C]  # [B, H, C, D]
            grad_z[:, :, c0:c0 + C] = g
            _scatter_rows(acc, reads[:, c0:c0 + C], far[:, :, c0:c0 + C, :, None] * g[:, :, :, None])
        grad_weight = torch.einsum("bhtd,bhtkd->bhtk", grad_z, gather_rows(ext, reads))  # [B, H, Tp, K]
        grad_beta = grad_weight * present[:, None, :Tp].to(grad_weight.dtype)
        grad_alpha = (grad_z * x).sum(-1)  # [B, H, Tp]
        return alpha[..., None] * grad_z, grad_alpha, grad_beta, acc[:, :, :K], None, None, None


def _heads_first_padded(x, alpha, beta):
    """``x [B, H, Tp, D]``, ``alpha [B, H, Tp]``, ``beta [B, H, Tp, K]`` zero past T up to a whole number of
    chunks of ``min(CHUNK, T)`` (padded rows read nothing and are read by nothing kept), and the padding."""
    T = x.shape[1]
    pad = -T % min(CHUNK, T)
    return (F.pad(x.transpose(1, 2), (0, 0, 0, pad)), F.pad(alpha.transpose(1, 2), (0, pad)),
            F.pad(beta.transpose(1, 2), (0, 0, 0, pad)), pad)


def _chunk_lattice(x, alpha, beta, pattern: Lattice, initial_state, output_final_state):
    """The chunked solve of a lattice call from ``initial_state = (slots, position)`` (zeros at 0 if None)."""
    B, T, H, D = x.shape
    x_p, alpha_p, beta_p, pad = _heads_first_padded(x, alpha, beta)
    if initial_state is None:
        slots = x.new_zeros(B, H, pattern.levels, D)
        start = torch.zeros(B, dtype=torch.int64, device=x.device)
    else:
        slots, start = initial_state
    rows, present = pattern.sources(start, T + pad)  # [B, Tp + 1, K]
    o, final_slots = _LatticeSolve.apply(x_p, alpha_p, beta_p, slots, rows, present, T)
    return o.transpose(1, 2), ((final_slots, start + T) if output_final_state else None)


def chunk_structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    pattern: Offsets | Lattice,
    initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]:
    """The chunked solve (module docstring); arguments and returns as ``naive_structured_mix``."""
    if isinstance(pattern, Lattice):
        return _chunk_lattice(x, alpha, beta, pattern, initial_state, output_final_state)
    B, T, H, D = x.shape
    x_p, alpha_p, beta_p, _ = _heads_first_padded(x, alpha, beta)
    past = x.new_zeros(B, H, pattern.max_offset, D) if initial_state is None else initial_state
    o, final_state = _ChunkedSolve.apply(x_p, alpha_p, beta_p, past, pattern.offsets, T)
    return o.transpose(1, 2), (final_state if output_final_state else None)
