"""Gated KalmaNet on Triton kernels (chunks of 64 positions), wrapped as ``torch.library`` custom ops.

Two custom ops, each with a forward and a backward op (see ``triton_kernels`` for the kernels and their
formulas):

* ``linmix::gated_kalman_solve_fwd`` / ``_bwd``: the Gram states entering every chunk (a sequential pass,
  float32), then per chunk and head in parallel the closed-form norms ``F_t = ||H_t||_F`` (float32, kept
  for the backward) and ``iters`` Chebyshev steps for all rows, on chip: ``x ~ (H_t + ridge F_t I)^{-1} q_t``.
  The backward is implicit differentiation (spec/gated_kalmanet.md §2): the same solve kernel on the
  cotangent (``w = A^{-1} dx``, the saved ``F``; ``dq = w``), the Gram states' gradient back over the
  chunks (from the final state's cotangent and down to the initial state's), and per chunk the
  gradients of the keys and decays through ``H_t`` and the ridge ``ridge ||H_t||_F``.
* ``linmix::gated_kalman_readout_fwd`` / ``_bwd``: scalar-gated linear attention
  ``o = scale U_t^T q_mix`` (the key-value states entering every chunk, then every chunk's outputs), and
  its backward (the states' gradient back over the chunks, then ``dq, dk, dv, dg`` per chunk).

Every pass over positions, the solves included, is a Triton kernel. PyTorch does the elementwise steps
between the ops, with autograd: the strengths (``k, v <- beta k, beta v``, in float32, so ``dbeta`` comes
from the keys' and values' gradients) and the mix ``q_mix = q + alpha (x - q)`` (``dalpha``, and ``dx =
alpha dq_mix``). The forward keeps for the backward, per position and head: ``x`` (K floats), ``F``; per
chunk the Gram states ``[K, K]`` and key-value states ``[K, V]`` (float32). Packed sequences
(``cu_seqlens``) run in the same launches. Every op has a fake implementation and an autograd formula,
so ``torch.compile(fullgraph=True)`` traces through them.

Limits: ``K <= 128`` (a chunk's solve holds the whole ``[K, K]`` Gram state and ``[64, K]`` iterates);
float32, bfloat16 and float16 inputs (float64 runs on ``chunk``), computed in float32 (products in TF32
for 16-bit inputs). Checked against the reference in Triton's CPU interpreter (CI) and on an H200
(``pytest -m gpu``); the warps per kernel are first guesses, not tuned.
"""

import functools
import importlib

import torch

from linmix.ops.common.triton import (
    ChunkLayout,
    cdiv,
    chunk_layout,
    interpreting,
    launch_device,
    sequence_count,
    sequential_block_v,
    tile_size,
)
from linmix.ops.common.triton import state_rows as common_state_rows
from linmix.ops.gated_kalman.naive import State
from linmix.ops.gated_kalman.solve import FLOOR

CHUNK = 64  # positions per chunk (BT)
MAX_K = 128  # the per-chunk kernels hold all K key channels of a head
MAX_STATE_BLOCK = 64  # largest tile of either dimension of the state passes
MAX_GRADS_BLOCK = 64  # largest key tile of the per-chunk gradient kernels (their operands fit in shared memory)
MAX_BLOCK_V = 64  # largest value tile of the per-chunk readout kernels
# Warps and pipeline stages per kernel: not tuned on a GPU, chosen so that every kernel compiles for sm_90
# within its shared memory (227 KiB) at K = V = 128 (checked with triton.compile for that target, without
# a device): the solve holds the [K, K] Gram state and [64, K] iterates; one stage for the per-chunk
# gradients, whose loops over key tiles would otherwise keep three copies of their tiles.
LAUNCH = {
    "states": dict(num_warps=4, num_stages=2),
    "solve": dict(num_warps=8, num_stages=1),
    "output": dict(num_warps=4, num_stages=1),
    "dstates": dict(num_warps=4, num_stages=2),
    "solve_grads": dict(num_warps=8, num_stages=1),
    "readout_grads": dict(num_warps=8, num_stages=1),
}
F32 = dict(dtype=torch.float32)


@functools.cache
def _kernels():
    """The kernel module, imported at the first launch (``TRITON_INTERPRET=1`` may be set after ``import linmix``)."""
    return importlib.import_module("linmix.ops.gated_kalman.triton_kernels")


def state_rows(B: int, T: int, cu_seqlens: torch.Tensor | None) -> int:
    """Rows of the per-chunk state buffers (see ``linmix.ops.common.triton.state_rows``)."""
    return common_state_rows(B, T, cu_seqlens, CHUNK)


def precision_for(dtype: torch.dtype) -> str:
    """The kernels' matrix-product precision for inputs of ``dtype``: ``ieee`` (exact float32) for float32
    inputs and in Triton's interpreter, ``tf32`` for 16-bit ones. The operands are float32 either way."""
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def _key_block(K: int) -> int:
    """The key tile of the per-chunk kernels: all of ``K``.

    Raises:
        ValueError: ``K > MAX_K``.
    """
    if K > MAX_K:
        raise ValueError(f"backend 'triton' of gated_kalman takes K <= {MAX_K} key channels, got K={K}; "
                         "pass backend='chunk' for wider heads")
    return tile_size(K, None, MAX_K)


def _state_blocks(x: torch.Tensor, layout: ChunkLayout, H: int, K: int, Y: int) -> tuple[int, int]:
    """``(BK, BY)`` of a state pass over ``[K, Y]`` states: 64 at most, ``BY`` halved while the GPU has idle units."""
    BK = tile_size(K, None, MAX_STATE_BLOCK)
    return BK, sequential_block_v(x, cdiv(K, BK) * layout.n_seqs * H, Y, tile_size(Y, None, MAX_STATE_BLOCK), None)


def _varlen(layout: ChunkLayout) -> dict:
    """The kernels' arguments that locate sequences and chunks."""
    return dict(cu_seqlens=layout.cu_seqlens, T=layout.T, NT=layout.NT, IS_VARLEN=layout.varlen)


def _chunk_states(k: torch.Tensor, y: torch.Tensor, g: torch.Tensor, initial: torch.Tensor | None,
                  layout: ChunkLayout, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The states ``[K, Y]`` entering every chunk ``[state_rows, H, K, Y]`` and the final ones ``[N, H, K, Y]``
    (float32) of ``S_t = exp(g_t) S_{t-1} + k_t y_t^T``."""
    B, T, H, K = k.shape
    Y = y.shape[-1]
    BK, BY = _state_blocks(k, layout, H, K, Y)
    states = k.new_empty(state_rows(B, T, layout.cu_seqlens), H, K, Y, **F32)
    final = k.new_empty(layout.n_seqs, H, K, Y, **F32)
    s0 = None if initial is None else initial.float().contiguous()
    _kernels().chunk_states_kernel[(cdiv(K, BK), cdiv(Y, BY), layout.n_seqs * H)](
        k, y, g, s0, states, final, chunk_offsets=layout.chunk_offsets, H=H, K=K, Y=Y, BT=CHUNK, BK=BK, BY=BY,
        HAS_S0=s0 is not None, PRECISION=precision, **_varlen(layout), **LAUNCH["states"],
    )
    return states, final


def _solve_args(ridge: float, iters: int) -> dict:
    """The solve kernel's scalars: the ridge, the floor of ``||H||_F^2``, ``rho^2 / 4`` and the steps."""
    rho = 1.0 / (1.0 + 2.0 * ridge)
    return dict(ridge=ridge, floor_sq=FLOOR * FLOOR, quarter_rho_sq=0.25 * rho * rho, iters=iters)


# ---- the solve ------------------------------------------------------------------------------------------


def solve_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    ridge: float,
    iters: int,
    initial_H: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the solve's forward kernels.

    Args:
        q: queries ``[B, T, H, K]`` (any floating dtype but float64).
        k: keys ``[B, T, H, K]``, strengths applied.
        g: log decays ``[B, T, H]`` float32.
        ridge: ``lambda_t = ridge * ||H_t||_F``.
        iters: Chebyshev steps.
        initial_H: ``[N, H, K, K]`` or None for zeros.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (``B = 1``), or None.
        precision: the matrix products' ``input_precision`` (``precision_for``).

    Returns:
        ``x [B, T, H, K]``, the final Gram states ``[N, H, K, K]``, those entering every chunk
        ``[state_rows, H, K, K]`` and the norms ``F [B, T, H]``, all float32.
    """
    B, T, H, K = q.shape
    BK = _key_block(K)
    q, k, g = q.contiguous(), k.contiguous(), g.contiguous()
    with launch_device(q):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        chunk_H, final_H = _chunk_states(k, k, g, initial_H, layout, precision)
        norms = q.new_empty(B, T, H, **F32)
        x = q.new_empty(B, T, H, K, **F32)
        _kernels().chunk_solve_kernel[(layout.n_chunks, H)](
            q, k, g, chunk_H, norms, x, x, norms, **_solve_args(ridge, iters), chunk_indices=layout.chunk_indices,
            H=H, K=K, BT=CHUNK, BK=BK, BACKWARD=False, PRECISION=precision, **_varlen(layout), **LAUNCH["solve"],
        )
    return x, final_H, chunk_H, norms


def solve_backward(
    k: torch.Tensor,
    g: torch.Tensor,
    ridge: float,
    iters: int,
    cu_seqlens: torch.Tensor | None,
    precision: str,
    dx: torch.Tensor,
    dfinal_H: torch.Tensor | None,
    chunk_H: torch.Tensor,
    norms: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the solve's backward kernels on what the forward kept (see ``solve_forward``).

    Args:
        dx: the gradient of ``x`` ``[B, T, H, K]``.
        dfinal_H: the gradient of the final Gram states ``[N, H, K, K]``, or None for zeros.

    Returns:
        ``dq``, ``dk`` ``[B, T, H, K]``, ``dg [B, T, H]`` and the initial Gram states' gradient
        ``[N, H, K, K]``, all float32.
    """
    B, T, H, K = k.shape
    BK = _key_block(K)
    k, g, dx = k.contiguous(), g.contiguous(), dx.contiguous()
    kernels = _kernels()
    with launch_device(k):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        w = torch.empty_like(x)
        u = torch.empty_like(norms)
        kernels.chunk_solve_kernel[(layout.n_chunks, H)](
            dx, k, g, chunk_H, norms, w, x, u, **_solve_args(ridge, iters), chunk_indices=layout.chunk_indices,
            H=H, K=K, BT=CHUNK, BK=BK, BACKWARD=True, PRECISION=precision, **_varlen(layout), **LAUNCH["solve"],
        )
        dH = torch.empty_like(chunk_H)
        dinitial_H = k.new_empty(layout.n_seqs, H, K, K, **F32)
        dfinal = None if dfinal_H is None else dfinal_H.float().contiguous()
        BK_state, BY = _state_blocks(k, layout, H, K, K)
        kernels.chunk_dstates_kernel[(cdiv(K, BK_state), cdiv(K, BY), layout.n_seqs * H)](
            w, x, g, u, k, chunk_H, dfinal, dH, dinitial_H, -1.0, chunk_offsets=layout.chunk_offsets, H=H, K=K, Y=K,
            BT=CHUNK, BK=BK_state, BY=BY, GRAM=True, HAS_DFINAL=dfinal is not None, PRECISION=precision,
            **_varlen(layout), **LAUNCH["dstates"],
        )
        dk = torch.empty_like(w)
        dg = torch.empty_like(u)
        kernels.chunk_solve_grads_kernel[(layout.n_chunks, H)](
            k, g, w, x, u, chunk_H, dH, dk, dg, chunk_indices=layout.chunk_indices, H=H, K=K, BT=CHUNK,
            BK=tile_size(K, None, MAX_GRADS_BLOCK), PRECISION=precision, **_varlen(layout), **LAUNCH["solve_grads"],
        )
    return w, dk, dg, dinitial_H


# ---- the readout ------------------------------------------------------------------------------------------


def readout_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_U: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the readout's forward kernels: ``o_t = scale U_t^T q_t``, ``U_t = exp(g_t) U_{t-1} + k_t v_t^T``.

    Args:
        q: readout queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        g: log decays ``[B, T, H]`` float32.
        scale: factor of the outputs.
        initial_U: ``[N, H, K, V]`` or None for zeros.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (``B = 1``), or None.
        precision: the matrix products' ``input_precision``.

    Returns:
        ``o [B, T, H, V]`` in v's dtype, the final states ``[N, H, K, V]`` and the states entering every
        chunk ``[state_rows, H, K, V]`` (float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _key_block(K), tile_size(V, None, MAX_BLOCK_V)
    q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()
    with launch_device(q):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        chunk_U, final_U = _chunk_states(k, v, g, initial_U, layout, precision)
        o = torch.empty_like(v)
        _kernels().chunk_output_kernel[(cdiv(V, BV), layout.n_chunks, H)](
            q, k, v, g, chunk_U, o, scale, chunk_indices=layout.chunk_indices, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
            PRECISION=precision, **_varlen(layout), **LAUNCH["output"],
        )
    return o, final_U, chunk_U


def readout_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    precision: str,
    do: torch.Tensor,
    dfinal_U: torch.Tensor | None,
    chunk_U: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the readout's backward kernels (see ``readout_forward``).

    Args:
        do: the gradient of ``o`` ``[B, T, H, V]``.
        dfinal_U: the gradient of the final states ``[N, H, K, V]``, or None for zeros.
        chunk_U: the forward's states entering every chunk.

    Returns:
        ``dq``, ``dk`` ``[B, T, H, K]`` float32, ``dv`` in v's dtype, ``dg [B, T, H]`` float32 and the
        initial states' gradient ``[N, H, K, V]`` float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = tile_size(K, None, MAX_GRADS_BLOCK), tile_size(V, None, MAX_BLOCK_V)
    q, k, v, g, do = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), do.contiguous()
    kernels = _kernels()
    with launch_device(q):
        layout = chunk_layout(B, T, cu_seqlens, CHUNK)
        dU = torch.empty_like(chunk_U)
        dinitial_U = q.new_empty(layout.n_seqs, H, K, V, **F32)
        dfinal = None if dfinal_U is None else dfinal_U.float().contiguous()
        BK_state, BY = _state_blocks(q, layout, H, K, V)
        kernels.chunk_dstates_kernel[(cdiv(K, BK_state), cdiv(V, BY), layout.n_seqs * H)](
            q, do, g, None, None, None, dfinal, dU, dinitial_U, scale, chunk_offsets=layout.chunk_offsets, H=H, K=K,
            Y=V, BT=CHUNK, BK=BK_state, BY=BY, GRAM=False, HAS_DFINAL=dfinal is not None, PRECISION=precision,
            **_varlen(layout), **LAUNCH["dstates"],
        )
        dq = q.new_empty(B, T, H, K, **F32)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(v)
        dg = q.new_empty(B, T, H, **F32)
        kernels.chunk_readout_grads_kernel[(layout.n_chunks, H)](
            q, k, v, g, chunk_U, dU, do, dq, dk, dv, dg, scale, chunk_indices=layout.chunk_indices, H=H, K=K, V=V,
            BT=CHUNK, BK=BK, BV=BV, PRECISION=precision, **_varlen(layout), **LAUNCH["readout_grads"],
        )
    return dq, dk, dv, dg, dinitial_U


# ---- custom ops ---------------------------------------------------------------------------------------------


@torch.library.custom_op("linmix::gated_kalman_solve_fwd", mutates_args=())
def _solve_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    ridge: float,
    iters: int,
    initial_H: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, final_H, chunk_H, norms)``, see ``solve_forward``."""
    return solve_forward(q, k, g, ridge, iters, initial_H, cu_seqlens, precision)


@_solve_forward_op.register_fake
def _solve_forward_fake(q, k, g, ridge, iters, initial_H, cu_seqlens, precision):
    B, T, H, K = q.shape
    return (q.new_empty(B, T, H, K, **F32), q.new_empty(sequence_count(q, cu_seqlens), H, K, K, **F32),
            q.new_empty(state_rows(B, T, cu_seqlens), H, K, K, **F32), q.new_empty(B, T, H, **F32))


@torch.library.custom_op("linmix::gated_kalman_solve_bwd", mutates_args=())
def _solve_backward_op(
    k: torch.Tensor,
    g: torch.Tensor,
    ridge: float,
    iters: int,
    cu_seqlens: torch.Tensor | None,
    precision: str,
    dx: torch.Tensor,
    dfinal_H: torch.Tensor | None,
    chunk_H: torch.Tensor,
    norms: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dg, dinitial_H)``, see ``solve_backward``."""
    return solve_backward(k, g, ridge, iters, cu_seqlens, precision, dx, dfinal_H, chunk_H, norms, x)


@_solve_backward_op.register_fake
def _solve_backward_fake(k, g, ridge, iters, cu_seqlens, precision, dx, dfinal_H, chunk_H, norms, x):
    _, _, H, K = k.shape
    return (k.new_empty(k.shape, **F32), k.new_empty(k.shape, **F32), g.new_empty(g.shape, **F32),
            k.new_empty(sequence_count(k, cu_seqlens), H, K, K, **F32))


def _solve_setup_context(ctx, inputs, output) -> None:
    """Keep the keys, decays, chunk states, norms and ``x`` for the backward."""
    q, k, g, ridge, iters, initial_H, cu_seqlens, precision = inputs
    x, _, chunk_H, norms = output
    ctx.save_for_backward(k, g, cu_seqlens, chunk_H, norms, x)
    ctx.ridge, ctx.iters, ctx.precision = ridge, iters, precision
    ctx.dtypes = (q.dtype, None if initial_H is None else initial_H.dtype)
    ctx.set_materialize_grads(False)  # unused outputs send None, not zeros the size of the kept buffers


def _solve_backward(ctx, dx, dfinal_H, dchunk_H, dnorms):
    """Gradients of the solve op's inputs; the chunk states and norms are outputs for the backward only."""
    k, g, cu_seqlens, chunk_H, norms, x = ctx.saved_tensors
    q_dtype, initial_dtype = ctx.dtypes
    if dx is None:  # only the final state was used
        dx = torch.zeros_like(x)
    dq, dk, dg, dinitial_H = _solve_backward_op(k, g, ctx.ridge, ctx.iters, cu_seqlens, ctx.precision, dx, dfinal_H,
                                                chunk_H, norms, x)
    return (dq.to(q_dtype), dk.to(k.dtype), dg.to(g.dtype), None, None,
            None if initial_dtype is None else dinitial_H.to(initial_dtype), None, None)


_solve_forward_op.register_autograd(_solve_backward, setup_context=_solve_setup_context)


@torch.library.custom_op("linmix::gated_kalman_readout_fwd", mutates_args=())
def _readout_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_U: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, final_U, chunk_U)``, see ``readout_forward``."""
    return readout_forward(q, k, v, g, scale, initial_U, cu_seqlens, precision)


@_readout_forward_op.register_fake
def _readout_forward_fake(q, k, v, g, scale, initial_U, cu_seqlens, precision):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (v.new_empty(v.shape), q.new_empty(sequence_count(q, cu_seqlens), H, K, V, **F32),
            q.new_empty(state_rows(B, T, cu_seqlens), H, K, V, **F32))


@torch.library.custom_op("linmix::gated_kalman_readout_bwd", mutates_args=())
def _readout_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    precision: str,
    do: torch.Tensor,
    dfinal_U: torch.Tensor | None,
    chunk_U: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dg, dinitial_U)``, see ``readout_backward``."""
    return readout_backward(q, k, v, g, scale, cu_seqlens, precision, do, dfinal_U, chunk_U)


@_readout_backward_op.register_fake
def _readout_backward_fake(q, k, v, g, scale, cu_seqlens, precision, do, dfinal_U, chunk_U):
    _, _, H, K = q.shape
    return (q.new_empty(q.shape, **F32), k.new_empty(k.shape, **F32), v.new_empty(v.shape),
            g.new_empty(g.shape, **F32), q.new_empty(sequence_count(q, cu_seqlens), H, K, v.shape[-1], **F32))


def _readout_setup_context(ctx, inputs, output) -> None:
    """Keep the inputs and the chunk states for the backward."""
    q, k, v, g, scale, initial_U, cu_seqlens, precision = inputs
    ctx.save_for_backward(q, k, v, g, cu_seqlens, output[2])
    ctx.scale, ctx.precision = scale, precision
    ctx.initial_dtype = None if initial_U is None else initial_U.dtype
    ctx.set_materialize_grads(False)


def _readout_backward(ctx, do, dfinal_U, dchunk_U):
    """Gradients of the readout op's inputs; the chunk states are an output for the backward only."""
    q, k, v, g, cu_seqlens, chunk_U = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dinitial_U = _readout_backward_op(q, k, v, g, ctx.scale, cu_seqlens, ctx.precision, do, dfinal_U,
                                                      chunk_U)
    return (dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), None,
            None if ctx.initial_dtype is None else dinitial_U.to(ctx.initial_dtype), None, None)


_readout_forward_op.register_autograd(_readout_backward, setup_context=_readout_setup_context)


def triton_gated_kalman(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    ridge: float,
    iters: int,
    scale: float,
    initial_state: State | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Gated KalmaNet on the Triton kernels (CUDA tensors, or any under ``TRITON_INTERPRET=1``).

    Inputs are validated (see ``linmix.ops.gated_kalman``): q, k, v, beta and alpha in float32, bfloat16
    or float16, the log decays in float32. The arguments and results are ``naive_gated_kalman``'s, plus
    ``cu_seqlens``; the states are float32.

    Raises:
        ValueError: ``K > 128``.
    """
    precision = precision_for(q.dtype)
    initial_H, initial_U = (None, None) if initial_state is None else initial_state
    strength = beta.float()[..., None]
    k_scaled, v_scaled = strength * k.float(), strength * v.float()  # [B, T, H, K], [B, T, H, V] float32
    x, final_H, _, _ = _solve_forward_op(q, k_scaled, g, float(ridge), int(iters), initial_H, cu_seqlens, precision)
    readout = x if alpha is None else q + alpha.float()[..., None] * (x - q)  # [B, T, H, K] float32
    o, final_U, _ = _readout_forward_op(readout, k_scaled, v_scaled, g, float(scale), initial_U, cu_seqlens, precision)
    return o.to(v.dtype), ((final_H, final_U) if output_final_state else None)
