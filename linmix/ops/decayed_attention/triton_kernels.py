"""Triton kernels of decayed attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

Every sequence is cut into chunks of ``BT`` positions and every chunk into sub-blocks of ``BC``
positions. ``c[t, k]`` is the cumulative log decay from the start of the chunk up to ``t``
(inclusive); it is ``<= 0`` and does not increase along the chunk, so the decay between two
positions ``s <= t`` of a chunk is ``exp(c[t] - c[s])`` with a non-positive exponent. A pair of
sub-blocks ``I > J`` goes through a reference row ``m`` between them,
``exp(c[t] - c[s]) = exp(c[t] - c[m]) exp(c[m] - c[s])``, so both factors stay ``<= 1``; pairs inside
one sub-block are summed explicitly. Every exponent is clamped at 0: that changes nothing for real
positions and keeps the rows past a sequence's end (loaded as zeros) finite.

The work splits into passes that each read their inputs once:

- ``chunk_cumsum_kernel``: ``c`` for a decay per token (a constant decay is expanded in registers);
- ``chunk_states_kernel``: the state entering every chunk, sequential over the chunks;
- ``chunk_scores_kernel``: the in-chunk scores ``A[t, s] = q_t . k_s exp(c_t - c_s)``, ``s <= t``;
- ``chunk_output_kernel``: ``o = scale (q exp(c) h + A v)``;
- backward: ``chunk_dstates_kernel`` (the state gradients, in reverse), ``chunk_dscores_kernel``
  (``dA = scale do v^T``), ``chunk_dv_kernel``, ``chunk_dqk_kernel`` (``dq``, ``dk`` and the parts
  of ``dg``) and ``chunk_dg_kernel`` (``dg``).

Matrix products take 16-bit operands for 16-bit inputs (float32 accumulation) and float32 ones
otherwise (``PRECISION``). States, scores and decays are float32.

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

# Integer arguments that change with the sequence lengths: not specialised, so that a new length
# does not compile the kernels again.
SEQUENCE_ARGS = ["T", "NT"]


@triton.jit
def _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(bos, eos, t0)`` of chunk ``i_n``: its sequence's first row, one past its last row, its own first row."""
    if IS_VARLEN:
        i_s = tl.load(chunk_indices + 2 * i_n).to(tl.int64)
        i_c = tl.load(chunk_indices + 2 * i_n + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_s).to(tl.int64)
        eos = tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    else:
        i_s = tl.cast(i_n, tl.int64) // NT
        i_c = tl.cast(i_n, tl.int64) % NT
        bos = i_s * T
        eos = bos + T
    return bos, eos, bos + i_c * BT


@triton.jit
def _sequence(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN: tl.constexpr):
    """``(bos, eos, n0)`` of sequence ``i_s``: first row, one past the last, index of its first chunk."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_s).to(tl.int64)
        eos = tl.load(cu_seqlens + i_s + 1).to(tl.int64)
        n0 = tl.load(chunk_offsets + i_s).to(tl.int64)
    else:
        bos = tl.cast(i_s, tl.int64) * T
        eos = bos + T
        n0 = tl.cast(i_s, tl.int64) * NT
    return bos, eos, n0


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
        width = tl.where(row < eos, K, 0)  # one comparison: the interpreter mishandles scalar & vector
        out = tl.load(c + row * row_stride + cols, mask=cols < width, other=0.0)
    return out


@triton.jit
def _decay_factor(exponent):
    """``exp(min(exponent, 0))``: exact for the non-positive exponents of real positions, finite for padding."""
    return tl.exp(tl.minimum(exponent, 0.0))


@triton.jit
def _block_decay(c_blk, BC: tl.constexpr):
    """Decays inside one sub-block: ``d[a, b, k] = exp(c[a, k] - c[b, k])`` for ``b <= a``, else 0, ``[BC, BC, C]``."""
    pos = tl.arange(0, BC)
    keep = (pos[:, None] >= pos[None, :])[:, :, None]  # [BC, BC, 1]
    return tl.where(keep, _decay_factor(c_blk[:, None, :] - c_blk[None, :, :]), 0.0)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``a @ b`` with operands in ``DOT_DTYPE`` (the inputs' dtype) and a float32 result."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_cumsum_kernel(g, c, cu_seqlens, chunk_indices, T, NT, H, K, BT: tl.constexpr, BK: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """``c = cumsum(g)`` inside every chunk, for a decay per token. Grid ``(NK, NC, H)``; ``c`` float32."""
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    ck0 = i_k * BK
    log_gamma = _load(g + i_h * K, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)  # [BT, BK]
    _store(c + i_h * K, tl.cumsum(log_gamma, axis=0), t0, ck0, H * K, eos, K, BT, BK)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_states_kernel(
    k, v, c, g, h0, h, ht, cu_seqlens, chunk_offsets, T, NT, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr, HAS_H0: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The state entering every chunk, and the final state, one ``[BK, BV]`` tile per program.

    Grid ``(NK, NV, N * H)``. Writes ``h [NC, H, K, V]`` and ``ht [N, H, K, V]``; reads ``h0`` when ``HAS_H0``.
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos, eos, n0 = _sequence(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    k += i_h * K
    v += i_h * V
    c += i_h * K
    g += i_h * K
    ck0 = i_k * BK
    cols_k = ck0 + tl.arange(0, BK)
    cv0 = i_v * BV
    boundary = tl.cast(i_sh, tl.int64) * K * V
    if HAS_H0:
        state = _load(h0 + boundary, ck0, cv0, V, K, V, BK, BV).to(tl.float32)  # [BK, BV]
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        _store(h + ((n0 + i) * H + i_h) * K * V, state, ck0, cv0, V, K, V, BK, BV)
        k_c = _load(k, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
        v_c = _load(v, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
        c_last = _decay_row(c, g, tl.minimum(t0 + BT, eos) - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
        k_to_end = k_c * _decay_factor(c_last[None, :] - c_c)
        state = state * tl.exp(c_last)[:, None] + _mm(tl.trans(k_to_end), v_c, PRECISION, DOT_DTYPE)
    _store(ht + boundary, state, ck0, cv0, V, K, V, BK, BV)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_scores_kernel(
    q, k, c, g, A, cu_seqlens, chunk_indices, T, NT, H, K,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, CONST: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The scores of one sub-block's queries against the keys of their chunk up to the sub-block's end.

    Grid ``(BT // BC, NC, H)``; loops over ``K`` in tiles of ``BK``. Writes the sub-block's rows of
    ``A`` whole, with zeros above the diagonal.
    """
    i_c, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    r0 = t0 + i_c * BC
    if r0 < eos:
        q += i_h * K
        k += i_h * K
        c += i_h * K
        g += i_h * K
        A += i_h * BT
        before = tl.zeros([BC, BT], dtype=tl.float32)  # against the earlier sub-blocks
        inside = tl.zeros([BC, BC], dtype=tl.float32)
        for ck0 in range(0, K, BK):
            cols_k = ck0 + tl.arange(0, BK)
            q_i = _load(q, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
            k_i = _load(k, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
            c_i = _decay(c, g, r0, t0, eos, ck0, K, H * K, CONST, BC, BK)  # [BC, BK]
            inside += tl.sum(q_i[:, None, :] * k_i[None, :, :] * _block_decay(c_i, BC), axis=2)
            if i_c > 0:
                # Reference: the sub-block's first row, between every earlier key and these queries.
                c_m = _decay_row(c, g, r0, t0, eos, cols_k, K, H * K, CONST)  # [BK]
                k_c = _load(k, t0, ck0, H * K, r0, K, BT, BK)  # [BT, BK], zero from the sub-block on
                c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
                k_to_m = k_c * _decay_factor(c_m[None, :] - c_c)
                q_from_m = q_i * _decay_factor(c_i - c_m[None, :])
                before += _mm(q_from_m, tl.trans(k_to_m), PRECISION, DOT_DTYPE)
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
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
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
    bos, eos, n0 = _sequence(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
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
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        t0 = bos + n * BT
        _store(dh + ((n0 + n) * H + i_h) * K * V, dstate, ck0, cv0, V, K, V, BK, BV)
        q_c = _load(q, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
        do_c = _load(do, t0, cv0, H * V, eos, V, BT, BV)  # [BT, BV]
        c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)
        c_last = _decay_row(c, g, tl.minimum(t0 + BT, eos) - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
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
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
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
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
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
def chunk_dqk_kernel(
    q, k, v, c, g, h, do, dh, dA, dq, dk, x, y, entering, scale, cu_seqlens, chunk_indices, T, NT, H, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CONST: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``dq`` and ``dk`` of one sub-block and one ``BK`` tile of the channels, and the parts of ``dg``.

    Grid ``(NK, NC * BT // BC, H)``; loops over ``V`` in tiles of ``BV``. The gradient of the
    in-chunk cumulative decay is ``dc_t = q_t dq_t - k_t dk_t`` plus, at the chunk's last row,
    ``sum_v dS_out S_out``; ``dg`` is its reverse cumulative sum over the chunk. The lag-0 terms
    ``dA[t, t] q_t k_t`` cancel exactly in it, so they are left out, and the leaving state is split
    into the decayed entering state and the keys written before ``t``::

        dg_t = sum_{i >= t} x_i + sum_{j < t} y_j + exp(c_last) sum_v dS_out S_in

    with ``x = q dq' - k dk'``, where ``dq'`` and ``dk'`` hold no lag-0 and (for ``dk'``) no state
    term, and ``y = k dk^S``, the keys' gradient through the leaving state. Nothing large cancels,
    even for decays near 0. This kernel writes ``x``, ``y`` (float32 ``[B, T, H, K]``) and, from the
    chunk's first sub-block, the last term (``entering [NC, H, K]``); ``chunk_dg_kernel`` sums them.
    """
    i_k, i_nb, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, blk = i_nb // (BT // BC), i_nb % (BT // BC)
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    r0 = t0 + blk * BC
    if r0 < eos:
        q += i_h * K
        k += i_h * K
        c += i_h * K
        g += i_h * K
        dq += i_h * K
        dk += i_h * K
        x += i_h * K
        y += i_h * K
        v += i_h * V
        do += i_h * V
        dA += i_h * BT
        h += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
        dh += (tl.cast(i_n, tl.int64) * H + i_h) * K * V
        rows = t0 + tl.arange(0, BT)
        sub = tl.arange(0, BC)
        ck0 = i_k * BK
        cols_k = ck0 + tl.arange(0, BK)
        c_last = _decay_row(c, g, tl.minimum(t0 + BT, eos) - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]

        # Through the chunk states: the queries read the entering state, the keys write the leaving one.
        dq_i = tl.zeros([BC, BK], dtype=tl.float32)  # do h^T
        dk_state = tl.zeros([BC, BK], dtype=tl.float32)  # v dh^T
        through = tl.zeros([BK], dtype=tl.float32)  # sum_v dS_out S_in
        for cv0 in range(0, V, BV):
            do_i = _load(do, r0, cv0, H * V, eos, V, BC, BV)  # [BC, BV]
            v_i = _load(v, r0, cv0, H * V, eos, V, BC, BV)  # [BC, BV]
            state = _load(h, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
            dstate = _load(dh, ck0, cv0, V, K, V, BK, BV)  # [BK, BV]
            dq_i += _mm(do_i, tl.trans(state), PRECISION, DOT_DTYPE)
            dk_state += _mm(v_i, tl.trans(dstate), PRECISION, DOT_DTYPE)
            through += tl.sum(state * dstate, axis=1)
        q_i = _load(q, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
        k_i = _load(k, r0, ck0, H * K, eos, K, BC, BK).to(tl.float32)  # [BC, BK]
        c_i = _decay(c, g, r0, t0, eos, ck0, K, H * K, CONST, BC, BK)  # [BC, BK]
        dq_i = dq_i * scale * _decay_factor(c_i)
        dk_state = dk_state * _decay_factor(c_last[None, :] - c_i)
        dk_i = tl.zeros([BC, BK], dtype=tl.float32)
        if blk > 0:
            # Earlier keys, through the last row before the sub-block.
            c_m = _decay_row(c, g, r0 - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
            da_rows = _load(dA, r0, 0, H * BT, eos, blk * BC, BC, BT)  # [BC, BT], dA[i, :r0]
            k_c = _load(k, t0, ck0, H * K, r0, K, BT, BK)  # [BT, BK], zero from the sub-block on
            c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
            k_to_m = k_c * _decay_factor(c_m[None, :] - c_c)
            dq_i += _decay_factor(c_i - c_m[None, :]) * _mm(da_rows, k_to_m, PRECISION, DOT_DTYPE)
        if blk < BT // BC - 1:
            # Later queries, through the sub-block's last row.
            c_m = _decay_row(c, g, r0 + BC - 1, t0, eos, cols_k, K, H * K, CONST)  # [BK]
            later = (rows >= r0 + BC) & (rows < eos)  # [BT]
            da_cols = tl.load(dA + rows[None, :] * (H * BT) + (blk * BC + sub)[:, None], mask=later[None, :], other=0.0)
            q_c = _load(q, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
            c_c = _decay(c, g, t0, t0, eos, ck0, K, H * K, CONST, BT, BK)  # [BT, BK]
            q_from_m = q_c * _decay_factor(c_c - c_m[None, :])
            dk_i += _decay_factor(c_m[None, :] - c_i) * _mm(da_cols, q_from_m, PRECISION, DOT_DTYPE)
        # Pairs inside the sub-block, lag 0 left out (added to dq and dk below, not to dg).
        da_inside = _load(dA + blk * BC, r0, 0, H * BT, eos, BC, BC, BC)  # [BC, BC]
        lag = sub[:, None] - sub[None, :]  # [BC, BC], i - j
        da_diag = tl.sum(tl.where(lag == 0, da_inside, 0.0), axis=1)  # [BC]
        da_below = tl.where(lag > 0, da_inside, 0.0)[:, :, None]  # [BC, BC, 1]
        decay = _block_decay(c_i, BC)  # [BC, BC, BK]
        dq_i += tl.sum(da_below * k_i[None, :, :] * decay, axis=1)
        dk_i += tl.sum(da_below * q_i[:, None, :] * decay, axis=0)

        _store(x, q_i * dq_i - k_i * dk_i, r0, ck0, H * K, eos, K, BC, BK)
        _store(y, k_i * dk_state, r0, ck0, H * K, eos, K, BC, BK)
        _store(dq, dq_i + da_diag[:, None] * k_i, r0, ck0, H * K, eos, K, BC, BK)
        _store(dk, dk_i + dk_state + da_diag[:, None] * q_i, r0, ck0, H * K, eos, K, BC, BK)
        if blk == 0:
            at = entering + (tl.cast(i_n, tl.int64) * H + i_h) * K + cols_k
            tl.store(at, through * tl.exp(c_last), mask=cols_k < K)


@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dg_kernel(x, y, entering, dg, cu_seqlens, chunk_indices, T, NT, H, K, BT: tl.constexpr,
                    BK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``dg_t = sum_{i >= t} x_i + sum_{j < t} y_j + entering`` over every chunk (see ``chunk_dqk_kernel``).

    Grid ``(NK, NC, H)``.
    """
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = _chunk(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    ck0 = i_k * BK
    cols_k = ck0 + tl.arange(0, BK)
    x_c = _load(x + i_h * K, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
    y_c = _load(y + i_h * K, t0, ck0, H * K, eos, K, BT, BK)  # [BT, BK]
    through = tl.load(entering + (tl.cast(i_n, tl.int64) * H + i_h) * K + cols_k, mask=cols_k < K, other=0.0)
    out = tl.cumsum(x_c, axis=0, reverse=True) + (tl.cumsum(y_c, axis=0) - y_c) + through[None, :]
    _store(dg + i_h * K, out, t0, ck0, H * K, eos, K, BT, BK)
