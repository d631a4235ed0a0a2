"""Triton kernels of decayed attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

Every sequence is cut into chunks of ``BT`` positions and every chunk into sub-blocks of ``BC``
positions. ``c[t, k]`` is the cumulative log decay from the start of the chunk up to ``t``
(inclusive); it is ``<= 0`` and does not increase along the chunk, so the decay between two
positions ``s <= t`` of a chunk is ``exp(c[t] - c[s])`` with a non-positive exponent. A pair of
sub-blocks ``I > J`` goes through a reference row ``m`` between them,
``exp(c[t] - c[s]) = exp(c[t] - c[m]) exp(c[m] - c[s])``, so both factors stay ``<= 1``. Pairs inside
one sub-block go through its middle row, so the factors reach ``exp(+-8 |log decay|)``: while every
such exponent is at most ``DIAGONAL_LIMIT`` (decays down to about ``exp(-7.5)`` per position) the
pairs are one matrix product, otherwise (stronger decays) a loop over the sub-block's keys sums them
with factors ``<= 1``. Exponents are clamped (at 0, or at the limit): that changes nothing for
real positions and keeps the rows past a sequence's end (loaded as zeros) finite.

The work splits into passes that each read their inputs once:

- ``chunk_states_kernel``: the state entering every chunk, sequential over the chunks, and ``c`` for
  a decay per token (a constant decay is expanded in registers wherever it is needed);
- ``chunk_scores_kernel``: the in-chunk scores ``A[t, s] = q_t . k_s exp(c_t - c_s)``, ``s <= t``;
- ``chunk_output_kernel``: ``o = scale (q exp(c) h + A v)``;
- backward: ``chunk_dstates_kernel`` (the state gradients, in reverse), ``chunk_dscores_kernel``
  (``dA = scale do v^T``), ``chunk_dv_kernel``, ``chunk_dqk_intra_kernel`` (the in-chunk parts of
  ``dq`` and ``dk``, per sub-block) and ``chunk_dqk_kernel`` (``dq``, ``dk`` and ``dg``, per chunk).

Matrix products take 16-bit operands for 16-bit inputs (float32 accumulation) and float32 ones
otherwise (``PRECISION``); the products inside a sub-block take float32 operands, in TF32 for
16-bit inputs (``DIAG_PRECISION``: their factors exceed float16's range). States, scores and decays
are float32.

Layouts (all contiguous): ``q, k, c [B, T, H, K]``; ``v, o [B, T, H, V]``; scores ``[B, T, H, BT]``
(row ``t`` against the keys of its chunk); chunk states ``[NC, H, K, V]`` float32 over all ``NC``
chunks of the batch, boundary states ``[N, H, K, V]`` float32 for ``N`` sequences. Positions are
addressed as rows of the flattened ``[B * T, H, ...]`` tensors. Without ``IS_VARLEN`` sequence
``b`` is rows ``[b T, (b + 1) T)`` and holds ``NT`` chunks; with it (``B = 1``) the rows of sequence
``n`` are ``[cu_seqlens[n], cu_seqlens[n + 1])``, ``chunk_indices [NC, 2]`` gives every chunk's
sequence and position in it, and ``chunk_offsets [N]`` every sequence's first chunk.
"""

import triton
import triton.language as tl

from linmix.ops.common.triton_kernels import chunk_bounds, sequence_bounds

# Integer arguments that change with the sequence lengths: not specialised, so that a new length
# does not compile the kernels again.
SEQUENCE_ARGS = ["T", "NT"]


@triton.jit
def _tile(row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """Offsets (from row ``row0``) and mask of the ``[R, C]`` tile at ``[row0, col0]`` of a row-major matrix.

    The offsets are 32-bit and relative to ``row0``: callers move the base pointer there first, so
    only one 64-bit address is formed per tile. The mask drops rows ``>= row_end`` and columns ``>= n_cols``.
    """
    rows = tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    n_rows = (row_end - row0).to(tl.int32)
    return rows[:, None] * row_stride + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _load(ptr, row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """``ptr[row0:row0 + R, col0:col0 + C]`` as an ``[R, C]`` tile in the pointer's dtype, zero past the bounds."""
    offsets, mask = _tile(row0, col0, row_stride, row_end, n_cols, R, C)
    return tl.load(ptr + row0 * row_stride + offsets, mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """Store the ``[R, C]`` tile ``value`` at ``ptr[row0:, col0:]`` in the pointer's dtype, inside the bounds."""
    offsets, mask = _tile(row0, col0, row_stride, row_end, n_cols, R, C)
    tl.store(ptr + row0 * row_stride + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decay(c, g, row0, t0, eos, col0, K, row_stride, CONST: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """In-chunk cumulative log decay ``c[row0:row0 + R, col0:col0 + C]`` of the chunk starting at row ``t0``, float32.

    ``c`` points at the head's column of the ``[B, T, H, K]`` buffer, ``g`` at the ``[K]`` row of a
    constant decay; with ``CONST`` the value is ``(rows - t0 + 1) * g``. Zero for ``cols >= K`` and,
    for a decay per token, for rows past ``eos``.
    """
    if CONST:
        cols = col0 + tl.arange(0, C)
        log_gamma = tl.load(g + cols, mask=cols < K, other=0.0).to(tl.float32)
        out = (row0 + tl.arange(0, R) - t0 + 1).to(tl.float32)[:, None] * log_gamma[None, :]
    else:
        out = _load(c, row0, col0, row_stride, eos, K, R, C)
    return out


@triton.jit
def _decay_row(c, g, row, t0, eos, cols, K, row_stride, CONST: tl.constexpr):
    """In-chunk cumulative log decay ``c[row, cols]`` of one row, float32 ``[C]``."""
    if CONST:
        log_gamma = tl.load(g + cols, mask=cols < K, other=0.0).to(tl.float32)
        out = (row - t0 + 1).to(tl.float32) * log_gamma
    else:
        out = _row(c, row, eos, cols, K, row_stride)
    return out


@triton.jit
def _decay_factor(exponent):
    """``exp(min(exponent, 0))``: exact for the non-positive exponents of real positions, finite for padding."""
    return tl.exp(tl.minimum(exponent, 0.0))


# Largest exponent of the factors that carry the pairs inside a sub-block through its middle row:
# exp(60) leaves 10^12 of float32's range (the products' operands are float32) for the values they multiply.
DIAGONAL_LIMIT = tl.constexpr(60.0)


@triton.jit
def _through_middle(c_blk, c_m, n_valid, BC: tl.constexpr):
    """The factors of a sub-block's rows about its middle row ``m``, and whether they are safe.

    Returns ``up = exp(c - c_m)`` and ``down = exp(c_m - c)`` (``[BC, C]``, exponents clamped at
    ``DIAGONAL_LIMIT``), so that ``exp(c[a] - c[b]) = up[a] down[b]``, and whether no exponent of the
    first ``n_valid`` rows reaches past the limit (then nothing was clamped there).
    """
    spread = c_blk - c_m[None, :]
    valid = (tl.arange(0, BC) < n_valid)[:, None]
    widest = tl.max(tl.max(tl.where(valid, tl.abs(spread), 0.0), axis=1), axis=0)
    up = tl.exp(tl.minimum(spread, DIAGONAL_LIMIT))
    down = tl.exp(tl.minimum(-spread, DIAGONAL_LIMIT))
    return up, down, widest <= DIAGONAL_LIMIT


@triton.jit
def _row(ptr, row, end, cols, n_cols, row_stride):
    """``ptr[row, cols]`` as float32 ``[C]``, zero when ``row >= end`` or ``cols >= n_cols``."""
    width = tl.where(row < end, n_cols, 0)  # one comparison: the interpreter mishandles scalar & vector
    return tl.load(ptr + row * row_stride + cols, mask=cols < width, other=0.0).to(tl.float32)


@triton.jit
def _scores_by_key(q_blk, c_blk, k, c, g, r0, t0, eos, cols_k, K, row_stride, CONST: tl.constexpr,
                   BC: tl.constexpr):
    """``A[a, j] = sum_k q[a] k[j] exp(c[a] - c[j])`` inside one sub-block, one key ``j`` at a time.

    For decays too strong for the factored product: every factor is ``<= 1`` for ``a >= j``; the
    entries above the diagonal are finite and left for the caller to drop. ``[BC, BC]`` float32.
    """
    pos = tl.arange(0, BC)
    out = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(BC):
        k_j = _row(k, r0 + j, eos, cols_k, K, row_stride)  # [BK]
        c_j = _decay_row(c, g, r0 + j, t0, eos, cols_k, K, row_stride, CONST)  # [BK]
        column = tl.sum(q_blk * k_j[None, :] * _decay_factor(c_blk - c_j[None, :]), axis=1)  # [BC]
        out += tl.where(pos[None, :] == j, column[:, None], 0.0)
    return out


@triton.jit
def _inside_grads_by_key(q_blk, c_blk, da_below, k, c, g, r0, t0, eos, cols_k, K, row_stride,
                         CONST: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The in-sub-block parts of ``dq`` and ``dk`` (lag 0 left out), one key ``j`` at a time.

    ``dq[a] = sum_{j < a} dA[a, j] exp(c[a] - c[j]) k[j]`` and
    ``dk[j] = sum_{a > j} dA[a, j] exp(c[a] - c[j]) q[a]``; ``da_below`` is ``dA`` of the sub-block
    with zeros on and above the diagonal. Every factor is ``<= 1``. Two ``[BC, BK]`` float32.
    """
    pos = tl.arange(0, BC)
    dq_in = tl.zeros([BC, BK], dtype=tl.float32)
    dk_in = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(BC):
        k_j = _row(k, r0 + j, eos, cols_k, K, row_stride)  # [BK]
        c_j = _decay_row(c, g, r0 + j, t0, eos, cols_k, K, row_stride, CONST)  # [BK]
        da_j = tl.sum(tl.where(pos[None, :] == j, da_below, 0.0), axis=1)  # [BC], dA[:, j]
        weighted = da_j[:, None] * _decay_factor(c_blk - c_j[None, :])  # [BC, BK]
        dq_in += weighted * k_j[None, :]
        dk_j = tl.sum(weighted * q_blk, axis=0)  # [BK]
        dk_in += tl.where(pos[:, None] == j, dk_j[None, :], 0.0)
    return dq_in, dk_in


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``a @ b`` with operands in ``DOT_DTYPE`` (the inputs' dtype) and a float32 result."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_states_kernel(
    k, v, g, c, h0, h, ht, cu_seqlens, chunk_offsets, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, HAS_H0: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The state entering every chunk, and the final state, one ``[BK, BV]`` tile per program.

    Grid ``(NK, NV, N * H)``. ``g`` is the log decay, ``[H, K]`` with ``CONST``, else
    ``[B, T, H, K]``; then the programs of the first ``BV`` tile also write its in-chunk cumulative
    sum ``c`` (float32, ``[B, T, H, K]``). Writes ``h [NC, H, K, V]`` and ``ht [N, H, K, V]``; reads
    ``h0`` when ``HAS_H0``.
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    k += i_h * K
    v += i_h * V
    c += i_h * K
    g += i_h * K
    ck0 = i_k * BK
    cols_k = ck0 + tl.arange(0, BK)
    rows = tl.arange(0, BT)
    cv0 = i_v * BV
    boundary = tl.cast(i_sh, tl.int64) * K * V
    if HAS_H0:
        state = _load(h0 + boundary, ck0, cv0, V, K, V, BK, BV).to(tl.float32)  # [BK, BV]
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    # Every chunk's inputs are loaded one iteration ahead, so that their latency overlaps the
    # previous chunk's update (the loads do not depend on the state); past the end they are masked.
    k_next = _load(k, bos, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
    v_next = _load(v, bos, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
    g_next = _load(g, bos, ck0, H * K, bos if CONST else eos, K, BT, BK)  # [BT, BK], none if CONST
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        _store(h + ((n0 + i) * H + i_h) * K * V, state, ck0, cv0, V, K, V, BK, BV)
        k_c, v_c, log_gamma = k_next, v_next, g_next
        k_next = _load(k, t0 + BT, ck0, H * K, eos, K, BT, BK)
        v_next = _load(v, t0 + BT, cv0, H * V, eos, V, BT, BV)
        g_next = _load(g, t0 + BT, ck0, H * K, t0 + BT if CONST else eos, K, BT, BK)
        last = tl.minimum(t0 + BT, eos) - 1
        if CONST:
            c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
            c_last = _decay_row(c, g, last, t0, eos, cols_k, K, H * K, CONST)  # [BK]
        else:
            c_c = tl.cumsum(log_gamma.to(tl.float32), axis=0)  # [BT, BK]
            c_last = tl.sum(tl.where(rows[:, None] == last - t0, c_c, 0.0), axis=0)  # [BK]
            if i_v == 0:
                _store(c, c_c, t0, ck0, H * K, eos, K, BT, BK)
        k_to_end = k_c * _decay_factor(c_last[None, :] - c_c)
        state = state * tl.exp(c_last)[:, None] + _mm(tl.trans(k_to_end), v_c, PRECISION, DOT_DTYPE)
    _store(ht + boundary, state, ck0, cv0, V, K, V, BK, BV)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_scores_kernel(
    q, k, c, g, A, cu_seqlens, chunk_indices, T, NT, H, K,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, DIAG_PRECISION: tl.constexpr, DIAG_DTYPE: tl.constexpr,
):
    """The scores of one sub-block's queries against the keys of their chunk up to the sub-block's end.

    Grid ``(BT // BC, NC, H)``; loops over ``K`` in tiles of ``BK``. Writes the sub-block's rows of
    ``A`` whole, with zeros above the diagonal.
    """
    i_c, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    r0 = t0 + i_c * BC
    if r0 < eos:
        q += i_h * K
        k += i_h * K
        c += i_h * K
        g += i_h * K
        A += i_h * BT
        middle = tl.minimum(r0 + BC // 2, eos - 1)
        before = tl.zeros([BC, BT], dtype=tl.float32)  # against the earlier sub-blocks
        inside = tl.zeros([BC, BC], dtype=tl.float32)
        for ck0 in range(0, K, BK):
            cols_k = ck0 + tl.arange(0, BK)
            q_i = _load(q, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
            k_i = _load(k, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
            c_i = _decay(c, g, r0, t0, eos, ck0, K, H * K, CONST, BC, BK)  # [BC, BK]
            c_mid = _decay_row(c, g, middle, t0, eos, cols_k, K, H * K, CONST)  # [BK]
            up, down, fits = _through_middle(c_i, c_mid, eos - r0, BC)
            if fits:
                inside += _mm(q_i * up, tl.trans(k_i * down), DIAG_PRECISION, DIAG_DTYPE)
            else:
                inside += _scores_by_key(q_i, c_i, k, c, g, r0, t0, eos, cols_k, K, H * K, CONST, BC)
            if i_c > 0:
                # Reference: the sub-block's first row, between every earlier key and these queries.
                c_m = _decay_row(c, g, r0, t0, eos, cols_k, K, H * K, CONST)  # [BK]
                k_c = _load(k, t0, ck0, H * K, r0, K, BT, BK)  # [BT, BK], zero from the sub-block on
                c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
                k_to_m = k_c * _decay_factor(c_m[None, :] - c_c)
                q_from_m = q_i * _decay_factor(c_i - c_m[None, :])
                before += _mm(q_from_m, tl.trans(k_to_m), PRECISION, DOT_DTYPE)
        pos = tl.arange(0, BC)
        inside = tl.where(pos[:, None] >= pos[None, :], inside, 0.0)
        _store(A, before, r0, 0, H * BT, eos, i_c * BC, BC, BT)
        _store(A + i_c * BC, inside, r0, 0, H * BT, eos, BC, BC, BC)
        after = tl.zeros([BC, BT], dtype=tl.float32)  # the later keys of the chunk: no score
        _store(A + (i_c + 1) * BC, after, r0, 0, H * BT, eos, BT - (i_c + 1) * BC, BC, BT)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_output_kernel(
    q, v, c, g, h, A, o, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``o = scale (q exp(c) h + A v)`` for one chunk and one ``BV`` tile. Grid ``(NV, NC, H)``."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    c += i_h * K
    g += i_h * K
    v += i_h * V
    o += i_h * V
    A += i_h * BT
    h += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    cv0 = i_v * BV
    out = tl.zeros([BT, BV], dtype=tl.float32)
    for ck0 in range(0, K, BK):
        q_c = _load(q, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
        c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)
        state = _load(h, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
        out += _mm(q_c * _decay_factor(c_c), state, PRECISION, DOT_DTYPE)
    v_c = _load(v, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
    out += _mm(_load(A, t0, 0, H * BT, eos, BT, BT, BT), v_c, PRECISION, DOT_DTYPE)
    _store(o, out * scale, t0, cv0, H * V, eos, V, BT, BV)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dstates_kernel(
    q, c, g, do, dht, dh, dh0, scale, cu_seqlens, chunk_offsets, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, HAS_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The gradient of the state leaving every chunk, from each sequence's last chunk back to its first.

    Grid ``(NK, NV, N * H)``. Writes ``dh [NC, H, K, V]`` and ``dh0 [N, H, K, V]``; reads ``dht``
    (gradient of the final state) when ``HAS_DHT``.
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    q += i_h * K
    c += i_h * K
    g += i_h * K
    do += i_h * V
    ck0 = i_k * BK
    cols_k = ck0 + tl.arange(0, BK)
    cv0 = i_v * BV
    boundary = tl.cast(i_sh, tl.int64) * K * V
    if HAS_DHT:
        dstate = _load(dht + boundary, ck0, cv0, V, K, V, BK, BV).to(tl.float32)  # [BK, BV]
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, BT)
    # Every chunk's inputs are loaded one iteration ahead (see chunk_states_kernel).
    t_next = bos + (n_chunks - 1) * BT
    q_next = _load(q, t_next, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
    do_next = _load(do, t_next, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
    c_next = _decay(c, g, t_next, t_next, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
    c_last_next = _decay_row(c, g, eos - 1, t_next, eos, cols_k, K, H * K, CONST)  # [BK]
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        t0 = bos + n * BT
        _store(dh + ((n0 + n) * H + i_h) * K * V, dstate, ck0, cv0, V, K, V, BK, BV)
        q_c, do_c, c_c, c_last = q_next, do_next, c_next, c_last_next
        t_next = t0 - BT
        end_next = tl.where(n > 0, t0, t_next)  # nothing before the sequence's first chunk
        q_next = _load(q, t_next, ck0, H * K, end_next, K, BT, BK)
        do_next = _load(do, t_next, cv0, H * V, end_next, V, BT, BV)
        c_next = _decay(c, g, t_next, t_next, end_next, ck0, K, H * K, CONST, BT, BK)
        c_last_next = _decay_row(c, g, tl.maximum(t0 - 1, bos), t_next, end_next, cols_k, K, H * K, CONST)
        q_from_start = q_c * _decay_factor(c_c)
        read = _mm(tl.trans(q_from_start), do_c, PRECISION, DOT_DTYPE)  # [BK, BV]
        dstate = dstate * tl.exp(c_last)[:, None] + scale * read
    _store(dh0 + boundary, dstate, ck0, cv0, V, K, V, BK, BV)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dscores_kernel(
    v, do, dA, scale, cu_seqlens, chunk_indices, T, NT, H, V,
    BT: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """``dA = scale do v^T`` inside every chunk, zero above the diagonal. Grid ``(1, NC, H)``; loops over ``V``."""
    i_n, i_h = tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    v += i_h * V
    do += i_h * V
    dA += i_h * BT
    cols = tl.arange(0, BT)
    out = tl.zeros([BT, BT], dtype=tl.float32)
    for cv0 in range(0, V, BV):
        do_c = _load(do, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        v_c = _load(v, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        out += _mm(do_c, tl.trans(v_c), PRECISION, DOT_DTYPE)
    out = tl.where(cols[None, :] <= cols[:, None], out * scale, 0.0)
    _store(dA, out, t0, 0, H * BT, eos, BT, BT, BT)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dv_kernel(
    k, c, g, do, dh, A, dv, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``dv = scale A^T do + (k exp(c_last - c)) dh`` for one chunk and one ``BV`` tile. Grid ``(NV, NC, H)``."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    k += i_h * K
    c += i_h * K
    g += i_h * K
    do += i_h * V
    dv += i_h * V
    A += i_h * BT
    dh += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    cv0 = i_v * BV
    last = tl.minimum(t0 + BT, eos) - 1
    out = tl.zeros([BT, BV], dtype=tl.float32)
    for ck0 in range(0, K, BK):
        cols_k = ck0 + tl.arange(0, BK)
        k_c = _load(k, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
        c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)
        c_last = _decay_row(c, g, last, t0, eos, cols_k, K, H * K, CONST)  # [BK]
        dstate = _load(dh, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
        out += _mm(k_c * _decay_factor(c_last[None, :] - c_c), dstate, PRECISION, DOT_DTYPE)
    do_c = _load(do, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
    scores = _load(A, t0, 0, H * BT, eos, BT, BT, BT)  # [BT, BT], zero above the diagonal
    out += scale * _mm(tl.trans(scores), do_c, PRECISION, DOT_DTYPE)
    _store(dv, out, t0, cv0, H * V, eos, V, BT, BV)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dqk_intra_kernel(
    q, k, c, g, dA, dq, dk, cu_seqlens, chunk_indices, T, NT, H, K,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, DIAG_PRECISION: tl.constexpr, DIAG_DTYPE: tl.constexpr,
):
    """The in-chunk parts of ``dq`` and ``dk`` of one sub-block and one ``BK`` tile of the channels.

    ``dq_t = sum_{s < t} dA[t, s] exp(c_t - c_s) k_s`` and ``dk_s = sum_{t > s} dA[t, s] exp(c_t - c_s) q_t``
    over the positions of the chunk (lag 0 left out: ``chunk_dqk_kernel`` adds it). Grid
    ``(NK, NC * BT // BC, H)``. Writes ``dq`` and ``dk`` float32 ``[B, T, H, K]``.
    """
    i_k, i_nb, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, blk = i_nb // (BT // BC), i_nb % (BT // BC)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    r0 = t0 + blk * BC
    if r0 < eos:
        q += i_h * K
        k += i_h * K
        c += i_h * K
        g += i_h * K
        dq += i_h * K
        dk += i_h * K
        dA += i_h * BT
        rows = t0 + tl.arange(0, BT)
        sub = tl.arange(0, BC)
        ck0 = i_k * BK
        cols_k = ck0 + tl.arange(0, BK)
        q_i = _load(q, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
        k_i = _load(k, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
        c_i = _decay(c, g, r0, t0, eos, ck0, K, H * K, CONST, BC, BK)  # [BC, BK]
        dq_i = tl.zeros([BC, BK], dtype=tl.float32)
        dk_i = tl.zeros([BC, BK], dtype=tl.float32)
        c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK], the whole chunk
        if blk > 0:
            # Earlier keys, through the last row before the sub-block.
            c_m = _decay_row(c, g, r0 - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
            da_rows = _load(dA, r0, 0, H * BT, eos, blk * BC, BC, BT)  # [BC, BT], dA[i, :r0]
            k_c = _load(k, t0, ck0, H * K, r0, K, BT, BK)  # [BT, BK], zero from the sub-block on
            k_to_m = k_c * _decay_factor(c_m[None, :] - c_c)
            dq_i += _decay_factor(c_i - c_m[None, :]) * _mm(da_rows, k_to_m, PRECISION, DOT_DTYPE)
        if blk < BT // BC - 1:
            # Later queries, through the sub-block's last row.
            c_m = _decay_row(c, g, r0 + BC - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
            later = (rows >= r0 + BC) & (rows < eos)  # [BT]
            da_cols = tl.load(dA + rows[None, :] * (H * BT) + (blk * BC + sub)[:, None], mask=later[None, :], other=0.0)
            q_c = _load(q, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
            q_from_m = q_c * _decay_factor(c_c - c_m[None, :])
            dk_i += _decay_factor(c_m[None, :] - c_i) * _mm(da_cols, q_from_m, PRECISION, DOT_DTYPE)
        # Pairs inside the sub-block.
        da_inside = _load(dA + blk * BC, r0, 0, H * BT, eos, BC, BC, BC)  # [BC, BC]
        da_below = tl.where(sub[:, None] > sub[None, :], da_inside, 0.0)
        c_mid = _decay_row(c, g, tl.minimum(r0 + BC // 2, eos - 1), t0, eos, cols_k, K, H * K, CONST)  # [BK]
        up, down, fits = _through_middle(c_i, c_mid, eos - r0, BC)
        if fits:
            dq_i += up * _mm(da_below, k_i * down, DIAG_PRECISION, DIAG_DTYPE)
            dk_i += down * _mm(tl.trans(da_below), q_i * up, DIAG_PRECISION, DIAG_DTYPE)
        else:
            dq_in, dk_in = _inside_grads_by_key(q_i, c_i, da_below, k, c, g, r0, t0, eos, cols_k, K, H * K,
                                                CONST, BC, BK)
            dq_i += dq_in
            dk_i += dk_in
        _store(dq, dq_i, r0, ck0, H * K, eos, K, BC, BK)
        _store(dk, dk_i, r0, ck0, H * K, eos, K, BC, BK)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dqk_kernel(
    q, k, v, c, g, h, do, dh, dA, dq_in, dk_in, dq, dk, dg, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``dq``, ``dk`` and ``dg`` of one chunk and one ``BK`` tile of the channels.

    Grid ``(NK, NC, H)``; loops over ``V`` in tiles of ``BV``. Adds to the in-chunk parts ``dq_in``
    and ``dk_in`` (from ``chunk_dqk_intra_kernel``) the terms through the chunk states (the queries
    read the entering state ``h``, the keys write the leaving one, of gradient ``dh``) and the
    lag-0 terms ``dA[t, t] k_t`` and ``dA[t, t] q_t``.

    The gradient of the in-chunk cumulative decay is ``dc_t = q_t dq_t - k_t dk_t`` plus, at the
    chunk's last row, ``sum_v dS_out S_out``; ``dg`` is its reverse cumulative sum over the chunk.
    The lag-0 terms cancel exactly in it, so they are left out, and the leaving state is split into
    the decayed entering state and the keys written before ``t``::

        dg_t = sum_{i >= t} x_i + sum_{j < t} y_j + exp(c_last) sum_v dS_out S_in

    with ``x = q dq' - k dk_in``, where ``dq'`` holds no lag-0 term, and ``y = k dk^S``, the keys'
    gradient through the leaving state. Nothing large cancels, even for decays near 0. ``dg`` is
    written in its pointer's dtype, ``[B, T, H, K]``.
    """
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    k += i_h * K
    c += i_h * K
    g += i_h * K
    dq_in += i_h * K
    dk_in += i_h * K
    dq += i_h * K
    dk += i_h * K
    dg += i_h * K
    v += i_h * V
    do += i_h * V
    dA += i_h * BT
    h += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    dh += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
    ck0 = i_k * BK
    cols_k = ck0 + tl.arange(0, BK)
    c_last = _decay_row(c, g, tl.minimum(t0 + BT, eos) - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]

    dq_state = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
    dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # v dh^T
    through = tl.zeros([BK], dtype=tl.float32)  # sum_v dS_out S_in
    for cv0 in range(0, V, BV):
        do_c = _load(do, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        v_c = _load(v, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        state = _load(h, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
        dstate = _load(dh, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
        dq_state += _mm(do_c, tl.trans(state), PRECISION, DOT_DTYPE)
        dk_state += _mm(v_c, tl.trans(dstate), PRECISION, DOT_DTYPE)
        through += tl.sum(state * dstate, axis=1)
    q_c = _load(q, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)  # [BT, BK]
    k_c = _load(k, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)  # [BT, BK]
    c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
    rows = tl.arange(0, BT)
    n_rows = (eos - t0).to(tl.int32)
    da_diag = tl.load(dA + t0 * (H * BT) + rows * (H * BT + 1), mask=rows < n_rows, other=0.0)  # [BT], dA[t, t]
    dq_c = dq_state * scale * _decay_factor(c_c) + _load(dq_in, t0, ck0, H * K, eos, K, BT, BK)
    dk_inside = _load(dk_in, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
    dk_state = dk_state * _decay_factor(c_last[None, :] - c_c)
    x = q_c * dq_c - k_c * dk_inside
    y = k_c * dk_state
    dg_c = tl.cumsum(x, axis=0, reverse=True) + (tl.cumsum(y, axis=0) - y) + (through * tl.exp(c_last))[None, :]
    _store(dq, dq_c + da_diag[:, None] * k_c, t0, ck0, H * K, eos, K, BT, BK)
    _store(dk, dk_inside + dk_state + da_diag[:, None] * q_c, t0, ck0, H * K, eos, K, BT, BK)
    _store(dg, dg_c, t0, ck0, H * K, eos, K, BT, BK)
