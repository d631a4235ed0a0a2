"""Triton kernels of decayed attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

The sequence is cut into chunks of ``BT`` positions and every chunk into sub-blocks of ``BC``
positions. ``c[t, k]`` is the cumulative log decay from the start of the chunk up to ``t``
(inclusive); it is ``<= 0`` and does not increase along the chunk, and positions past ``T`` keep
the value of the last position, so a padded tail changes nothing. Every decay between two
positions ``s <= t`` is ``exp(c[t] - c[s])``, and every ``exp`` in these kernels is taken of a
number ``<= 0``: a pair of sub-blocks ``I > J`` goes through a reference position ``m`` between
them, ``exp(c[t] - c[s]) = exp(c[t] - c[m]) exp(c[m] - c[s])``, and pairs inside one sub-block are
summed explicitly with the exponent masked before ``exp``.

Layouts (all contiguous): ``q, k [B, T, H, K]``; ``v, o [B, T, H, V]``; ``c [B, Tp, H, K]`` float32
with ``Tp = NT * BT`` for a decay per token, or the constant log decay ``g [H, K]`` from which
``c`` is computed in registers (``CONST``); chunk states ``[B, H, NT, K, V]`` float32 and boundary
states ``[B, H, K, V]`` float32. Programs see one ``(batch, head)`` pair each, given by the last
grid axis as ``b * H + h``.
"""

import triton
import triton.language as tl

# Integer arguments that change with the sequence length: not specialised, so that a new length
# does not compile the kernels again.
SEQUENCE_ARGS = ["T", "Tp", "NT"]


@triton.jit
def _tile(ptr, rows, cols, row_stride, n_rows, n_cols):
    """Load ``ptr[rows, cols]`` as a float32 ``[R, C]`` tile, zero where ``rows >= n_rows`` or ``cols >= n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row(ptr, row, cols, row_stride, n_rows, n_cols):
    """Load ``ptr[row, cols]`` as a float32 ``[C]`` vector, zero where ``row >= n_rows`` or ``cols >= n_cols``."""
    width = tl.where(row < n_rows, n_cols, 0)  # one comparison: the interpreter mishandles scalar & vector
    return tl.load(ptr + row * row_stride + cols, mask=cols < width, other=0.0).to(tl.float32)


@triton.jit
def _put(ptr, value, rows, cols, row_stride, n_rows, n_cols):
    """Store the ``[R, C]`` tile ``value`` at ``ptr[rows, cols]`` in the pointer's dtype, inside the bounds."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decay_tile(c, g, t0, rows, cols, T, K, row_stride, CONST: tl.constexpr):
    """In-chunk cumulative log decay ``c[t0 + rows, cols]``, float32 ``[R, C]`` (zero for ``cols >= K``).

    ``c`` points at the ``(b, h)`` rows of the ``[B, Tp, H, K]`` buffer and ``g`` at the ``[K]`` row of a
    constant decay; with ``CONST`` the value is ``(steps since the chunk start) * g``.
    """
    if CONST:
        log_gamma = tl.load(g + cols, mask=cols < K, other=0.0).to(tl.float32)
        steps = tl.minimum(t0 + rows, T - 1) - t0 + 1
        out = steps.to(tl.float32)[:, None] * log_gamma[None, :]
    else:
        out = tl.load(c + (t0 + rows)[:, None] * row_stride + cols[None, :], mask=cols[None, :] < K, other=0.0)
    return out


@triton.jit
def _decay_row(c, g, t0, row, cols, T, K, row_stride, CONST: tl.constexpr):
    """In-chunk cumulative log decay ``c[t0 + row, cols]`` of one position, float32 ``[C]``."""
    if CONST:
        log_gamma = tl.load(g + cols, mask=cols < K, other=0.0).to(tl.float32)
        steps = tl.minimum(t0 + row, T - 1) - t0 + 1
        out = steps.to(tl.float32) * log_gamma
    else:
        out = tl.load(c + (t0 + row) * row_stride + cols, mask=cols < K, other=0.0)
    return out


@triton.jit
def _block_decay(c_blk, BC: tl.constexpr):
    """Decays between the positions of one sub-block: ``d[a, b, k] = exp(c[a, k] - c[b, k])`` for ``b <= a``, else 0.

    Args:
        c_blk: ``[BC, C]`` in-chunk cumulative log decay of the sub-block's positions.

    Returns:
        ``d`` of shape ``[BC, BC, C]``, float32; the exponent is masked before ``exp``.
    """
    pos = tl.arange(0, BC)
    keep = (pos[:, None] >= pos[None, :])[:, :, None]  # [BC, BC, 1]
    return tl.where(keep, tl.exp(tl.where(keep, c_blk[:, None, :] - c_blk[None, :, :], 0.0)), 0.0)


@triton.jit
def _block_scores(q_blk, k_blk, c_blk, BC: tl.constexpr):
    """In-block scores ``s[i, j] = sum_k q[i, k] k[j, k] exp(c[i, k] - c[j, k])`` for ``j <= i``, else 0 ``[BC, BC]``.

    Args:
        q_blk: ``[BC, C]`` queries of one sub-block.
        k_blk: ``[BC, C]`` keys of the same positions.
        c_blk: ``[BC, C]`` their in-chunk cumulative log decay.
    """
    return tl.sum(q_blk[:, None, :] * k_blk[None, :, :] * _block_decay(c_blk, BC), axis=2)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_cumsum_kernel(g, c, T, Tp, H, K, BT: tl.constexpr, BK: tl.constexpr):
    """``c = cumsum(g)`` inside every chunk, for a decay per token; positions past ``T`` repeat the last value.

    Grid ``(NT, B * H, NK)``. ``g [B, T, H, K]`` any float dtype, ``c [B, Tp, H, K]`` float32.
    """
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = tl.cast(i_n, tl.int64) * BT
    rows = t0 + tl.arange(0, BT)
    cols = i_k * BK + tl.arange(0, BK)
    b = tl.cast(i_b, tl.int64)
    log_gamma = _tile(g + (b * T * H + i_h) * K, rows, cols, H * K, T, K)  # [BT, BK], zero past T
    _put(c + (b * Tp * H + i_h) * K, tl.cumsum(log_gamma, axis=0), rows, cols, H * K, Tp, K)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_states_kernel(
    k,
    v,
    c,
    g,
    h0,
    h,
    ht,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CONST: tl.constexpr,
    HAS_H0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The state entering every chunk and the final state, one ``[BK, BV]`` tile of them per program.

    Grid ``(NK, NV, B * H)``. Writes ``h [B, H, NT, K, V]`` (``h[:, :, n]`` enters chunk ``n``) and
    ``ht [B, H, K, V]``; ``h0 [B, H, K, V]`` is read when ``HAS_H0``.
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b, bh = tl.cast(i_b, tl.int64), tl.cast(i_bh, tl.int64)
    k += (b * T * H + i_h) * K
    v += (b * T * H + i_h) * V
    c += (b * Tp * H + i_h) * K
    g += i_h * K
    rows = tl.arange(0, BT)
    cols_k = i_k * BK + tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    if HAS_H0:
        state = _tile(h0 + bh * K * V, cols_k, cols_v, V, K, V)  # [BK, BV]
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(NT):
        t0 = tl.cast(n, tl.int64) * BT
        _put(h + (bh * NT + n) * K * V, state, cols_k, cols_v, V, K, V)
        k_c = _tile(k, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
        v_c = _tile(v, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
        c_c = _decay_tile(c, g, t0, rows, cols_k, T, K, H * K, CONST)  # [BT, BK]
        c_last = _decay_row(c, g, t0, BT - 1, cols_k, T, K, H * K, CONST)  # [BK]
        k_to_end = k_c * tl.exp(c_last[None, :] - c_c)  # [BT, BK]
        state = state * tl.exp(c_last)[:, None] + tl.dot(tl.trans(k_to_end), v_c, input_precision=PRECISION)
    _put(ht + bh * K * V, state, cols_k, cols_v, V, K, V)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_output_kernel(
    q,
    k,
    v,
    c,
    g,
    h,
    o,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CONST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``o`` of one chunk and one ``BV`` tile of the values: the entering state plus the chunk's own keys.

    Grid ``(NV, NT, B * H)``; loops over ``K`` in tiles of ``BK``. Reads the chunk states ``h``.
    """
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b, bh = tl.cast(i_b, tl.int64), tl.cast(i_bh, tl.int64)
    q += (b * T * H + i_h) * K
    k += (b * T * H + i_h) * K
    v += (b * T * H + i_h) * V
    o += (b * T * H + i_h) * V
    c += (b * Tp * H + i_h) * K
    g += i_h * K
    h += (bh * NT + i_n) * K * V
    t0 = tl.cast(i_n, tl.int64) * BT
    rows = tl.arange(0, BT)
    sub = tl.arange(0, BC)
    cols_v = i_v * BV + tl.arange(0, BV)
    v_c = _tile(v, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
    for blk in range(BT // BC):
        rows_i = blk * BC + sub  # [BC], the sub-block's rows inside the chunk
        o_i = tl.zeros([BC, BV], dtype=tl.float32)
        a_before = tl.zeros([BC, BT], dtype=tl.float32)  # scores against earlier sub-blocks
        a_inside = tl.zeros([BC, BC], dtype=tl.float32)  # scores inside the sub-block
        for k0 in range(0, K, BK):
            cols_k = k0 + tl.arange(0, BK)
            q_i = _tile(q, t0 + rows_i, cols_k, H * K, T, K)  # [BC, BK]
            c_i = _decay_tile(c, g, t0, rows_i, cols_k, T, K, H * K, CONST)  # [BC, BK]
            state = _tile(h, cols_k, cols_v, V, K, V)  # [BK, BV]
            o_i += tl.dot(q_i * tl.exp(c_i), state, input_precision=PRECISION)
            if blk > 0:
                # Reference: the last row before the sub-block, between every earlier key and these queries.
                c_m = _decay_row(c, g, t0, blk * BC - 1, cols_k, T, K, H * K, CONST)  # [BK]
                before = (rows < blk * BC)[:, None]  # [BT, 1]
                k_c = _tile(k, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
                c_c = _decay_tile(c, g, t0, rows, cols_k, T, K, H * K, CONST)  # [BT, BK]
                k_to_m = tl.where(before, k_c * tl.exp(tl.where(before, c_m[None, :] - c_c, 0.0)), 0.0)
                q_from_m = q_i * tl.exp(c_i - c_m[None, :])  # [BC, BK]
                a_before += tl.dot(q_from_m, tl.trans(k_to_m), input_precision=PRECISION)
            k_i = _tile(k, t0 + rows_i, cols_k, H * K, T, K)  # [BC, BK]
            a_inside += _block_scores(q_i, k_i, c_i, BC)
        v_i = _tile(v, t0 + rows_i, cols_v, H * V, T, V)  # [BC, BV]
        o_i += tl.dot(a_inside, v_i, input_precision=PRECISION)
        o_i += tl.dot(a_before, v_c, input_precision=PRECISION)
        _put(o, o_i * scale, t0 + rows_i, cols_v, H * V, T, V)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dstates_kernel(
    q,
    c,
    g,
    do,
    dht,
    dh,
    dh0,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CONST: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The gradient of the state leaving every chunk, from the last chunk back to the first.

    Grid ``(NK, NV, B * H)``. Writes ``dh [B, H, NT, K, V]`` (the gradient of the state leaving chunk
    ``n``) and ``dh0 [B, H, K, V]``; ``dht`` (gradient of the final state) is read when ``HAS_DHT``.
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b, bh = tl.cast(i_b, tl.int64), tl.cast(i_bh, tl.int64)
    q += (b * T * H + i_h) * K
    do += (b * T * H + i_h) * V
    c += (b * Tp * H + i_h) * K
    g += i_h * K
    rows = tl.arange(0, BT)
    cols_k = i_k * BK + tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    if HAS_DHT:
        dstate = _tile(dht + bh * K * V, cols_k, cols_v, V, K, V)  # [BK, BV]
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(NT):
        n = NT - 1 - i
        t0 = tl.cast(n, tl.int64) * BT
        _put(dh + (bh * NT + n) * K * V, dstate, cols_k, cols_v, V, K, V)
        q_c = _tile(q, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
        do_c = _tile(do, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
        c_c = _decay_tile(c, g, t0, rows, cols_k, T, K, H * K, CONST)  # [BT, BK]
        c_last = _decay_row(c, g, t0, BT - 1, cols_k, T, K, H * K, CONST)  # [BK]
        q_from_start = q_c * tl.exp(c_c)  # [BT, BK]
        read = tl.dot(tl.trans(q_from_start), do_c, input_precision=PRECISION)  # [BK, BV]
        dstate = dstate * tl.exp(c_last)[:, None] + scale * read
    _put(dh0 + bh * K * V, dstate, cols_k, cols_v, V, K, V)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dv_kernel(
    q,
    k,
    c,
    g,
    do,
    dh,
    dv,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CONST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dv`` of one chunk and one ``BV`` tile: the chunk's later queries plus the leaving state's gradient.

    Grid ``(NV, NT, B * H)``; loops over ``K`` in tiles of ``BK``. Reads ``dh`` from ``chunk_dstates_kernel``.
    """
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b, bh = tl.cast(i_b, tl.int64), tl.cast(i_bh, tl.int64)
    q += (b * T * H + i_h) * K
    k += (b * T * H + i_h) * K
    do += (b * T * H + i_h) * V
    dv += (b * T * H + i_h) * V
    c += (b * Tp * H + i_h) * K
    g += i_h * K
    dh += (bh * NT + i_n) * K * V
    t0 = tl.cast(i_n, tl.int64) * BT
    rows = tl.arange(0, BT)
    sub = tl.arange(0, BC)
    cols_v = i_v * BV + tl.arange(0, BV)
    do_c = _tile(do, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
    for blk in range(BT // BC):
        rows_j = blk * BC + sub  # [BC], the sub-block's rows (keys) inside the chunk
        dv_j = tl.zeros([BC, BV], dtype=tl.float32)
        at_after = tl.zeros([BC, BT], dtype=tl.float32)  # transposed scores against later sub-blocks
        at_inside = tl.zeros([BC, BC], dtype=tl.float32)  # transposed scores inside the sub-block
        for k0 in range(0, K, BK):
            cols_k = k0 + tl.arange(0, BK)
            k_j = _tile(k, t0 + rows_j, cols_k, H * K, T, K)  # [BC, BK]
            c_j = _decay_tile(c, g, t0, rows_j, cols_k, T, K, H * K, CONST)  # [BC, BK]
            c_last = _decay_row(c, g, t0, BT - 1, cols_k, T, K, H * K, CONST)  # [BK]
            dstate = _tile(dh, cols_k, cols_v, V, K, V)  # [BK, BV]
            dv_j += tl.dot(k_j * tl.exp(c_last[None, :] - c_j), dstate, input_precision=PRECISION)
            if blk < BT // BC - 1:
                # Reference: the sub-block's last row, between these keys and every later query.
                c_m = _decay_row(c, g, t0, blk * BC + BC - 1, cols_k, T, K, H * K, CONST)  # [BK]
                after = (rows >= (blk + 1) * BC)[:, None]  # [BT, 1]
                q_c = _tile(q, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
                c_c = _decay_tile(c, g, t0, rows, cols_k, T, K, H * K, CONST)  # [BT, BK]
                q_from_m = tl.where(after, q_c * tl.exp(tl.where(after, c_c - c_m[None, :], 0.0)), 0.0)
                k_to_m = k_j * tl.exp(c_m[None, :] - c_j)  # [BC, BK]
                at_after += tl.dot(k_to_m, tl.trans(q_from_m), input_precision=PRECISION)
            q_j = _tile(q, t0 + rows_j, cols_k, H * K, T, K)  # [BC, BK]
            at_inside += tl.trans(_block_scores(q_j, k_j, c_j, BC))
        do_j = _tile(do, t0 + rows_j, cols_v, H * V, T, V)  # [BC, BV]
        dv_j += scale * tl.dot(at_inside, do_j, input_precision=PRECISION)
        dv_j += scale * tl.dot(at_after, do_c, input_precision=PRECISION)
        _put(dv, dv_j, t0 + rows_j, cols_v, H * V, T, V)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dqk_kernel(
    q,
    k,
    v,
    c,
    g,
    h,
    do,
    dh,
    dq,
    dk,
    dg,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CONST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dq``, ``dk`` and the per-token ``dg`` of one chunk and one ``BK`` tile of the channels.

    Grid ``(NK, NT, B * H)``; loops over ``V`` in tiles of ``BV``. With ``dA[i, j] = scale do_i . v_j``,
    the gradient of the in-chunk cumulative decay is ``dc_t = q_t dq_t - k_t dk_t`` plus, at the last
    row, ``sum_v dS_out * S_out``; ``dg`` is its reverse cumulative sum over the chunk. The lag-0 terms
    ``dA[t, t] q_t k_t`` cancel exactly in it, so they are left out, and the leaving state is split
    into the decayed entering state and the keys written before ``t``::

        dg_t = sum_{i >= t} (q_i dq'_i - k_i dk'_i) + sum_{j < t} k_j dk^S_j + exp(c_last) sum_v dS_out S_in

    where ``dq'`` and ``dk'`` hold no lag-0 and (for ``dk'``) no state term, and ``dk^S`` is the
    gradient of a key through the leaving state. Nothing large cancels, even for decays near 0.
    """
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    b, bh = tl.cast(i_b, tl.int64), tl.cast(i_bh, tl.int64)
    q += (b * T * H + i_h) * K
    k += (b * T * H + i_h) * K
    dq += (b * T * H + i_h) * K
    dk += (b * T * H + i_h) * K
    dg += (b * T * H + i_h) * K
    v += (b * T * H + i_h) * V
    do += (b * T * H + i_h) * V
    c += (b * Tp * H + i_h) * K
    g += i_h * K
    h += (bh * NT + i_n) * K * V
    dh += (bh * NT + i_n) * K * V
    t0 = tl.cast(i_n, tl.int64) * BT
    rows = tl.arange(0, BT)
    sub = tl.arange(0, BC)
    cols_k = i_k * BK + tl.arange(0, BK)
    c_last = _decay_row(c, g, t0, BT - 1, cols_k, T, K, H * K, CONST)  # [BK]

    # Per key, its gradient through the leaving state times the key; and the entering state's share.
    through_state = tl.zeros([BT, BK], dtype=tl.float32)
    entering = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        v_c = _tile(v, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
        state = _tile(h, cols_k, cols_v, V, K, V)  # [BK, BV]
        dstate = _tile(dh, cols_k, cols_v, V, K, V)  # [BK, BV]
        through_state += tl.dot(v_c, tl.trans(dstate), input_precision=PRECISION)
        entering += tl.sum(state * dstate, axis=1)
    k_c = _tile(k, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
    c_c = _decay_tile(c, g, t0, rows, cols_k, T, K, H * K, CONST)  # [BT, BK]
    y = k_c * tl.exp(c_last[None, :] - c_c) * through_state  # [BT, BK]
    entering = entering * tl.exp(c_last)

    suffix = tl.zeros([BK], dtype=tl.float32)  # sum of q dq' - k dk' over the later sub-blocks
    for step in range(BT // BC):
        blk = BT // BC - 1 - step
        rows_i = blk * BC + sub  # [BC], the sub-block's rows inside the chunk
        q_i = _tile(q, t0 + rows_i, cols_k, H * K, T, K)  # [BC, BK]
        k_i = _tile(k, t0 + rows_i, cols_k, H * K, T, K)  # [BC, BK]
        c_i = _decay_tile(c, g, t0, rows_i, cols_k, T, K, H * K, CONST)  # [BC, BK]
        dq_i = tl.zeros([BC, BK], dtype=tl.float32)
        dk_state = tl.zeros([BC, BK], dtype=tl.float32)
        da_rows = tl.zeros([BC, BT], dtype=tl.float32)  # dA[i, :] for the sub-block's queries i
        da_cols = tl.zeros([BC, BT], dtype=tl.float32)  # dA[:, j]^T for the sub-block's keys j
        da_inside = tl.zeros([BC, BC], dtype=tl.float32)  # dA inside the sub-block
        for v0 in range(0, V, BV):
            cols_v = v0 + tl.arange(0, BV)
            do_i = _tile(do, t0 + rows_i, cols_v, H * V, T, V)  # [BC, BV]
            v_i = _tile(v, t0 + rows_i, cols_v, H * V, T, V)  # [BC, BV]
            do_c = _tile(do, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
            v_c = _tile(v, t0 + rows, cols_v, H * V, T, V)  # [BT, BV]
            state = _tile(h, cols_k, cols_v, V, K, V)  # [BK, BV]
            dstate = _tile(dh, cols_k, cols_v, V, K, V)  # [BK, BV]
            dq_i += tl.dot(do_i, tl.trans(state), input_precision=PRECISION)
            dk_state += tl.dot(v_i, tl.trans(dstate), input_precision=PRECISION)
            da_rows += tl.dot(do_i, tl.trans(v_c), input_precision=PRECISION)
            da_cols += tl.dot(v_i, tl.trans(do_c), input_precision=PRECISION)
            da_inside += tl.dot(do_i, tl.trans(v_i), input_precision=PRECISION)
        dq_i = dq_i * scale * tl.exp(c_i)
        dk_state = dk_state * tl.exp(c_last[None, :] - c_i)
        da_rows = da_rows * scale
        da_cols = da_cols * scale
        dk_i = tl.zeros([BC, BK], dtype=tl.float32)
        if blk > 0:
            # Earlier keys, through the last row before the sub-block (da_rows meets zero rows past it).
            c_m = _decay_row(c, g, t0, blk * BC - 1, cols_k, T, K, H * K, CONST)  # [BK]
            before = (rows < blk * BC)[:, None]  # [BT, 1]
            k_to_m = tl.where(before, k_c * tl.exp(tl.where(before, c_m[None, :] - c_c, 0.0)), 0.0)
            dq_i += tl.exp(c_i - c_m[None, :]) * tl.dot(da_rows, k_to_m, input_precision=PRECISION)
        if blk < BT // BC - 1:
            # Later queries, through the sub-block's last row.
            c_m = _decay_row(c, g, t0, blk * BC + BC - 1, cols_k, T, K, H * K, CONST)  # [BK]
            after = (rows >= (blk + 1) * BC)[:, None]  # [BT, 1]
            q_c = _tile(q, t0 + rows, cols_k, H * K, T, K)  # [BT, BK]
            q_from_m = tl.where(after, q_c * tl.exp(tl.where(after, c_c - c_m[None, :], 0.0)), 0.0)
            dk_i += tl.exp(c_m[None, :] - c_i) * tl.dot(da_cols, q_from_m, input_precision=PRECISION)
        # Pairs inside the sub-block, lag 0 left out (it is added to dq and dk below, not to dg).
        sub_pairs = sub[:, None] - sub[None, :]  # [BC, BC], i - j
        da_diag = tl.sum(tl.where(sub_pairs == 0, da_inside * scale, 0.0), axis=1)  # [BC], dA[i, i]
        da_below = tl.where(sub_pairs > 0, da_inside * scale, 0.0)[:, :, None]  # [BC, BC, 1], dA[i, j] for j < i
        decay = _block_decay(c_i, BC)  # [BC, BC, BK]
        dq_i += tl.sum(da_below * k_i[None, :, :] * decay, axis=1)
        dk_i += tl.sum(da_below * q_i[:, None, :] * decay, axis=0)

        x = q_i * dq_i - k_i * dk_i  # [BC, BK]
        keys_before = tl.where(rows[None, :] < rows_i[:, None], 1.0, 0.0)  # [BC, BT]
        y_before = tl.dot(keys_before, y, input_precision="ieee")  # [BC, BK], exclusive prefix sums of y
        dg_i = tl.cumsum(x, axis=0, reverse=True) + suffix[None, :] + y_before + entering[None, :]
        suffix += tl.sum(x, axis=0)
        _put(dq, dq_i + da_diag[:, None] * k_i, t0 + rows_i, cols_k, H * K, T, K)
        _put(dk, dk_i + dk_state + da_diag[:, None] * q_i, t0 + rows_i, cols_k, H * K, T, K)
        _put(dg, dg_i, t0 + rows_i, cols_k, H * K, T, K)
