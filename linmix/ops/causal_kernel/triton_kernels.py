"""Triton kernels of the Toeplitz causal kernel ``y[t] = sum_l w[h, l] x[t - l]``.

x, y and their gradients are ``[B, T, H, D]`` contiguous; one program covers a ``[BT, BD]`` tile of
one (batch, head). The L taps are unrolled, every shifted read is masked at the sequence ends, and
sums are kept in float32.
"""

import triton
import triton.language as tl


@triton.jit
def toeplitz_fwd_kernel(x, w, y, T, H, D, L: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """y[b, t, h, :] = sum_{l < L, l <= t} w[h, l] x[b, t - l, h, :]."""
    i_t, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_t * BT + tl.arange(0, BT)  # [BT]
    cols = i_d * BD + tl.arange(0, BD)  # [BD]
    base = i_b * T * H * D + i_h * D
    col_ok = cols[None, :] < D
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for lag in tl.static_range(L):
        tap = tl.load(w + i_h * L + lag).to(tl.float32)
        src = rows - lag
        mask = (src[:, None] >= 0) & (rows[:, None] < T) & col_ok
        xs = tl.load(x + base + src[:, None] * H * D + cols[None, :], mask=mask, other=0.0)
        acc += tap * xs.to(tl.float32)
    mask = (rows[:, None] < T) & col_ok
    tl.store(y + base + rows[:, None] * H * D + cols[None, :], acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def toeplitz_bwd_kernel(
    x, w, dy, dx, dw_partial, T, H, D, NT, ND, L: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr
):
    """dx[t] = sum_l w[l] dy[t + l]; this tile's share of dw[h, l] = sum dy[t] x[t - l].

    ``dw_partial`` is ``[B, H, NT, ND, L]`` float32: one partial sum per tile, reduced by the caller.
    """
    i_t, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    base = i_b * T * H * D + i_h * D
    col_ok = cols[None, :] < D
    here = (rows[:, None] < T) & col_ok
    grad_out = tl.load(dy + base + rows[:, None] * H * D + cols[None, :], mask=here, other=0.0).to(tl.float32)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    partial = dw_partial + ((i_bh * NT + i_t) * ND + i_d) * L
    for lag in tl.static_range(L):
        tap = tl.load(w + i_h * L + lag).to(tl.float32)
        later = rows + lag
        mask = (later[:, None] < T) & col_ok
        acc += tap * tl.load(dy + base + later[:, None] * H * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        earlier = rows - lag
        mask = (earlier[:, None] >= 0) & here
        xs = tl.load(x + base + earlier[:, None] * H * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(partial + lag, tl.sum(grad_out * xs))
    tl.store(dx + base + rows[:, None] * H * D + cols[None, :], acc.to(dx.dtype.element_ty), mask=here)
