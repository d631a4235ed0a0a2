"""The delta rule (DN, GDN, KDA and their preconditioned forms) on Triton kernels, as ``torch.library`` custom ops.

The chunked WY form of ``chunk.py`` in chunks of 64 positions (see ``triton_kernels`` for the kernels
and their formulas):

* ``linmix::delta_rule_precond_fwd`` / ``_bwd`` (with a preconditioner): the key statistics ``A``
  scanned per key head and channel, the write keys ``gain(A_t) k_t`` (float32) and the final ``A``;
  the backward runs the scan in reverse for ``dk``, ``dprecond_g``, ``dprecond_beta``,
  ``dprecond_center`` and the initial ``A``'s gradient;
* ``linmix::delta_rule_fwd`` / ``_bwd``: per chunk the triangular solve (``Ai = (I + A_kk)^-1``), ``W``,
  ``U`` and the query-key interaction ``A_qk``; the sequential state pass (chunk states and the
  corrected values ``Vn``); the outputs. The backward runs the state gradient back over the chunks
  and then every chunk's gradients in parallel, all in Triton.

The forward keeps for the backward, float32 per position and value head: ``Ai`` and ``A_qk`` (64
each), ``W`` (K), ``Vn`` (V), and the chunk states (``K V / 64``): about ``(128 + K + V + K V / 64) * 4``
bytes, 2.5 KiB at K = V = 128; the preconditioner adds its write keys (``4 K`` per position and key
head) and ``A`` entering every chunk. The backward recomputes only the decays' in-chunk sums and,
from those ``A``, the statistics and gains inside the chunks.

The L2 normalisation of q and k (float32, rounded back to the inputs' dtype) and the summing of the
key heads' gradients under GVA run in PyTorch around the ops. Packed sequences (``cu_seqlens``) run
in the same launches. Every op has a fake implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.

Limits: ``K <= 256`` (the state passes hold all of a head's key channels); float32, bfloat16 and
float16 inputs (float64 runs on ``chunk``). Checked against the float64 reference in Triton's CPU
interpreter (CI) and on an H200 (``pytest -m gpu``).
"""

import functools
import importlib
import math

import torch
import torch.nn.functional as F

from linmix.ops.common.triton import cdiv, chunk_layout, dot_options, launch_device, sequential_block_v, tile_size
from linmix.ops.common.triton import state_rows as common_state_rows

CHUNK = 64  # positions per chunk (BT)
SUB_BLOCK = 16  # positions per sub-block of the per-channel decays and of the triangular inverse (BC)
MAX_BLOCK_K = 64  # largest key tile of the per-chunk kernels
MAX_BLOCK_V = 64  # largest value tile
MAX_STATE_K = 256  # the state passes hold all K channels of a head in one tile
MAX_GRADS_BLOCK_K = 32  # the gradient kernel holds three [64, 64] matrices besides its key tiles


@functools.cache
def _kernels():
    """The kernel module, imported at the first launch (``TRITON_INTERPRET=1`` may be set after ``import linmix``)."""
    return importlib.import_module("linmix.ops.delta_rule.triton_kernels")


def state_rows(B: int, T: int, cu_seqlens: torch.Tensor | None) -> int:
    """Rows of the per-chunk buffers (see ``linmix.ops.common.triton.state_rows``)."""
    return common_state_rows(B, T, cu_seqlens, CHUNK)


def _n_seqs(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """The number of sequences: the batch size, or one fewer than the entries of ``cu_seqlens``."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _mode(g: torch.Tensor | None) -> int:
    """The kernels' decay mode: 0 without a decay, 1 one per value head ``[B, T, HV]``, 2 per key channel."""
    return 0 if g is None else (1 if g.dim() == 3 else 2)


def _state_block_k(K: int) -> int:
    """The key tile of the state passes: all of ``K``."""
    if K > MAX_STATE_K:
        raise ValueError(f"backend 'triton' of delta_rule takes K <= {MAX_STATE_K} key channels, got K={K}; "
                         "pass backend='chunk' for wider heads")
    return tile_size(K, None, MAX_STATE_K)


def _state_block_v(x: torch.Tensor, programs_per_tile: int, V: int, BK: int) -> int:
    """The value tile of the state passes: 64 (32 beyond 64 key channels), halved while the GPU has idle units,
    but never below 32 beyond 64 key channels (a ``[128, 16]`` state tile faulted on the H200 with Triton 3.6)."""
    if BK > 64:
        return tile_size(V, None, 32)
    return sequential_block_v(x, programs_per_tile, V, tile_size(V, None, 64), None)


def _key_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """A per-value-head gradient ``[B, T, HV, K]`` summed over the value heads of every key head: ``[B, T, H, K]``."""
    B, T, HV, K = x.shape
    return x if HV == H else x.view(B, T, H, HV // H, K).sum(dim=3)


def _dot_options(dtype: torch.dtype) -> dict:
    """How the delta kernels multiply matrices: float32 operands always, exactly (``ieee``) for float32 inputs
    and in TF32 for 16-bit ones (``dot_options``' precision).

    Most operands are float32 intermediates (the triangular inverse, the corrected values and their
    gradients, decayed keys), which 16-bit operands would round; TF32 keeps float32's range and 10
    mantissa bits. Reading the 16-bit inputs as 16-bit operands where both factors are inputs is a
    speed-up left for the GPU tuning.
    """
    tl = importlib.import_module("triton.language")
    return dict(PRECISION=dot_options(dtype)["PRECISION"], DOT_DTYPE=tl.float32)


def _launch_args(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """The layout of the batch in chunks and the arguments every delta kernel takes."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    layout = chunk_layout(B, T, cu_seqlens, CHUNK)
    common = dict(cu_seqlens=layout.cu_seqlens, T=T, NT=layout.NT, H=H, HV=HV, K=K, V=V, BT=CHUNK, BC=SUB_BLOCK,
                  MODE=_mode(g), IS_VARLEN=layout.varlen, **_dot_options(q.dtype))
    return layout, common


# ---- the preconditioner ---------------------------------------------------------------------------------


def precond_forward(
    k: torch.Tensor,
    precond_g: torch.Tensor,
    precond_beta: torch.Tensor,
    precond_center: torch.Tensor,
    x: float,
    eps: float,
    initial_A: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The write keys and the key statistics.

    Args:
        k: normalised keys ``[B, T, H, K]`` (float32, bfloat16 or float16).
        precond_g: log decay of ``A``, ``[B, T, H]``.
        precond_beta: strengths ``[B, T, H]``.
        precond_center: ``[H]``.
        x: the gain's range.
        eps: added to ``A`` inside the log.
        initial_A: ``[N, H, K]`` or None for zeros.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (``B = 1``), or None.

    Returns:
        The write keys ``[B, T, H, K]``, the final ``A [N, H, K]`` and ``A`` entering every chunk
        ``[state_rows, H, K]``, all float32.
    """
    B, T, H, K = k.shape
    k, precond_g, precond_beta = k.contiguous(), precond_g.contiguous(), precond_beta.contiguous()
    BK = tile_size(K, None, MAX_BLOCK_K)
    with launch_device(k):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        kw = k.new_empty(B, T, H, K, dtype=torch.float32)
        a_starts = k.new_empty(state_rows(B, T, cu_seqlens), H, K, dtype=torch.float32)
        a_final = k.new_empty(layout.n_seqs, H, K, dtype=torch.float32)
        a0 = None if initial_A is None else initial_A.float().contiguous()
        _kernels().precond_forward_kernel[(cdiv(K, BK), layout.n_seqs * H)](
            k, precond_g, precond_beta, precond_center.contiguous(), a0, kw, a_starts, a_final, math.log(x), eps,
            layout.cu_seqlens, layout.chunk_offsets, T, layout.NT, H, K, BT=CHUNK, BK=BK, HAS_A0=a0 is not None,
            IS_VARLEN=layout.varlen,
        )
    return kw, a_final, a_starts


def precond_backward(
    k: torch.Tensor,
    precond_g: torch.Tensor,
    precond_beta: torch.Tensor,
    precond_center: torch.Tensor,
    x: float,
    eps: float,
    a_starts: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    dkw: torch.Tensor,
    da_final: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preconditioner's gradients from those of the write keys ``dkw`` and of the final ``A``.

    Returns:
        ``dk``, ``dprecond_g``, ``dprecond_beta``, ``dprecond_center`` in their inputs' dtypes and the
        initial ``A``'s gradient ``[N, H, K]`` float32.
    """
    B, T, H, K = k.shape
    k, precond_g, precond_beta = k.contiguous(), precond_g.contiguous(), precond_beta.contiguous()
    BK = tile_size(K, None, MAX_BLOCK_K)
    NK = cdiv(K, BK)
    with launch_device(k):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        N = layout.n_seqs
        dk = k.new_empty(B, T, H, K, dtype=torch.float32)
        dgp = k.new_empty(NK, B, T, H, dtype=torch.float32)
        dbp = torch.empty_like(dgp)
        dcenter = k.new_empty(N * H, NK, dtype=torch.float32)
        da0 = k.new_empty(N, H, K, dtype=torch.float32)
        daf = None if da_final is None else da_final.float().contiguous()
        _kernels().precond_backward_kernel[(NK, N * H)](
            k, precond_g, precond_beta, precond_center.contiguous(), a_starts, dkw.float().contiguous(), daf, dk, dgp,
            dbp, dcenter, da0, math.log(x), eps, B * T * H, layout.cu_seqlens, layout.chunk_offsets, T, layout.NT, H, K,
            BT=CHUNK, BK=BK, HAS_DA_FINAL=daf is not None, IS_VARLEN=layout.varlen,
        )
    return (dk.to(k.dtype), dgp.sum(dim=0).to(precond_g.dtype), dbp.sum(dim=0).to(precond_beta.dtype),
            dcenter.view(N, H, NK).sum(dim=(0, 2)).to(precond_center.dtype), da0)


# ---- the delta rule -------------------------------------------------------------------------------------


def delta_rule_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    kw: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernels.

    Args:
        q: queries ``[B, T, H, K]`` (normalised; scaled by ``scale`` in the kernels), float32, bfloat16
            or float16.
        k: read keys ``[B, T, H, K]``.
        kw: write keys ``[B, T, H, K]`` (``k`` itself without a preconditioner; any of the three dtypes).
        v: values ``[B, T, HV, V]``.
        beta: strengths ``[B, T, HV]``.
        g: None, ``[B, T, HV]`` or ``[B, T, HV, K]`` log decays (float32).
        scale: factor of the queries.
        initial_state: ``[N, HV, K, V]`` or None for zeros.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (``B = 1``), or None.

    Returns:
        ``o [B, T, HV, V]`` in v's dtype, the final states ``[N, HV, K, V]``, and for the backward the
        chunk states ``[state_rows, HV, K, V]``, ``Ai`` and ``A_qk`` ``[B, T, HV, 64]``, ``W [B, T, HV,
        K]`` and ``Vn [B, T, HV, V]`` (all float32).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    q, k, kw, v, beta = (x.contiguous() for x in (q, k, kw, v, beta))
    g = None if g is None else g.contiguous()
    g_arg = beta if g is None else g  # never read without a decay
    BK, BV = tile_size(K, None, MAX_BLOCK_K), tile_size(V, None, MAX_BLOCK_V)
    BK_state = _state_block_k(K)
    kernels = _kernels()
    f32 = dict(dtype=torch.float32)
    with launch_device(q):
        layout, common = _launch_args(q, v, g, cu_seqlens)
        ainv = q.new_empty(B, T, HV, CHUNK, **f32)
        aqk = torch.empty_like(ainv)
        w = q.new_empty(B, T, HV, K, **f32)
        u = q.new_empty(B, T, HV, V, **f32)
        kernels.chunk_prepare_kernel[(layout.n_chunks, HV)](
            q, k, kw, v, beta, g_arg, ainv, aqk, w, u, scale, chunk_indices=layout.chunk_indices, BK=BK, BV=BV,
            **common,
        )
        BV_state = _state_block_v(q, layout.n_seqs * HV, V, BK_state)
        h = q.new_empty(state_rows(B, T, cu_seqlens), HV, K, V, **f32)
        vn = torch.empty_like(u)
        ht = q.new_empty(layout.n_seqs, HV, K, V, **f32)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        kernels.chunk_states_kernel[(cdiv(V, BV_state), layout.n_seqs * HV)](
            kw, w, u, g_arg, h0, h, vn, ht, chunk_offsets=layout.chunk_offsets, BK=BK_state, BV=BV_state,
            HAS_H0=h0 is not None, **common,
        )
        o = torch.empty_like(v)
        kernels.chunk_output_kernel[(cdiv(V, BV), layout.n_chunks, HV)](
            q, g_arg, h, aqk, vn, o, scale, chunk_indices=layout.chunk_indices, BK=BK, BV=BV, **common,
        )
    return o, ht, h, ainv, aqk, w, vn


def delta_rule_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    kw: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    h: torch.Tensor,
    ainv: torch.Tensor,
    aqk: torch.Tensor,
    w: torch.Tensor,
    vn: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels on what the forward kept (see ``delta_rule_forward``).

    Returns:
        ``dq``, ``dk``, ``dkw``, ``dv``, ``dbeta`` in their inputs' dtypes (the key heads' sums under
        GVA), ``dg`` float32 (empty ``[0]`` without ``g``) and the initial states' gradient ``[N, HV, K, V]``.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    q, k, kw, v, beta, do = (x.contiguous() for x in (q, k, kw, v, beta, do))
    g = None if g is None else g.contiguous()
    g_arg = beta if g is None else g
    BK, BV = tile_size(K, None, MAX_GRADS_BLOCK_K), tile_size(V, None, MAX_BLOCK_V)
    BK_state = _state_block_k(K)
    kernels = _kernels()
    f32 = dict(dtype=torch.float32)
    with launch_device(q):
        layout, common = _launch_args(q, v, g, cu_seqlens)
        dh = torch.empty_like(h)
        dvn = torch.empty_like(vn)
        dh0 = q.new_empty(layout.n_seqs, HV, K, V, **f32)
        dht = None if dfinal_state is None else dfinal_state.float().contiguous()
        BV_state = _state_block_v(q, layout.n_seqs * HV, V, BK_state)
        kernels.chunk_dstates_kernel[(cdiv(V, BV_state), layout.n_seqs * HV)](
            q, kw, w, aqk, g_arg, do, dht, dh, dvn, dh0, scale, chunk_offsets=layout.chunk_offsets, BK=BK_state,
            BV=BV_state, HAS_DHT=dht is not None, **common,
        )
        dq = q.new_empty(B, T, HV, K, **f32)
        dk, dkw = torch.empty_like(dq), torch.empty_like(dq)
        dv = torch.empty_like(v)
        dbeta = q.new_empty(B, T, HV, **f32)
        dg = q.new_empty(g.shape if g is not None else (0,), **f32)
        kernels.chunk_grads_kernel[(layout.n_chunks, HV)](
            q, k, kw, v, beta, g_arg, h, dh, ainv, vn, dvn, do, dq, dk, dkw, dv, dbeta, dbeta if g is None else dg,
            scale, chunk_indices=layout.chunk_indices, BK=BK, BV=BV, **common,
        )
    return (_key_heads(dq, H).to(q.dtype), _key_heads(dk, H).to(k.dtype), _key_heads(dkw, H).to(kw.dtype), dv,
            dbeta.to(beta.dtype), dg, dh0)


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("linmix::delta_rule_precond_fwd", mutates_args=())
def _precond_forward_op(
    k: torch.Tensor,
    precond_g: torch.Tensor,
    precond_beta: torch.Tensor,
    precond_center: torch.Tensor,
    x: float,
    eps: float,
    initial_A: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kw, final_A, chunk_A)``, see ``precond_forward``."""
    return precond_forward(k, precond_g, precond_beta, precond_center, x, eps, initial_A, cu_seqlens)


@_precond_forward_op.register_fake
def _precond_forward_fake(k, precond_g, precond_beta, precond_center, x, eps, initial_A, cu_seqlens):
    B, T, H, K = k.shape
    return (k.new_empty(B, T, H, K, dtype=torch.float32),
            k.new_empty(_n_seqs(k, cu_seqlens), H, K, dtype=torch.float32),
            k.new_empty(state_rows(B, T, cu_seqlens), H, K, dtype=torch.float32))


@torch.library.custom_op("linmix::delta_rule_precond_bwd", mutates_args=())
def _precond_backward_op(
    k: torch.Tensor,
    precond_g: torch.Tensor,
    precond_beta: torch.Tensor,
    precond_center: torch.Tensor,
    x: float,
    eps: float,
    a_starts: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    dkw: torch.Tensor,
    da_final: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dk, dprecond_g, dprecond_beta, dprecond_center, dinitial_A)``, see ``precond_backward``."""
    return precond_backward(k, precond_g, precond_beta, precond_center, x, eps, a_starts, cu_seqlens, dkw, da_final)


@_precond_backward_op.register_fake
def _precond_backward_fake(k, precond_g, precond_beta, precond_center, x, eps, a_starts, cu_seqlens, dkw, da_final):
    _, _, H, K = k.shape
    return (k.new_empty(k.shape), precond_g.new_empty(precond_g.shape), precond_beta.new_empty(precond_beta.shape),
            precond_center.new_empty(precond_center.shape),
            k.new_empty(_n_seqs(k, cu_seqlens), H, K, dtype=torch.float32))


def _precond_setup_context(ctx, inputs, output) -> None:
    k, precond_g, precond_beta, precond_center, x, eps, initial_A, cu_seqlens = inputs
    ctx.save_for_backward(k, precond_g, precond_beta, precond_center, initial_A, cu_seqlens, output[2])
    ctx.x, ctx.eps = x, eps
    ctx.set_materialize_grads(False)


def _precond_backward(ctx, dkw, da_final, da_starts):
    """Gradients of the preconditioner op's inputs (none for ``x``, ``eps``, ``cu_seqlens``, an absent ``A``)."""
    k, precond_g, precond_beta, precond_center, initial_A, cu_seqlens, a_starts = ctx.saved_tensors
    if dkw is None:  # only the final statistics were used
        dkw = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dk, dgp, dbp, dcenter, da0 = _precond_backward_op(k, precond_g, precond_beta, precond_center, ctx.x, ctx.eps,
                                                      a_starts, cu_seqlens, dkw, da_final)
    return dk, dgp, dbp, dcenter, None, None, (None if initial_A is None else da0.to(initial_A.dtype)), None


_precond_forward_op.register_autograd(_precond_backward, setup_context=_precond_setup_context)


@torch.library.custom_op("linmix::delta_rule_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    kw: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, final_state, chunk_states, Ai, A_qk, W, Vn)``, see ``delta_rule_forward``."""
    return delta_rule_forward(q, k, kw, v, beta, g, scale, initial_state, cu_seqlens)


@_forward_op.register_fake
def _forward_fake(q, k, kw, v, beta, g, scale, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(v.shape), q.new_empty(_n_seqs(q, cu_seqlens), HV, K, V, **f32),
            q.new_empty(state_rows(B, T, cu_seqlens), HV, K, V, **f32), q.new_empty(B, T, HV, CHUNK, **f32),
            q.new_empty(B, T, HV, CHUNK, **f32), q.new_empty(B, T, HV, K, **f32), q.new_empty(B, T, HV, V, **f32))


@torch.library.custom_op("linmix::delta_rule_bwd", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    kw: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    h: torch.Tensor,
    ainv: torch.Tensor,
    aqk: torch.Tensor,
    w: torch.Tensor,
    vn: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dkw, dv, dbeta, dg, dinitial_state)``, see ``delta_rule_backward``."""
    return delta_rule_backward(q, k, kw, v, beta, g, scale, initial_state, cu_seqlens, do, dfinal_state, h, ainv, aqk,
                               w, vn)


@_backward_op.register_fake
def _backward_fake(q, k, kw, v, beta, g, scale, initial_state, cu_seqlens, do, dfinal_state, h, ainv, aqk, w, vn):
    _, _, _, K = q.shape
    HV, V = v.shape[2:]
    dg = q.new_empty(g.shape if g is not None else (0,), dtype=torch.float32)
    dh0 = q.new_empty(_n_seqs(q, cu_seqlens), HV, K, V, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), kw.new_empty(kw.shape), v.new_empty(v.shape),
            beta.new_empty(beta.shape), dg, dh0)


def _setup_context(ctx, inputs, output) -> None:
    """Keep the inputs and the forward's chunk states, ``Ai``, ``A_qk``, ``W`` and ``Vn`` for the backward."""
    q, k, kw, v, beta, g, scale, initial_state, cu_seqlens = inputs
    _, _, h, ainv, aqk, w, vn = output
    ctx.save_for_backward(q, k, kw, v, beta, g, initial_state, cu_seqlens, h, ainv, aqk, w, vn)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # unused outputs send None, not zeros the size of the kept buffers


def _backward(ctx, do, dfinal_state, dh, dainv, daqk, dw, dvn):
    """Gradients of the forward op's inputs; the kept buffers are outputs only for the backward (gradients None)."""
    q, k, kw, v, beta, g, initial_state, cu_seqlens, h, ainv, aqk, w, vn = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    dq, dk, dkw, dv, dbeta, dg, dh0 = _backward_op(q, k, kw, v, beta, g, ctx.scale, initial_state, cu_seqlens, do,
                                                   dfinal_state, h, ainv, aqk, w, vn)
    return (dq, dk, dkw, dv, dbeta, (None if g is None else dg.to(g.dtype)), None,
            (None if initial_state is None else dh0.to(initial_state.dtype)), None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the last dim, computed in float32 and rounded back to x's dtype."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def triton_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    precond_g: torch.Tensor | None = None,
    precond_beta: torch.Tensor | None = None,
    precond_center: torch.Tensor | None = None,
    *,
    scale: float,
    normalize_qk: bool,
    x: float,
    eps: float,
    initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
):
    """The delta rule on the Triton kernels (CUDA tensors, or any under ``TRITON_INTERPRET=1``).

    Inputs are validated (see ``linmix.ops.delta_rule``); q, k, v and the strengths in float32,
    bfloat16 or float16, the log decays and the centre in float32. The arguments and results are
    ``naive_delta_rule``'s, plus ``cu_seqlens``.
    """
    precond = precond_g is not None
    S0, A0 = None, None
    if initial_state is not None:
        S0, A0 = initial_state if precond else (initial_state, None)
    if normalize_qk:
        q, k = _l2_normalize(q), _l2_normalize(k)
    kw, A = k, None
    if precond:
        kw, A, _ = _precond_forward_op(k, precond_g, precond_beta, precond_center, float(x), float(eps), A0, cu_seqlens)
    o, S, *_ = _forward_op(q, k, kw, v, beta, g, float(scale), S0, cu_seqlens)
    if not output_final_state:
        return o, None
    return o, ((S, A) if precond else S)
