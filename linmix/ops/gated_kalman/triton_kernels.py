"""Triton kernels of Gated KalmaNet in chunked form (spec/gated_kalmanet.md §3; ``chunk.py`` holds the same algebra).

Per head, a chunk of ``BT`` positions is entered with the Gram state ``H_c [K, K]`` and the key-value
state ``U_c [K, V]``; keys and values arrive scaled by their strength. ``G_t`` is the log decay from the
chunk start to position ``t`` (inclusive), ``M_tj = exp(G_t - G_j)`` for ``j <= t`` (0 above), every
exponent a sum over its own span (``_decay_mask``), and ``to_end_j = exp(G_C - G_j)``. Then:

* ``chunk_states_kernel`` (sequential over the chunks): ``S <- e^{G_C} S + (to_end o K)^T Y``, with
  ``Y = K`` the Gram states ``H_c``, with ``Y = V`` the key-value states ``U_c``;
* ``chunk_solve_kernel``: the norms ``F_t = ||H_t||_F`` of every row in closed form,
  ``F_t^2 = e^{2 G_t} ||H_c||_F^2 + 2 e^{G_t} sum_j M_tj k_j^T H_c k_j + sum_{j,j'} M_tj M_tj' (k_j . k_j')^2``,
  then ``iters`` Chebyshev steps on ``(h A_t) x = h b`` for all rows at once (``linmix.ops.gated_kalman.solve``),
  ``A_t = H_t + ridge F_t I``, the product ``X H_t`` (row by row) as ``e^G o (X H_c^T) + ((X K^T) o M) K``:
  three matrix products per step, everything on chip; ``H_t`` is never formed. The backward runs the same
  kernel on the cotangent ``dx`` with the saved ``F`` (the Chebyshev map is a symmetric matrix), giving
  ``w = A^{-1} dx`` and the ridge's weight ``u_t = ridge (w_t . x_t) / (2 F_t)``;
* ``chunk_output_kernel``: the readout ``o = scale (e^G o (Q U_c) + ((Q K^T) o M) V)``.

Backward (implicit differentiation, spec §2 "Backward"): ``x`` is the exact solution, so the solve adds
``L = -sum_t (w_t^T H_t x_t + u_t ||H_t||_F^2)`` to the loss with ``w`` and ``u`` held fixed, and its
gradient to the start states, keys and decays follows the closed forms above:

* ``chunk_dstates_kernel`` (last chunk first): the gradient ``dS`` of the state leaving every chunk and of
  the initial state, ``dS_enter = e^{G_C} dS_leave + scale (e^G o A)^T B``; for the readout ``A = Q``,
  ``B = dO``; for the solve (``GRAM``) ``A = W``, ``B = X``, ``scale = -1``, plus
  ``-2 sigma H_c - 2 (r o K)^T K`` with ``sigma = sum_t u_t e^{2 G_t}`` and ``r_j = sum_t u_t e^{G_t} M_tj``;
* ``chunk_solve_grads_kernel``: the solve's ``dk`` and ``dg``,
  ``dK = -(M o S_x)^T W - (M o S_w)^T X - 4 r o (K H_c) - 4 (N o S) K + to_end o (K (E + E^T))`` with
  ``S = K K^T``, ``S_w = W K^T``, ``S_x = X K^T``, ``N = M^T diag(u) M`` and ``E`` the gradient of the
  state leaving the chunk;
* ``chunk_readout_grads_kernel``: the readout's ``dq``, ``dk``, ``dv`` and ``dg``.

The decay gradient: every term is a function of spans, ``exp(G_t)`` (positions ``1..t``), ``M_tj``
(``j+1..t``), ``to_end_j`` (``j+1..C``) and ``exp(G_C)`` (the chunk); ``dg_i`` sums the derivatives of
the spans that hold ``i``: ``sum_{t >= i} a_t + sum_{j < i} y_j + last + sum_{t >= i} sum_{j < i} Z_tj``
(``_decay_gradient``), each term summed where it arises, so nothing large cancels.

Matrix products take float32 operands at ``PRECISION`` (``ieee``, or ``tf32`` for 16-bit inputs). The
solve and the readout's output hold all ``K`` channels of a head in one tile; the per-chunk gradient
kernels run over tiles of ``K`` (and ``V``), so that their operands fit in shared memory.
Layouts (contiguous): ``q, k, w, x [B, T, H, K]``; ``v, o [B, T, H, V]``; ``g, F, u [B, T, H]``
float32; chunk states ``[NC, H, K, Y]`` float32 over all ``NC`` chunks of the batch; boundary states
``[N, H, K, Y]`` float32. Positions are rows of the flattened ``[B * T, H, ...]`` tensors: without
``IS_VARLEN`` sequence ``b`` is rows ``[b T, (b + 1) T)`` with ``NT`` chunks; with it (``B = 1``)
``cu_seqlens`` bounds the sequences, ``chunk_indices [NC, 2]`` gives every chunk's sequence and index
in it and ``chunk_offsets [N]`` every sequence's first chunk.
"""

import triton
import triton.language as tl

from linmix.ops.common.triton_kernels import (
    chunk_bounds,
    load_tile,
    load_vec,
    sequence_bounds,
    store_tile,
    store_vec,
)

# Integer arguments that change with the sequence lengths: not specialised (no recompilation per length).
SEQUENCE_ARGS = ["T", "NT"]


# ---- addressing ---------------------------------------------------------------------------------------


@triton.jit
def _load(ptr, row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """``load_tile`` as float32."""
    return load_tile(ptr, row0, col0, row_stride, row_end, n_cols, R, C).to(tl.float32)


@triton.jit
def _load_transposed(ptr, row0, col0, n, R: tl.constexpr, C: tl.constexpr):
    """``A^T[row0:row0 + R, col0:col0 + C]`` of the row-major ``[n, n]`` matrix ``A`` at ``ptr``: the tile
    ``[i, j] = A[col0 + j, row0 + i]`` as float32, zero past ``n``."""
    rows = row0 + tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    mask = (rows[:, None] < n) & (cols[None, :] < n)
    return tl.load(ptr + rows[:, None] + cols[None, :] * n, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """``a @ b`` of float32 operands at ``PRECISION``, float32 result."""
    return tl.dot(a, b, input_precision=PRECISION)


# ---- decays -------------------------------------------------------------------------------------------


@triton.jit
def _decay_ends(g, t0, eos, H, BT: tl.constexpr):
    """A chunk's scalar log decays ``g [BT]`` (0 past ``eos``): ``G`` (from the chunk start, inclusive),
    the chunk's total ``G_C`` and ``to_end = exp(G_C - G)`` ``[BT]``."""
    g_c = load_vec(g, t0, H, eos, BT)
    rows = tl.arange(0, BT)
    suffix = tl.sum(tl.where(rows[:, None] > rows[None, :], g_c[:, None], 0.0), axis=0)  # [j]: sum_{r > j} g_r
    return tl.cumsum(g_c, axis=0), tl.sum(g_c, axis=0), tl.exp(tl.minimum(suffix, 0.0))


@triton.jit
def _decay_mask(g, t0, eos, H, BT: tl.constexpr):
    """``M [BT, BT]``: ``exp(G_t - G_j)`` for ``j <= t``, 0 above, each exponent summed along its own span
    (a cumulative sum down every column of the steps after ``j``), so it is exact to that span's rounding."""
    g_c = load_vec(g, t0, H, eos, BT)
    rows = tl.arange(0, BT)
    steps = tl.where(rows[:, None] > rows[None, :], g_c[:, None], 0.0)
    return tl.where(rows[:, None] >= rows[None, :], tl.exp(tl.minimum(tl.cumsum(steps, axis=0), 0.0)), 0.0)


@triton.jit
def _decay_gradient(from_start, pairs, to_end, last, BT: tl.constexpr):
    """``dg [BT]`` from the derivatives of a chunk's terms by the log decay of their spans (module docstring).

    Args:
        from_start: ``a [BT]``, by the span ``1..t`` of ``exp(G_t)``.
        pairs: ``Z [BT, BT]``, by the span ``j+1..t`` of ``M_tj`` (lower triangle; the diagonal has no span).
        to_end: ``y [BT]``, by the span ``j+1..C`` of ``exp(G_C - G_j)``.
        last: by the whole chunk's ``exp(G_C)`` (a scalar).
    """
    rows = tl.arange(0, BT)
    before = tl.cumsum(pairs, axis=1) - pairs  # [t, i]: sum_{j < i} Z_tj
    inside = tl.sum(tl.where(rows[:, None] >= rows[None, :], before, 0.0), axis=0)  # [i]: sum_{t >= i}
    return tl.cumsum(from_start, axis=0, reverse=True) + (tl.cumsum(to_end, axis=0) - to_end) + inside + last


# ---- forward ------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_states_kernel(
    k, y, g, s0, states, final, cu_seqlens, chunk_offsets, T, NT, H, K, Y,
    BT: tl.constexpr, BK: tl.constexpr, BY: tl.constexpr, HAS_S0: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The state ``S [K, Y]`` entering every chunk and after the last, one ``[BK, BY]`` tile per program.

    ``S <- e^{G_C} S + (to_end o K)^T Y`` chunk by chunk. Grid ``(NK, NY, N * H)``. ``k [B, T, H, K]``,
    ``y [B, T, H, Y]``, ``g [B, T, H]``; reads ``s0 [N, H, K, Y]`` with ``HAS_S0``; writes
    ``states [NC, H, K, Y]`` and ``final [N, H, K, Y]``.
    """
    i_k, i_y, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    k += i_h * K
    y += i_h * Y
    g += i_h
    ck0, cy0 = i_k * BK, i_y * BY
    boundary = tl.cast(i_sh, tl.int64) * K * Y
    if HAS_S0:
        state = _load(s0 + boundary, ck0, cy0, Y, K, Y, BK, BY)
    else:
        state = tl.zeros([BK, BY], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        store_tile(states + ((n0 + i) * H + i_h) * K * Y, state, ck0, cy0, Y, K, Y, BK, BY)
        _, total, to_end = _decay_ends(g, t0, eos, H, BT)
        k_c = _load(k, t0, ck0, H * K, eos, K, BT, BK) * to_end[:, None]  # [BT, BK]
        y_c = _load(y, t0, cy0, H * Y, eos, Y, BT, BY)  # [BT, BY]
        state = state * tl.exp(total) + _mm(tl.trans(k_c), y_c, PRECISION)
    store_tile(final + boundary, state, ck0, cy0, Y, K, Y, BK, BY)


@triton.jit(do_not_specialize=SEQUENCE_ARGS + ["iters"])
def chunk_solve_kernel(
    rhs, k, g, hc, norms, out, x, u, ridge, floor_sq, quarter_rho_sq, iters, cu_seqlens, chunk_indices, T, NT,
    H, K, BT: tl.constexpr, BK: tl.constexpr, BACKWARD: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``A_t^{-1} b_t`` by Chebyshev for every row of one chunk and head. Grid ``(NC, H)``; ``BK >= K``.

    Forward: ``b = rhs`` (the queries); computes and writes the norms ``F = max(||H_t||_F, floor)``
    (``norms [B, T, H]``) and ``out = x``. With ``BACKWARD``: ``b = rhs`` (the cotangent ``dx``), reads
    ``F``, writes ``out = w`` and ``u = ridge (w . x) / (2 F)`` (0 where ``F`` is at the floor, whose
    gradient is 0), reading the forward's ``x``. ``hc [NC, H, K, K]``; ``quarter_rho_sq = rho^2 / 4``.
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    rhs += i_h * K
    k += i_h * K
    out += i_h * K
    x += i_h * K
    g += i_h
    norms += i_h
    u += i_h
    hc += (tl.cast(i_n, tl.int64) * H + i_h) * K * K
    k_c = _load(k, t0, 0, H * K, eos, K, BT, BK)  # [BT, BK]
    G, _, _ = _decay_ends(g, t0, eos, H, BT)
    from_start = tl.exp(G)  # [BT]
    mask = _decay_mask(g, t0, eos, H, BT)  # [BT, BT]
    h_t = _load_transposed(hc, 0, 0, K, BK, BK)  # [BK, BK]: H_c^T (X H_c^T gives H_c x_t row by row)
    if BACKWARD:
        rows = tl.arange(0, BT)
        F = tl.where(rows < eos - t0, load_vec(norms, t0, H, eos, BT), 1.0)  # [BT], 1 on rows past the end
    else:
        gram = _mm(k_c, tl.trans(k_c), PRECISION)  # [BT, BT]
        quad = tl.sum(_mm(k_c, h_t, PRECISION) * k_c, axis=1)  # [BT]: k_j^T H_c k_j
        squared = (from_start * from_start * tl.sum(tl.sum(h_t * h_t, axis=1), axis=0)
                   + 2.0 * from_start * tl.sum(mask * quad[None, :], axis=1)
                   + tl.sum(mask * _mm(mask, gram * gram, PRECISION), axis=1))
        F = tl.sqrt(tl.maximum(squared, floor_sq))
        store_vec(norms, F, t0, H, eos, BT)
    h = (2.0 / (1.0 + 2.0 * ridge)) / F  # [BT], the step 2 / (L + mu)
    shift = 2.0 * ridge / (1.0 + 2.0 * ridge)  # h * lambda
    b = h[:, None] * _load(rhs, t0, 0, H * K, eos, K, BT, BK)  # [BT, BK]
    scaled_mask = h[:, None] * mask
    scaled_start = (h * from_start)[:, None]
    k_t = tl.trans(k_c)
    xi = b
    xi_prev = tl.zeros([BT, BK], dtype=tl.float32)
    omega = 2.0
    for _ in range(iters):  # tl.dot itself here: a call of a jit function costs a millisecond in the interpreter
        omega = 1.0 / (1.0 - quarter_rho_sq * omega)
        scores = tl.dot(xi, k_t, input_precision=PRECISION) * scaled_mask  # [BT, BT]
        residual = (scaled_start * tl.dot(xi, h_t, input_precision=PRECISION)
                    + tl.dot(scores, k_c, input_precision=PRECISION) + shift * xi - b)  # h A xi - h b
        xi, xi_prev = xi + (omega - 1.0) * (xi - xi_prev) - omega * residual, xi
    store_tile(out, xi, t0, 0, H * K, eos, K, BT, BK)
    if BACKWARD:
        x_c = _load(x, t0, 0, H * K, eos, K, BT, BK)
        weight = tl.where(F > tl.sqrt(floor_sq), ridge * tl.sum(xi * x_c, axis=1) / (2.0 * F), 0.0)
        store_vec(u, weight, t0, H, eos, BT)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_output_kernel(
    q, k, v, g, states, o, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """``o = scale (e^G o (Q U_c) + ((Q K^T) o M) V)`` for one chunk and ``BV`` tile.

    Grid ``(NV, NC, H)``; ``BK >= K``. ``states [NC, H, K, V]`` are the key-value states entering the chunks.
    """
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    k += i_h * K
    v += i_h * V
    o += i_h * V
    g += i_h
    states += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    cv0 = i_v * BV
    G, _, _ = _decay_ends(g, t0, eos, H, BT)
    q_c = _load(q, t0, 0, H * K, eos, K, BT, BK)  # [BT, BK]
    k_c = _load(k, t0, 0, H * K, eos, K, BT, BK)
    scores = _mm(q_c, tl.trans(k_c), PRECISION) * _decay_mask(g, t0, eos, H, BT)  # [BT, BT]: M o (Q K^T)
    out = (_mm(q_c * tl.exp(G)[:, None], _load(states, 0, cv0, V, K, V, BK, BV), PRECISION)
           + _mm(scores, _load(v, t0, cv0, H * V, eos, V, BT, BV), PRECISION))
    store_tile(o, out * scale, t0, cv0, H * V, eos, V, BT, BV)


# ---- backward -----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dstates_kernel(
    a, b, g, u, k, hc, dfinal, dstates, dinitial, scale, cu_seqlens, chunk_offsets, T, NT, H, K, Y,
    BT: tl.constexpr, BK: tl.constexpr, BY: tl.constexpr, GRAM: tl.constexpr, HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """The gradient of the state ``[K, Y]`` leaving every chunk, last chunk first, and of the initial state.

    Per chunk ``dS_enter = e^{G_C} dS_leave + scale (e^G o A)^T B`` (``a [B, T, H, K]``, ``b [B, T, H, Y]``);
    with ``GRAM`` (the solve's Gram state, ``Y = K``) also ``-2 sigma H_c - 2 (r o K)^T K`` from the
    ridge weights ``u [B, T, H]``, the keys and the chunk states ``hc [NC, H, K, K]`` (module docstring).
    Grid ``(NK, NY, N * H)``. Reads ``dfinal [N, H, K, Y]`` with ``HAS_DFINAL``; writes ``dstates
    [NC, H, K, Y]`` (leaving every chunk) and ``dinitial [N, H, K, Y]``.
    """
    i_k, i_y, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    a += i_h * K
    b += i_h * Y
    g += i_h
    if GRAM:
        u += i_h
        k += i_h * K
    ck0, cy0 = i_k * BK, i_y * BY
    boundary = tl.cast(i_sh, tl.int64) * K * Y
    if HAS_DFINAL:
        dstate = _load(dfinal + boundary, ck0, cy0, Y, K, Y, BK, BY)
    else:
        dstate = tl.zeros([BK, BY], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        t0 = bos + n * BT
        chunk_state = ((n0 + n) * H + i_h) * K * Y
        store_tile(dstates + chunk_state, dstate, ck0, cy0, Y, K, Y, BK, BY)
        G, total, _ = _decay_ends(g, t0, eos, H, BT)
        from_start = tl.exp(G)
        a_c = _load(a, t0, ck0, H * K, eos, K, BT, BK) * (scale * from_start)[:, None]  # [BT, BK]
        dstate = dstate * tl.exp(total) + _mm(tl.trans(a_c), _load(b, t0, cy0, H * Y, eos, Y, BT, BY), PRECISION)
        if GRAM:
            weight = load_vec(u, t0, H, eos, BT) * from_start  # [BT]: u_t e^{G_t}
            r = tl.sum(weight[:, None] * _decay_mask(g, t0, eos, H, BT), axis=0)  # [BT]
            sigma = tl.sum(weight * from_start, axis=0)
            k_rows = _load(k, t0, ck0, H * K, eos, K, BT, BK) * r[:, None]  # [BT, BK]
            k_cols = _load(k, t0, cy0, H * K, eos, K, BT, BY)  # [BT, BY]
            h_c = _load(hc + chunk_state, ck0, cy0, K, K, K, BK, BY)
            dstate -= 2.0 * (sigma * h_c + _mm(tl.trans(k_rows), k_cols, PRECISION))
    store_tile(dinitial + boundary, dstate, ck0, cy0, Y, K, Y, BK, BY)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_solve_grads_kernel(
    k, g, w, x, u, hc, dstates, dk, dg, cu_seqlens, chunk_indices, T, NT, H, K,
    BT: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """The solve's ``dk`` and ``dg`` of one chunk and head (module docstring). Grid ``(NC, H)``; K in tiles of ``BK``.

    ``w = A^{-1} dx``, ``x`` and the ridge weights ``u`` as ``chunk_solve_kernel`` gives them; ``hc`` and
    ``dstates`` (the gradient of the Gram state leaving the chunk, ``E``) are ``[NC, H, K, K]``. The
    ``[BT, BT]`` products of the keys come first, summed over the key tiles; then every tile of ``dk``
    from the products with ``H_c`` and ``E`` over the key tiles. Writes ``dk [B, T, H, K]`` and
    ``dg [B, T, H]`` float32.
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    k += i_h * K
    w += i_h * K
    x += i_h * K
    dk += i_h * K
    g += i_h
    u += i_h
    dg += i_h
    chunk_state = (tl.cast(i_n, tl.int64) * H + i_h) * K * K
    hc += chunk_state
    dstates += chunk_state
    u_c = load_vec(u, t0, H, eos, BT)  # [BT]
    G, total, to_end = _decay_ends(g, t0, eos, H, BT)
    from_start = tl.exp(G)
    mask = _decay_mask(g, t0, eos, H, BT)  # [BT, BT]
    gram = tl.zeros([BT, BT], dtype=tl.float32)  # S = K K^T
    w_k = tl.zeros([BT, BT], dtype=tl.float32)  # W K^T
    x_k = tl.zeros([BT, BT], dtype=tl.float32)  # X K^T
    for c0 in range(0, K, BK):
        k_t = tl.trans(_load(k, t0, c0, H * K, eos, K, BT, BK))  # [BK, BT]
        gram += _mm(_load(k, t0, c0, H * K, eos, K, BT, BK), k_t, PRECISION)
        w_k += _mm(_load(w, t0, c0, H * K, eos, K, BT, BK), k_t, PRECISION)
        x_k += _mm(_load(x, t0, c0, H * K, eos, K, BT, BK), k_t, PRECISION)
    s_w = w_k * mask
    s_x = x_k * mask
    weight = u_c * from_start  # [BT]: u_t e^{G_t}
    r = tl.sum(weight[:, None] * mask, axis=0)  # [BT]: sum_t u_t e^{G_t} M_tj
    spread = _mm(tl.trans(mask), u_c[:, None] * mask, PRECISION) * gram  # [BT, BT]: N o S, N = M^T diag(u) M
    quad = tl.zeros([BT], dtype=tl.float32)  # k_j^T H_c k_j
    y_j = tl.zeros([BT], dtype=tl.float32)  # e^{G_C - G_j} k_j^T E k_j
    through_start = tl.zeros([BT], dtype=tl.float32)  # w_t^T H_c x_t
    norm_sq = tl.zeros([BK], dtype=tl.float32)  # ||H_c||_F^2 by rows of a tile
    through_end = tl.zeros([BK], dtype=tl.float32)  # <H_c, E> by rows of a tile
    for c0 in range(0, K, BK):
        k_h = tl.zeros([BT, BK], dtype=tl.float32)  # rows H_c k_j (H_c's symmetric part)
        k_e = tl.zeros([BT, BK], dtype=tl.float32)  # rows (E + E^T) k_j
        w_h = tl.zeros([BT, BK], dtype=tl.float32)  # rows H_c^T w_t
        for r0 in range(0, K, BK):
            k_r = _load(k, t0, r0, H * K, eos, K, BT, BK)
            h_rc = _load(hc, r0, c0, K, K, K, BK, BK)  # H_c[r0:, c0:]
            e_rc = _load(dstates, r0, c0, K, K, K, BK, BK)
            k_h += _mm(k_r, 0.5 * (h_rc + _load_transposed(hc, r0, c0, K, BK, BK)), PRECISION)
            k_e += _mm(k_r, e_rc + _load_transposed(dstates, r0, c0, K, BK, BK), PRECISION)
            w_h += _mm(_load(w, t0, r0, H * K, eos, K, BT, BK), h_rc, PRECISION)
            norm_sq += tl.sum(h_rc * h_rc, axis=1)
            through_end += tl.sum(h_rc * e_rc, axis=1)
        k_c = _load(k, t0, c0, H * K, eos, K, BT, BK)  # [BT, BK]
        w_c = _load(w, t0, c0, H * K, eos, K, BT, BK)
        x_c = _load(x, t0, c0, H * K, eos, K, BT, BK)
        quad += tl.sum(k_h * k_c, axis=1)
        y_j += to_end * 0.5 * tl.sum(k_e * k_c, axis=1)
        through_start += tl.sum(w_h * x_c, axis=1)
        d_k = (to_end[:, None] * k_e - 4.0 * r[:, None] * k_h
               - _mm(tl.trans(s_x), w_c, PRECISION) - _mm(tl.trans(s_w), x_c, PRECISION)
               - 4.0 * _mm(spread, k_c, PRECISION))
        store_tile(dk, d_k, t0, c0, H * K, eos, K, BT, BK)
    a_t = -from_start * through_start - 2.0 * weight * (from_start * tl.sum(norm_sq, axis=0)
                                                        + tl.sum(mask * quad[None, :], axis=1))
    pairs = -(s_w * x_k
              + 2.0 * weight[:, None] * mask * quad[None, :]
              + 2.0 * u_c[:, None] * mask * _mm(mask, gram * gram, PRECISION))
    last = tl.exp(total) * tl.sum(through_end, axis=0)
    store_vec(dg, _decay_gradient(a_t, pairs, y_j, last, BT), t0, H, eos, BT)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_readout_grads_kernel(
    q, k, v, g, states, dstates, do, dq, dk, dv, dg, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """The readout's ``dq``, ``dk``, ``dv`` and ``dg`` of one chunk and head. Grid ``(NC, H)``; K and V in
    tiles of ``BK`` and ``BV``.

    With ``E`` the gradient of ``U`` leaving the chunk (``dstates [NC, H, K, V]``):
    ``dQ = scale (e^G o (dO U_c^T) + (M o dO V^T) K)``, ``dK = scale (M o dO V^T)^T Q + to_end o (V E^T)``,
    ``dV = scale (M o Q K^T)^T dO + to_end o (K E)``. Writes ``dq, dk [B, T, H, K]``, ``dg [B, T, H]``
    float32 and ``dv [B, T, H, V]`` in its pointer's dtype.
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    k += i_h * K
    dq += i_h * K
    dk += i_h * K
    v += i_h * V
    do += i_h * V
    dv += i_h * V
    g += i_h
    dg += i_h
    chunk_state = (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    states += chunk_state
    dstates += chunk_state
    G, total, to_end = _decay_ends(g, t0, eos, H, BT)
    from_start = tl.exp(G)
    mask = _decay_mask(g, t0, eos, H, BT)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, K, BK):
        scores += _mm(_load(q, t0, c0, H * K, eos, K, BT, BK), tl.trans(_load(k, t0, c0, H * K, eos, K, BT, BK)),
                      PRECISION)
    scores = scores * mask  # [BT, BT]: M o (Q K^T)
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)  # dO V^T
    through = tl.zeros([BK], dtype=tl.float32)  # <U_c, E> by rows of a tile
    for v0 in range(0, V, BV):
        do_v = _load(do, t0, v0, H * V, eos, V, BT, BV)  # [BT, BV]
        d_scores += _mm(do_v, tl.trans(_load(v, t0, v0, H * V, eos, V, BT, BV)), PRECISION)
        k_e = tl.zeros([BT, BV], dtype=tl.float32)  # K E
        for c0 in range(0, K, BK):
            e_cv = _load(dstates, c0, v0, V, K, V, BK, BV)  # [BK, BV]
            k_e += _mm(_load(k, t0, c0, H * K, eos, K, BT, BK), e_cv, PRECISION)
            through += tl.sum(_load(states, c0, v0, V, K, V, BK, BV) * e_cv, axis=1)
        store_tile(dv, scale * _mm(tl.trans(scores), do_v, PRECISION) + to_end[:, None] * k_e, t0, v0, H * V, eos, V,
               BT, BV)
    d_masked = d_scores * mask
    a_t = tl.zeros([BT], dtype=tl.float32)
    y_j = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, K, BK):
        d_start = tl.zeros([BT, BK], dtype=tl.float32)  # dO U_c^T
        v_e = tl.zeros([BT, BK], dtype=tl.float32)  # V E^T
        for v0 in range(0, V, BV):
            d_start += _mm(_load(do, t0, v0, H * V, eos, V, BT, BV),
                           tl.trans(_load(states, c0, v0, V, K, V, BK, BV)), PRECISION)
            v_e += _mm(_load(v, t0, v0, H * V, eos, V, BT, BV), tl.trans(_load(dstates, c0, v0, V, K, V, BK, BV)),
                       PRECISION)
        q_c = _load(q, t0, c0, H * K, eos, K, BT, BK)  # [BT, BK]
        k_c = _load(k, t0, c0, H * K, eos, K, BT, BK)
        store_tile(dq, scale * (from_start[:, None] * d_start + _mm(d_masked, k_c, PRECISION)), t0, c0, H * K, eos, K,
               BT, BK)
        store_tile(dk, scale * _mm(tl.trans(d_masked), q_c, PRECISION) + to_end[:, None] * v_e, t0, c0, H * K, eos, K,
               BT, BK)
        a_t += scale * from_start * tl.sum(q_c * d_start, axis=1)
        y_j += to_end * tl.sum(k_c * v_e, axis=1)
    last = tl.exp(total) * tl.sum(through, axis=0)
    store_vec(dg, _decay_gradient(a_t, scale * scores * d_scores, y_j, last, BT), t0, H, eos, BT)
