"""Triton kernels of the delta rule in chunked WY form (spec/preconditioned_delta.md §3, ``chunk.py``).

Per value head, chunk of ``BT`` positions entered with state ``S [K, V]``, queries ``q`` (scaled by
``scale`` on load), read keys ``k``, write keys ``kw``, values ``v``, strengths ``beta`` and log decays
``g``; ``G`` is the in-chunk cumulative sum of ``g`` and ``Gamma_ij = exp(G_i - G_j)``:

* ``A_kk[i, j] = beta_i k_i^T Gamma_ij kw_j`` (``j < i``), ``Ai = (I + A_kk)^-1``, ``W = Ai (beta k e^G)``,
  ``U = Ai (beta v)`` (``chunk_prepare_kernel``, which also keeps ``A_qk[i, j] = q_i^T Gamma_ij kw_j``, ``j <= i``);
* ``Vn = U - W S``, ``S <- e^{G_C} S + (kw e^{G_C - G})^T Vn`` (``chunk_states_kernel``, sequential);
* ``o = (q e^G) S + A_qk Vn`` (``chunk_output_kernel``).

Backward: ``chunk_dstates_kernel`` runs the state gradient back over the chunks and writes ``dVn``
(``A_qk^T do + (kw e^{G_C - G}) dS``); ``chunk_grads_kernel`` then gives every chunk's ``dq, dk, dkw,
dv, dbeta, dg`` in parallel. With ``D = Ai^T dVn`` (the gradient of the right-hand side
``beta (v - k e^G S)`` whose solve is ``Vn``): ``dv = beta D``, ``dA_kk = -D Vn^T`` and
``dA_qk = do Vn^T``; ``dg`` is the reverse in-chunk sum of the gradient of ``G``.

The preconditioner's write keys ``kw = gain(A_t) k_t`` come in as an input (``triton.py`` computes the
statistics ``A_t`` with ``decayed_attention``'s kernels).

Decay modes (``MODE``): 0 none (DeltaNet), 1 one log decay per value head and position (GDN), 2 one
per key channel (KDA). Scalar decays use the exact ``[BT, BT]`` matrix ``exp(segsum(g))``. Per-channel
decays cut the chunk into sub-blocks of ``BC``: a row ``i`` of sub-block ``I`` meets the columns before
``I`` through the last row ``m`` of sub-block ``I - 1``, ``Gamma_ij = exp(G_i - G_m) exp(G_m - G_j)``
(one matrix product, both factors ``<= 1``, the first the in-sub-block sum ``L_i``), and the pairs
inside a sub-block one column offset at a time, from sums along the sub-block (at most ``BC`` terms,
so nothing long cancels). Every exponent is clamped at 0, exact for real positions and finite for
padding.

Matrix products cast their operands to ``DOT_DTYPE`` and multiply at ``PRECISION`` (the launcher
passes float32 operands, in TF32 for 16-bit inputs); the triangular inverse always multiplies in
float32 (``ieee``). All intermediates are float32.

Layouts (contiguous): ``q, k, kw [B, T, H, K]``; ``v [B, T, HV, V]``; ``beta [B, T, HV]``; ``g``
``[B, T, HV]`` or ``[B, T, HV, K]``; per-token buffers ``[B, T, HV, X]`` (``Ai``, ``A_qk``: X = BT, row
``t`` against the positions of its chunk); chunk states ``[NC, HV, K, V]``; boundary states
``[N, HV, K, V]``. Value head ``j`` reads key head ``j // (HV // H)``. Packed sequences as in
``linmix.ops.decayed_attention.triton_kernels``: rows of the flattened ``[B * T, ...]`` tensors,
``chunk_indices`` and ``chunk_offsets`` with ``IS_VARLEN``.
"""

import os

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
# Heads wider than ``SMALL_HEAD`` channels: with Triton's default 3 pipeline stages the float32 tiles
# of some kernels need more shared memory than a Hopper SM has (on the H200: up to 270 KB against
# 227 KB at K = V = 128, and 246 KB for DeltaNet, PDN and PKDA at K = V = 64), so those shapes autotune
# over ``STAGES`` and the autotuner drops a configuration that does not fit. Narrower heads (the
# contract suite's shapes) run the default configuration, compiled once; Triton's CPU interpreter has
# only that one.
SMALL_HEAD = 32
DEFAULT_STAGES = 3
STAGES = (3, 2, 1)
TUNE_KEY = ["K", "V", "BK", "BV", "MODE", "IS_VARLEN", "PRECISION"]


def _head_width(named_args: dict, kwargs: dict) -> int:
    return max(named_args.get(name, kwargs.get(name, 0)) for name in ("K", "V"))


def tuned(num_warps: int):
    """``triton.autotune`` over ``STAGES`` for heads wider than ``SMALL_HEAD`` channels, keyed by the shapes
    the kernels specialise on; ``num_warps`` with Triton's default stages for narrower heads."""
    configs = [triton.Config({}, num_warps=num_warps, num_stages=stages) for stages in STAGES]
    default = next(c for c in configs if c.num_stages == DEFAULT_STAGES)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.autotune(configs=[default], key=[])

    def prune(configs, named_args, **kwargs):
        return configs if _head_width(named_args, kwargs) > SMALL_HEAD else [default]

    return triton.autotune(configs=configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune})


# ---- addressing ---------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``a @ b`` with operands in ``DOT_DTYPE`` and a float32 result."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _mm32(a, b):
    """``a @ b`` of float32 operands in float32 (no TF32)."""
    return tl.dot(a, b, input_precision="ieee")


# ---- decays -------------------------------------------------------------------------------------------


@triton.jit
def _segsum(g, BT: tl.constexpr):
    """``[BT]`` log decays to ``[BT, BT]``: ``sum_{j < r <= i} g_r`` at ``[i, j]`` for ``i > j`` (0 for ``i <= j``).

    A cumulative sum down every column of the steps after ``j``: each entry is the sum of its own
    span, with no difference of long prefix sums.
    """
    rows = tl.arange(0, BT)
    steps = tl.where(rows[:, None] > rows[None, :], g[:, None], 0.0)
    return tl.cumsum(steps, axis=0)


@triton.jit
def _scalar_ends(g, t0, eos, HV, BT: tl.constexpr):
    """A scalar decay's chunk: ``g [BT]``, ``G`` (from the chunk start, inclusive), ``suffix`` (after ``j`` to
    the chunk end) and the chunk's total. Rows past ``eos`` have ``g = 0``."""
    g_c = load_vec(g, t0, HV, eos, BT)
    G = tl.cumsum(g_c, axis=0)
    suffix = tl.minimum(tl.cumsum(g_c, axis=0, reverse=True) - g_c, 0.0)
    return g_c, G, suffix, tl.sum(g_c, axis=0)


@triton.jit
def _scalar_gamma(g_c, BT: tl.constexpr):
    """``exp(G_i - G_j)`` for ``j <= i``, 0 above: ``[BT, BT]``, exact to the rounding of each span's sum."""
    rows = tl.arange(0, BT)
    return tl.where(rows[:, None] >= rows[None, :], tl.exp(tl.minimum(_segsum(g_c, BT), 0.0)), 0.0)


@triton.jit
def _channel_decay(g, t0, eos, ck0, K, HV, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """A per-channel decay's ``[BT, BK]`` tile: ``G`` (from the chunk start), ``L`` (from the start of the
    row's sub-block), ``suffix`` (after the row to the chunk end) and the chunk's total ``[BK]``."""
    g_t = load_tile(g, t0, ck0, HV * K, eos, K, BT, BK).to(tl.float32)
    G = tl.cumsum(g_t, axis=0)
    L = tl.reshape(tl.cumsum(tl.reshape(g_t, (BT // BC, BC, BK)), axis=1), (BT, BK))
    suffix = tl.minimum(tl.cumsum(g_t, axis=0, reverse=True) - g_t, 0.0)
    return G, L, suffix, tl.sum(g_t, axis=0)


@triton.jit
def _block_diagonal(d, BT: tl.constexpr, BC: tl.constexpr):
    """The ``[BT, BT]`` block-diagonal matrix of the sub-blocks ``d [BT // BC, BC, BC]`` (zeros off them)."""
    rows = tl.arange(0, BT)
    wide = tl.reshape(tl.broadcast_to(tl.reshape(d, (BT, 1, BC)), (BT, BT // BC, BC)), (BT, BT))
    return tl.where((rows[:, None] // BC) == (rows[None, :] // BC), wide, 0.0)


@triton.jit
def _channel_scores(a1, a2, b, kw, g, t0, eos, ck0, K, kw_stride, g_stride, G, L, BT: tl.constexpr,
                    BC: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``M[i, j] = sum_d a[i, d] b[j, d] exp(G[i, d] - G[j, d])`` for ``j <= i`` (0 above) of ``a1`` and of ``a2``
    against the same ``b = kw[t0:t0 + BT, ck0:ck0 + BK]`` (float32): two ``[BT, BT]`` float32.

    Sub-block ``I`` against the earlier positions through the last row ``m`` of sub-block ``I - 1``
    (``G_i - G_m = L_i``, two matrix products); the pairs inside the sub-blocks one column offset
    ``s`` at a time, on ``[BT // BC, BC, BK]`` tiles, with row ``s`` of every sub-block loaded from
    ``kw`` and ``g`` (``g`` summed along the sub-block as ``s`` goes).
    """
    rows = tl.arange(0, BT)
    out1 = tl.zeros([BT, BT], dtype=tl.float32)
    out2 = tl.zeros([BT, BT], dtype=tl.float32)
    row_factor = tl.exp(tl.minimum(L, 0.0))
    for blk in range(1, BT // BC):
        m = blk * BC - 1
        G_m = tl.sum(tl.where(rows[:, None] == m, G, 0.0), axis=0)  # [BK]
        inside = (rows // BC == blk)[:, None]
        b_before = tl.where((rows <= m)[:, None], b * tl.exp(tl.minimum(G_m[None, :] - G, 0.0)), 0.0)
        b_before = tl.trans(b_before).to(DOT_DTYPE)
        out1 += tl.dot(tl.where(inside, a1 * row_factor, 0.0).to(DOT_DTYPE), b_before, input_precision=PRECISION)
        out2 += tl.dot(tl.where(inside, a2 * row_factor, 0.0).to(DOT_DTYPE), b_before, input_precision=PRECISION)
    sub = tl.arange(0, BC)
    a13 = tl.reshape(a1, (BT // BC, BC, BK))
    a23 = tl.reshape(a2, (BT // BC, BC, BK))
    L3 = tl.reshape(L, (BT // BC, BC, BK))
    inside1 = tl.zeros([BT // BC, BC, BC], dtype=tl.float32)
    inside2 = tl.zeros([BT // BC, BC, BC], dtype=tl.float32)
    L_s = tl.zeros([BT // BC, BK], dtype=tl.float32)
    rows_s = t0 + tl.arange(0, BT // BC) * BC
    cols = ck0 + tl.arange(0, BK)
    mask_s = (cols < K)[None, :]
    for s in range(BC):
        r = rows_s + s  # row s of every sub-block (loaded: a masked sum would cost a reduction per step)
        mask = mask_s & (r < eos)[:, None]
        b_s = tl.load(kw + r[:, None] * kw_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        L_s += tl.load(g + r[:, None] * g_stride + cols[None, :], mask=mask, other=0.0)
        weighted = b_s[:, None, :] * tl.exp(tl.minimum(L3 - L_s[:, None, :], 0.0))  # [BT // BC, BC, BK]
        at_s = sub[None, None, :] == s
        inside1 += tl.where(at_s, tl.sum(a13 * weighted, axis=2)[:, :, None], 0.0)
        inside2 += tl.where(at_s, tl.sum(a23 * weighted, axis=2)[:, :, None], 0.0)
    lower = sub[None, :, None] >= sub[None, None, :]
    return (out1 + _block_diagonal(tl.where(lower, inside1, 0.0), BT, BC),
            out2 + _block_diagonal(tl.where(lower, inside2, 0.0), BT, BC))


@triton.jit
def _channel_scores_grad(dM1, a1, dM2, a2, b, kw, g, t0, eos, ck0, K, kw_stride, g_stride, G, L, BT: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The gradients of two ``_channel_scores`` against the same ``b``, for strictly lower ``dM1``, ``dM2``.

    ``da[i] = sum_{j < i} dM[i, j] Gamma_ij b_j`` for each, and ``db[j] = sum_{i > j} dM[i, j] Gamma_ij
    a_i`` summed over both: three ``[BT, BK]`` float32 (the diagonals of ``dM1``, ``dM2`` are ignored).
    """
    rows = tl.arange(0, BT)
    da1 = tl.zeros([BT, BK], dtype=tl.float32)
    da2 = tl.zeros([BT, BK], dtype=tl.float32)
    db = tl.zeros([BT, BK], dtype=tl.float32)
    row_factor = tl.exp(tl.minimum(L, 0.0))
    for blk in range(1, BT // BC):
        m = blk * BC - 1
        G_m = tl.sum(tl.where(rows[:, None] == m, G, 0.0), axis=0)  # [BK]
        inside = (rows // BC == blk)[:, None]
        before = (rows <= m)[None, :]
        col_factor = tl.where((rows <= m)[:, None], tl.exp(tl.minimum(G_m[None, :] - G, 0.0)), 0.0)
        dM1_blk = tl.where(inside & before, dM1, 0.0).to(DOT_DTYPE)
        dM2_blk = tl.where(inside & before, dM2, 0.0).to(DOT_DTYPE)
        b_before = (b * col_factor).to(DOT_DTYPE)
        rows_in = tl.where(inside, row_factor, 0.0)
        da1 += rows_in * tl.dot(dM1_blk, b_before, input_precision=PRECISION)
        da2 += rows_in * tl.dot(dM2_blk, b_before, input_precision=PRECISION)
        db += col_factor * (tl.dot(tl.trans(dM1_blk), (a1 * rows_in).to(DOT_DTYPE), input_precision=PRECISION)
                            + tl.dot(tl.trans(dM2_blk), (a2 * rows_in).to(DOT_DTYPE), input_precision=PRECISION))
    sub = tl.arange(0, BC)
    a13 = tl.reshape(a1, (BT // BC, BC, BK))
    a23 = tl.reshape(a2, (BT // BC, BC, BK))
    L3 = tl.reshape(L, (BT // BC, BC, BK))
    same = (rows[:, None] // BC) == (rows[None, :] // BC)
    diagonal1 = tl.where(same, dM1, 0.0)
    diagonal2 = tl.where(same, dM2, 0.0)
    da13 = tl.zeros([BT // BC, BC, BK], dtype=tl.float32)
    da23 = tl.zeros([BT // BC, BC, BK], dtype=tl.float32)
    db3 = tl.zeros([BT // BC, BC, BK], dtype=tl.float32)
    L_s = tl.zeros([BT // BC, BK], dtype=tl.float32)
    rows_s = t0 + tl.arange(0, BT // BC) * BC
    cols = ck0 + tl.arange(0, BK)
    mask_s = (cols < K)[None, :]
    for s in range(BC):
        r = rows_s + s  # row s of every sub-block (loaded: a masked sum would cost a reduction per step)
        mask = mask_s & (r < eos)[:, None]
        b_s = tl.load(kw + r[:, None] * kw_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        L_s += tl.load(g + r[:, None] * g_stride + cols[None, :], mask=mask, other=0.0)
        factor = tl.exp(tl.minimum(L3 - L_s[:, None, :], 0.0))  # [BT // BC, BC, BK]
        below = sub[None, :] > s
        column = (rows % BC == s)[None, :]
        w1 = tl.where(below, tl.reshape(tl.sum(tl.where(column, diagonal1, 0.0), axis=1), (BT // BC, BC)), 0.0)
        w2 = tl.where(below, tl.reshape(tl.sum(tl.where(column, diagonal2, 0.0), axis=1), (BT // BC, BC)), 0.0)
        weighted = b_s[:, None, :] * factor
        da13 += w1[:, :, None] * weighted
        da23 += w2[:, :, None] * weighted
        db_s = tl.sum((w1[:, :, None] * a13 + w2[:, :, None] * a23) * factor, axis=1)  # [BT // BC, BK]
        db3 += tl.where(sub[None, :, None] == s, db_s[:, None, :], 0.0)
    return (da1 + tl.reshape(da13, (BT, BK)), da2 + tl.reshape(da23, (BT, BK)), db + tl.reshape(db3, (BT, BK)))


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, BC: tl.constexpr):
    """``(I + A)^-1`` of a strictly lower-triangular ``A [BT, BT]``, float32.

    The diagonal sub-blocks of ``BC`` are inverted together by forward substitution (``BC - 1`` steps,
    one column of every sub-block per step); then with ``Ti`` that block-diagonal inverse and ``N = Ti
    A_off`` (``A_off`` the part below the sub-blocks, so ``N`` is nilpotent of order ``BT / BC``),
    ``(I + A)^-1 = (I - N + N^2 - ...) Ti`` in Horner form.
    """
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    same = (rows[:, None] // BC) == (cols[None, :] // BC)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    D = tl.where(same, A, 0.0)
    Ti = eye
    for s in range(BC - 1):
        column = tl.sum(tl.where((cols % BC == s)[None, :], D, 0.0), axis=1)  # D[i, BC * (i // BC) + s]
        row = tl.sum(tl.where((rows % BC == s)[:, None], Ti, 0.0), axis=0)  # Ti[BC * (j // BC) + s, j]
        Ti -= tl.where(same, column[:, None] * row[None, :], 0.0)
    N = _mm32(Ti, tl.where(same, 0.0, A))
    X = eye
    for _ in range(BT // BC - 1):
        X = eye - _mm32(N, X)
    return _mm32(X, Ti)


# ---- forward ------------------------------------------------------------------------------------------


@tuned(num_warps=8)
@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_prepare_kernel(
    q, k, kw, v, beta, g, ainv, aqk, w, u, scale, cu_seqlens, chunk_indices, T, NT, H, HV, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Every chunk's ``Ai = (I + A_kk)^-1``, ``A_qk``, ``W = Ai (beta k e^G)`` and ``U = Ai (beta v)``.

    Grid ``(NC, HV)``; loops over ``K`` in tiles of ``BK`` and ``V`` in tiles of ``BV``. Writes ``ainv``
    and ``aqk`` ``[B, T, HV, BT]``, ``w [B, T, HV, K]`` and ``u [B, T, HV, V]``, float32.
    """
    i_n, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    k += i_h * K
    kw += i_h * K
    v += i_hv * V
    u += i_hv * V
    w += i_hv * K
    beta += i_hv
    ainv += i_hv * BT
    aqk += i_hv * BT
    if MODE == 2:
        g += i_hv * K
    else:
        g += i_hv
    rows = tl.arange(0, BT)
    b_c = load_vec(beta, t0, HV, eos, BT)
    G1 = tl.zeros([BT], dtype=tl.float32)
    a_kk = tl.zeros([BT, BT], dtype=tl.float32)
    a_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for ck0 in range(0, K, BK):
        q_c = load_tile(q, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32) * scale
        k_c = load_tile(k, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)
        kw_c = load_tile(kw, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)
        if MODE == 2:
            G, L, _, _ = _channel_decay(g, t0, eos, ck0, K, HV, BT, BC, BK)
            kk, qk = _channel_scores(k_c, q_c, kw_c, kw, g, t0, eos, ck0, K, H * K, HV * K, G, L, BT, BC, BK,
                                     PRECISION, DOT_DTYPE)
            a_kk += kk
            a_qk += qk
        else:
            a_kk += _mm(k_c, tl.trans(kw_c), PRECISION, DOT_DTYPE)
            a_qk += _mm(q_c, tl.trans(kw_c), PRECISION, DOT_DTYPE)
    if MODE == 1:
        g_c, G1, _, _ = _scalar_ends(g, t0, eos, HV, BT)
        gamma = _scalar_gamma(g_c, BT)
        a_kk = a_kk * gamma
        a_qk = a_qk * gamma
    a_kk = tl.where(rows[:, None] > rows[None, :], b_c[:, None] * a_kk, 0.0)
    a_qk = tl.where(rows[:, None] >= rows[None, :], a_qk, 0.0)
    store_tile(aqk, a_qk, t0, 0, HV * BT, eos, BT, BT, BT)
    t_inv = _unit_lower_inverse(a_kk, BT, BC)
    store_tile(ainv, t_inv, t0, 0, HV * BT, eos, BT, BT, BT)
    for ck0 in range(0, K, BK):
        rhs = b_c[:, None] * load_tile(k, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)
        if MODE == 1:
            rhs = rhs * tl.exp(G1)[:, None]
        if MODE == 2:
            G, _, _, _ = _channel_decay(g, t0, eos, ck0, K, HV, BT, BC, BK)
            rhs = rhs * tl.exp(G)
        store_tile(w, _mm(t_inv, rhs, PRECISION, DOT_DTYPE), t0, ck0, HV * K, eos, K, BT, BK)
    for cv0 in range(0, V, BV):
        rhs = b_c[:, None] * load_tile(v, t0, cv0, HV * V, eos, V, BT, BV).to(tl.float32)
        store_tile(u, _mm(t_inv, rhs, PRECISION, DOT_DTYPE), t0, cv0, HV * V, eos, V, BT, BV)


@tuned(num_warps=8)
@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_states_kernel(
    kw, w, u, g, h0, h, vn, ht, cu_seqlens, chunk_offsets, T, NT, H, HV, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The state entering every chunk, the corrected values ``Vn = U - W S`` and the final state.

    Grid ``(NV, N * HV)``, sequential over the chunks; one program holds all ``K`` rows (``BK >= K``)
    of a ``BV`` tile. Writes ``h [NC, HV, K, V]``, ``vn [B, T, HV, V]`` and ``ht [N, HV, K, V]``.
    """
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    i_s, i_hv = i_sh // HV, i_sh % HV
    i_h = i_hv // (HV // H)
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    kw += i_h * K
    w += i_hv * K
    u += i_hv * V
    vn += i_hv * V
    if MODE == 2:
        g += i_hv * K
    else:
        g += i_hv
    cv0 = i_v * BV
    boundary = tl.cast(i_sh, tl.int64) * K * V
    if HAS_H0:
        state = load_tile(h0 + boundary, 0, cv0, V, K, V, BK, BV).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        store_tile(h + ((n0 + i) * HV + i_hv) * K * V, state, 0, cv0, V, K, V, BK, BV)
        w_c = load_tile(w, t0, 0, HV * K, eos, K, BT, BK)
        v_new = load_tile(u, t0, cv0, HV * V, eos, V, BT, BV) - _mm(w_c, state, PRECISION, DOT_DTYPE)
        store_tile(vn, v_new, t0, cv0, HV * V, eos, V, BT, BV)
        kw_c = load_tile(kw, t0, 0, H * K, eos, K, BT, BK).to(tl.float32)
        if MODE == 1:
            _, _, suffix, total = _scalar_ends(g, t0, eos, HV, BT)
            kw_c = kw_c * tl.exp(suffix)[:, None]
            state = state * tl.exp(total)
        if MODE == 2:
            _, _, suffix, total = _channel_decay(g, t0, eos, 0, K, HV, BT, BC, BK)
            kw_c = kw_c * tl.exp(suffix)
            state = state * tl.exp(total)[:, None]
        state += _mm(tl.trans(kw_c), v_new, PRECISION, DOT_DTYPE)
    store_tile(ht + boundary, state, 0, cv0, V, K, V, BK, BV)


@tuned(num_warps=4)
@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_output_kernel(
    q, g, h, aqk, vn, o, scale, cu_seqlens, chunk_indices, T, NT, H, HV, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``o = (q e^G) S + A_qk Vn`` for one chunk and one ``BV`` tile. Grid ``(NV, NC, HV)``."""
    i_v, i_n, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    aqk += i_hv * BT
    vn += i_hv * V
    o += i_hv * V
    if MODE == 2:
        g += i_hv * K
    else:
        g += i_hv
    h += (tl.cast(i_n, tl.int64) * HV + i_hv) * K * V
    cv0 = i_v * BV
    out = tl.zeros([BT, BV], dtype=tl.float32)
    G1 = tl.zeros([BT], dtype=tl.float32)
    if MODE == 1:
        _, G1, _, _ = _scalar_ends(g, t0, eos, HV, BT)
    for ck0 in range(0, K, BK):
        q_c = load_tile(q, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32) * scale
        if MODE == 1:
            q_c = q_c * tl.exp(G1)[:, None]
        if MODE == 2:
            G, _, _, _ = _channel_decay(g, t0, eos, ck0, K, HV, BT, BC, BK)
            q_c = q_c * tl.exp(G)
        out += _mm(q_c, load_tile(h, ck0, cv0, V, K, V, BK, BV), PRECISION, DOT_DTYPE)
    out += _mm(load_tile(aqk, t0, 0, HV * BT, eos, BT, BT, BT), load_tile(vn, t0, cv0, HV * V, eos, V, BT, BV),
               PRECISION, DOT_DTYPE)
    store_tile(o, out, t0, cv0, HV * V, eos, V, BT, BV)


# ---- backward -----------------------------------------------------------------------------------------


@tuned(num_warps=8)
@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_dstates_kernel(
    q, kw, w, aqk, g, do, dht, dh, dvn, dh0, scale, cu_seqlens, chunk_offsets, T, NT, H, HV, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The gradients of the state leaving every chunk and of the corrected values, last chunk first.

    Grid ``(NV, N * HV)``, all ``K`` rows per program. Per chunk, with ``dS`` the gradient of the state
    leaving it: ``dVn = A_qk^T do + (kw e^{G_C - G}) dS`` and the entering state's
    ``e^{G_C} dS + (q e^G)^T do - W^T dVn``. Writes ``dh [NC, HV, K, V]`` (leaving states),
    ``dvn [B, T, HV, V]`` and ``dh0 [N, HV, K, V]``.
    """
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    i_s, i_hv = i_sh // HV, i_sh % HV
    i_h = i_hv // (HV // H)
    bos, eos, n0 = sequence_bounds(i_s, cu_seqlens, chunk_offsets, T, NT, IS_VARLEN)
    q += i_h * K
    kw += i_h * K
    w += i_hv * K
    aqk += i_hv * BT
    do += i_hv * V
    dvn += i_hv * V
    if MODE == 2:
        g += i_hv * K
    else:
        g += i_hv
    cv0 = i_v * BV
    boundary = tl.cast(i_sh, tl.int64) * K * V
    if HAS_DHT:
        dstate = load_tile(dht + boundary, 0, cv0, V, K, V, BK, BV).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        t0 = bos + n * BT
        store_tile(dh + ((n0 + n) * HV + i_hv) * K * V, dstate, 0, cv0, V, K, V, BK, BV)
        q_c = load_tile(q, t0, 0, H * K, eos, K, BT, BK).to(tl.float32) * scale
        kw_c = load_tile(kw, t0, 0, H * K, eos, K, BT, BK).to(tl.float32)
        do_c = load_tile(do, t0, cv0, HV * V, eos, V, BT, BV).to(tl.float32)
        if MODE == 1:
            _, G, suffix, total = _scalar_ends(g, t0, eos, HV, BT)
            q_c = q_c * tl.exp(G)[:, None]
            kw_c = kw_c * tl.exp(suffix)[:, None]
        if MODE == 2:
            G, _, suffix, total = _channel_decay(g, t0, eos, 0, K, HV, BT, BC, BK)
            q_c = q_c * tl.exp(G)
            kw_c = kw_c * tl.exp(suffix)
        a_c = load_tile(aqk, t0, 0, HV * BT, eos, BT, BT, BT)
        dv_new = _mm(tl.trans(a_c), do_c, PRECISION, DOT_DTYPE) + _mm(kw_c, dstate, PRECISION, DOT_DTYPE)
        store_tile(dvn, dv_new, t0, cv0, HV * V, eos, V, BT, BV)
        if MODE == 1:
            dstate = dstate * tl.exp(total)
        if MODE == 2:
            dstate = dstate * tl.exp(total)[:, None]
        w_c = load_tile(w, t0, 0, HV * K, eos, K, BT, BK)
        dstate += _mm(tl.trans(q_c), do_c, PRECISION, DOT_DTYPE) - _mm(tl.trans(w_c), dv_new, PRECISION, DOT_DTYPE)
    store_tile(dh0 + boundary, dstate, 0, cv0, V, K, V, BK, BV)


@tuned(num_warps=8)
@triton.jit(do_not_specialize=SEQUENCE_ARGS)
def chunk_grads_kernel(
    q, k, kw, v, beta, g, h, dh, ainv, vn, dvn, do, dq, dk, dkw, dv, dbeta, dg, scale, cu_seqlens, chunk_indices,
    T, NT, H, HV, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """``dq, dk, dkw, dv, dbeta, dg`` of one chunk and value head. Grid ``(NC, HV)``.

    With ``D = Ai^T dVn``: ``dv = beta D``, ``dA_kk = -D Vn^T`` (strictly lower), ``dA_qk = do Vn^T``;
    the interactions' gradients go to their row and column operands (``q``; ``beta k``; ``kw``), the
    state terms to ``q`` (``do S^T e^G``), ``kw`` (``Vn dS^T e^{G_C - G}``) and ``k`` (``-beta e^G D
    S^T``, through ``W``). The gradient of ``G`` is ``x_i - y_i`` at every row plus, at the chunk's last
    row, ``sum_V S_out dS_out = e^{G_C} sum_V S dS + sum_j y_j``, where ``y = kw e^{G_C - G} dkw^S``
    (the keys' part through the leaving state) and ``x`` holds every other term. ``dg`` is its reverse
    cumulative sum, written as ``sum_{i >= t} x_i + sum_{j < t} y_j + e^{G_C} sum_V S dS`` so that the
    ``y`` terms do not cancel. The lag-0 entries of ``A_qk`` do not depend on ``G``; they go to ``dq``
    and ``dkw`` alone. ``dq, dk, dkw`` are float32 per value head ``[B, T, HV, K]`` (the launcher sums
    a key head's); ``dv`` in its pointer's dtype; ``dbeta`` and ``dg`` float32.
    """
    i_n, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = chunk_bounds(i_n, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    q += i_h * K
    k += i_h * K
    kw += i_h * K
    dq += i_hv * K
    dk += i_hv * K
    dkw += i_hv * K
    v += i_hv * V
    vn += i_hv * V
    dvn += i_hv * V
    do += i_hv * V
    dv += i_hv * V
    beta += i_hv
    dbeta += i_hv
    ainv += i_hv * BT
    if MODE == 2:
        g += i_hv * K
        dg += i_hv * K
    else:
        g += i_hv
        dg += i_hv
    h += (tl.cast(i_n, tl.int64) * HV + i_hv) * K * V
    dh += (tl.cast(i_n, tl.int64) * HV + i_hv) * K * V
    rows = tl.arange(0, BT)
    strict = rows[:, None] > rows[None, :]
    b_c = load_vec(beta, t0, HV, eos, BT)
    t_inv = load_tile(ainv, t0, 0, HV * BT, eos, BT, BT, BT)

    # The value side: dv, dbeta's value part, and the interactions' gradients.
    db_c = tl.zeros([BT], dtype=tl.float32)
    da_kk = tl.zeros([BT, BT], dtype=tl.float32)
    da_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for cv0 in range(0, V, BV):
        do_c = load_tile(do, t0, cv0, HV * V, eos, V, BT, BV).to(tl.float32)
        vn_c = load_tile(vn, t0, cv0, HV * V, eos, V, BT, BV)
        rhs_grad = _mm(tl.trans(t_inv), load_tile(dvn, t0, cv0, HV * V, eos, V, BT, BV), PRECISION, DOT_DTYPE)
        v_c = load_tile(v, t0, cv0, HV * V, eos, V, BT, BV).to(tl.float32)
        store_tile(dv, b_c[:, None] * rhs_grad, t0, cv0, HV * V, eos, V, BT, BV)
        db_c += tl.sum(rhs_grad * v_c, axis=1)
        da_kk -= _mm(rhs_grad, tl.trans(vn_c), PRECISION, DOT_DTYPE)
        da_qk += _mm(do_c, tl.trans(vn_c), PRECISION, DOT_DTYPE)
    lag0 = tl.sum(tl.where(rows[:, None] == rows[None, :], da_qk, 0.0), axis=1)  # [BT], dA_qk[i, i]
    da_kk = tl.where(strict, da_kk, 0.0)
    da_qk = tl.where(strict, da_qk, 0.0)
    G1 = tl.zeros([BT], dtype=tl.float32)
    suffix1 = tl.zeros([BT], dtype=tl.float32)
    total1 = 0.0
    if MODE == 1:
        g_c, G1, suffix1, total1 = _scalar_ends(g, t0, eos, HV, BT)
        gamma = _scalar_gamma(g_c, BT)
        da_kk = da_kk * gamma
        da_qk = da_qk * gamma
    x_sum = tl.zeros([BT], dtype=tl.float32)
    y_sum = tl.zeros([BT], dtype=tl.float32)
    last_sum = tl.zeros([BT], dtype=tl.float32)  # the same value in every row

    # The key side, one tile of K at a time.
    for ck0 in range(0, K, BK):
        dq_state = tl.zeros([BT, BK], dtype=tl.float32)  # do S^T
        dkw_state = tl.zeros([BT, BK], dtype=tl.float32)  # Vn dS^T
        dk_state = tl.zeros([BT, BK], dtype=tl.float32)  # D S^T
        through = tl.zeros([BK], dtype=tl.float32)  # sum_V S dS
        for cv0 in range(0, V, BV):
            do_c = load_tile(do, t0, cv0, HV * V, eos, V, BT, BV).to(tl.float32)
            vn_c = load_tile(vn, t0, cv0, HV * V, eos, V, BT, BV)
            rhs_grad = _mm(tl.trans(t_inv), load_tile(dvn, t0, cv0, HV * V, eos, V, BT, BV), PRECISION, DOT_DTYPE)
            state = load_tile(h, ck0, cv0, V, K, V, BK, BV)
            dstate = load_tile(dh, ck0, cv0, V, K, V, BK, BV)
            dq_state += _mm(do_c, tl.trans(state), PRECISION, DOT_DTYPE)
            dkw_state += _mm(vn_c, tl.trans(dstate), PRECISION, DOT_DTYPE)
            dk_state += _mm(rhs_grad, tl.trans(state), PRECISION, DOT_DTYPE)
            through += tl.sum(state * dstate, axis=1)
        q_c = load_tile(q, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32) * scale
        k_c = load_tile(k, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)
        kw_c = load_tile(kw, t0, ck0, H * K, eos, K, BT, BK).to(tl.float32)
        bk = b_c[:, None] * k_c
        if MODE == 2:
            G, L, suffix, total = _channel_decay(g, t0, eos, ck0, K, HV, BT, BC, BK)
            from_start = tl.exp(G)
            to_end = tl.exp(suffix)
            dq_pair, dbk_pair, dkw_pairs = _channel_scores_grad(da_qk, q_c, da_kk, bk, kw_c, kw, g, t0, eos, ck0, K,
                                                                H * K, HV * K, G, L, BT, BC, BK, PRECISION,
                                                                DOT_DTYPE)
        else:
            from_start = tl.exp(G1)[:, None]
            to_end = tl.exp(suffix1)[:, None]
            dq_pair = _mm(da_qk, kw_c, PRECISION, DOT_DTYPE)
            dbk_pair = _mm(da_kk, kw_c, PRECISION, DOT_DTYPE)
            dkw_pairs = _mm(tl.trans(da_qk), q_c, PRECISION, DOT_DTYPE) + _mm(tl.trans(da_kk), bk, PRECISION, DOT_DTYPE)
        dq_state = dq_state * from_start
        dkw_state = dkw_state * to_end
        through_w = bk * from_start * dk_state  # beta k e^G (D S^T): the keys' part through W
        dq_c = dq_state + dq_pair + lag0[:, None] * kw_c
        dkw_c = dkw_state + dkw_pairs + lag0[:, None] * q_c
        dk_c = b_c[:, None] * (dbk_pair - from_start * dk_state)
        db_c += tl.sum(k_c * dbk_pair, axis=1) - tl.sum(k_c * from_start * dk_state, axis=1)
        store_tile(dq, dq_c * scale, t0, ck0, HV * K, eos, K, BT, BK)
        store_tile(dk, dk_c, t0, ck0, HV * K, eos, K, BT, BK)
        store_tile(dkw, dkw_c, t0, ck0, HV * K, eos, K, BT, BK)
        if MODE != 0:
            x = q_c * (dq_state + dq_pair) - kw_c * dkw_pairs + bk * dbk_pair - through_w
            y = kw_c * dkw_state
            if MODE == 2:
                last = through * tl.exp(total)  # [BK]
                dg_c = tl.cumsum(x, axis=0, reverse=True) + (tl.cumsum(y, axis=0) - y) + last[None, :]
                store_tile(dg, dg_c, t0, ck0, HV * K, eos, K, BT, BK)
            else:
                x_sum += tl.sum(x, axis=1)
                y_sum += tl.sum(y, axis=1)
                last_sum += tl.sum(through, axis=0) * tl.exp(total1)
    if MODE == 1:
        dg_c = tl.cumsum(x_sum, axis=0, reverse=True) + (tl.cumsum(y_sum, axis=0) - y_sum) + last_sum
        store_vec(dg, dg_c, t0, HV, eos, BT)
    store_vec(dbeta, db_c, t0, HV, eos, BT)
