"""Triton helpers shared by the chunked kernels of several ops: where a chunk or a sequence lies in a
packed batch, and masked tile and vector loads and stores of row-major buffers.

Packed sequences follow FlashAttention's and fla's convention: rows of the flattened ``[B * T, ...]``
tensors, ``cu_seqlens`` ``[N + 1]``, and with ``IS_VARLEN`` the launcher's ``chunk_indices`` (every
chunk's sequence and position in it) and ``chunk_offsets`` (every sequence's first chunk); without it
``N`` sequences of ``T`` rows and ``NT`` chunks each. Bounds are int64, so no row index overflows.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
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
def sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN: tl.constexpr):
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
def load_tile(ptr, row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """``ptr[row0:row0 + R, col0:col0 + C]`` of a row-major matrix in the pointer's dtype, zero at rows
    ``>= row_end`` and columns ``>= n_cols``."""
    rows = tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    n_rows = row_end - row0  # no cast: an argument equal to 1 (K = 1) is a compile-time constant
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + row0 * row_stride + (rows[:, None] * row_stride + cols[None, :]), mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, value, row0, col0, row_stride, row_end, n_cols, R: tl.constexpr, C: tl.constexpr):
    """Store the ``[R, C]`` tile ``value`` at ``ptr[row0:, col0:]`` in the pointer's dtype, inside the bounds."""
    rows = tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    n_rows = row_end - row0  # no cast: an argument equal to 1 (K = 1) is a compile-time constant
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + row0 * row_stride + (rows[:, None] * row_stride + cols[None, :]),
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_vec(ptr, row0, stride, row_end, R: tl.constexpr):
    """``ptr[(row0 + r) * stride]`` for ``r < R`` as float32 ``[R]``, zero at rows ``>= row_end``."""
    rows = tl.arange(0, R)
    n_rows = row_end - row0  # no cast: an argument equal to 1 (K = 1) is a compile-time constant
    return tl.load(ptr + row0 * stride + rows * stride, mask=rows < n_rows, other=0.0).to(tl.float32)


@triton.jit
def store_vec(ptr, value, row0, stride, row_end, R: tl.constexpr):
    """Store ``value [R]`` at ``ptr[(row0 + r) * stride]`` for rows ``< row_end``."""
    rows = tl.arange(0, R)
    n_rows = row_end - row0  # no cast: an argument equal to 1 (K = 1) is a compile-time constant
    tl.store(ptr + row0 * stride + rows * stride, value.to(ptr.dtype.element_ty), mask=rows < n_rows)
