"""The delta rule (DN, GDN, KDA and their preconditioned forms) on Triton kernels, as ``torch.library`` custom ops.

The chunked WY form of ``chunk.py`` in chunks of 64 positions (see ``triton_kernels`` for the kernels
and their formulas):

* with a preconditioner, the key statistics ``A`` are ``decayed_attention``'s chunked kernels (a
  decayed cumulative sum of ``betaP k^2``, see ``preconditioned_keys``) and the write keys
  ``gain(A_t) k_t`` elementwise, differentiated by autograd;
* ``linmix::delta_rule_fwd`` / ``_bwd``: per chunk the triangular solve (``Ai = (I + A_kk)^-1``), ``W``,
  ``U`` and the query-key interaction ``A_qk``; the sequential state pass (chunk states and the
  corrected values ``Vn``); the outputs. The backward runs the state gradient back over the chunks
  and then every chunk's gradients in parallel, all in Triton.

The forward keeps for the backward, float32 per position and value head: ``Ai`` and ``A_qk`` (64
each), ``W`` (K), ``Vn`` (V), and the chunk states (``K V / 64``): about ``(128 + K + V + K V / 64) * 4``
bytes, 2.5 KiB at K = V = 128; the preconditioner adds its statistics and write keys (``8 K`` per
position and key head). The backward recomputes only the decays' in-chunk sums.

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

from linmix.ops.common.triton import (
    cdiv,
    chunk_layout,
    dot_options,
    launch_device,
    sequence_count,
    sequential_block_v,
    tile_size,
)
from linmix.ops.common.triton import state_rows as common_state_rows
from linmix.ops.decayed_attention import decayed_attention

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


def preconditioned_keys(
    k: torch.Tensor,
    precond_g: torch.Tensor,
    precond_beta: torch.Tensor,
    precond_center: torch.Tensor,
    x: float,
    eps: float,
    initial_A: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The write keys ``kw = gain(A_t) k_t`` and the final key statistics, differentiable.

    The statistics ``A_t = exp(gP_t) A_{t-1} + betaP_t k_t^2`` (per key channel, one decay per key
    head) are a decayed causal sum, ``sum_{s <= t} exp(gP_{s+1} + ... + gP_t) betaP_s k_s^2``: the
    decayed attention of one key channel of ones over the values ``betaP k^2``, which its chunked
    Triton kernels compute in parallel over the chunks (forward and backward) in float32. The gain
    ``exp(-log(x) r / (1 + |r|))``, ``r = log(A_t + eps) - center``, is elementwise.

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
        The write keys ``[B, T, H, K]`` and the final ``A [N, H, K]``, float32.
    """
    B, T, H, K = k.shape
    k32 = k.float()
    ones = k32.new_ones(B, T, H, 1)
    written = precond_beta.float()[..., None] * k32.square()  # [B, T, H, K]
    A0 = None if initial_A is None else initial_A.float()[:, :, None, :]  # [N, H, 1, K]
    A, A_final = decayed_attention(ones, ones, written, precond_g.float()[..., None], scale=1.0, initial_state=A0,
                                   output_final_state=True, cu_seqlens=cu_seqlens, backend="triton",
                                   check_values=False)  # A [B, T, H, K], A_final [N, H, 1, K]
    r = torch.log(A + eps) - precond_center.float()[:, None]
    gain = torch.exp(-math.log(x) * r / (1.0 + r.abs()))
    return gain * k32, A_final[:, :, 0]


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
    return (v.new_empty(v.shape), q.new_empty(sequence_count(q, cu_seqlens), HV, K, V, **f32),
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
    dh0 = q.new_empty(sequence_count(q, cu_seqlens), HV, K, V, dtype=torch.float32)
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
        kw, A = preconditioned_keys(k, precond_g, precond_beta, precond_center, float(x), float(eps), A0, cu_seqlens)
    o, S, *_ = _forward_op(q, k, kw, v, beta, g, float(scale), S0, cu_seqlens)
    if not output_final_state:
        return o, None
    return o, ((S, A) if precond else S)
