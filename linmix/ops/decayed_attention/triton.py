"""Decayed attention on fused Triton kernels, wrapped as ``torch.library`` custom ops.

The forward runs the state recurrence over chunks of 64 positions (``chunk_states_kernel``, which
also sums a per-token log decay within every chunk), the in-chunk scores (``chunk_scores_kernel``)
and then every chunk's output in parallel (``chunk_output_kernel``). It keeps the chunk states, the
scores and the summed decays for the backward (float32, about ``4 K V / 64 + 256 + 4 K`` bytes per
position and head), which therefore recomputes none of them: it runs the state gradient backwards
(``chunk_dstates_kernel``) and then ``dA``, ``dv``, the in-chunk parts of ``dq, dk`` per sub-block
and ``dq, dk, dlog_gamma`` per chunk in parallel. Packed sequences (``cu_seqlens``) run in the same
launches. The ops ``linmix::decayed_attention_fwd`` and ``linmix::decayed_attention_bwd`` have
fake implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through
them without a graph break.
"""

import functools
import importlib

import torch

from linmix.ops.common.triton import (
    ChunkLayout,
    cdiv,
    chunk_layout,
    dot_options,
    launch_device,
    sequence_count,
    sequential_block_v,
    tile_size,
)
from linmix.ops.common.triton import state_rows as common_state_rows

CHUNK = 64  # positions per chunk (BT)
SUB_BLOCK = 16  # positions per sub-block inside a chunk (BC)
MAX_BLOCK_K = 64  # largest tile of the key channels
MAX_INTRA_BLOCK_K = 32  # largest key tile of dqk_intra: more, smaller programs ran faster on the H100
MAX_BLOCK_V = 64  # largest tile of the value channels
# Warps and pipeline stages of every kernel (by name, without "chunk_" and "_kernel"): the fastest of
# 1, 2, 4 or 8 warps and 1 to 3 stages on an H100 at fla's and the K2 layer's shapes (docs/PERFORMANCE.md).
LAUNCH = {
    "states": dict(num_warps=4, num_stages=3),
    "scores": dict(num_warps=2, num_stages=1),
    "output": dict(num_warps=4, num_stages=2),
    "dstates": dict(num_warps=8, num_stages=1),
    "dscores": dict(num_warps=4, num_stages=2),
    "dv": dict(num_warps=4, num_stages=2),
    "dqk_intra": dict(num_warps=2, num_stages=1),
    "dqk": dict(num_warps=8, num_stages=1),
}


@functools.cache
def _kernels():
    """The kernel module, and with it triton, imported at the first launch rather than with linmix.

    Triton decides when its functions are decorated whether to interpret them
    (``TRITON_INTERPRET=1``), so importing late lets a test switch the interpreter on after
    ``import linmix``.
    """
    return importlib.import_module("linmix.ops.decayed_attention.triton_kernels")


def _sequential_block_v(x: torch.Tensor, K: int, V: int, n_seqs: int, H: int, BK: int, BV: int,
                        block_v: int | None) -> int:
    """The ``BV`` tile of the state passes: one program per ``(BK, BV)`` tile, sequence and head."""
    return sequential_block_v(x, cdiv(K, BK) * n_seqs * H, V, BV, block_v)


def _layout(B: int, T: int, cu_seqlens: torch.Tensor | None) -> ChunkLayout:
    """The layout of the batch in chunks of ``CHUNK`` positions."""
    return chunk_layout(B, T, cu_seqlens, CHUNK)


def state_rows(B: int, T: int, cu_seqlens: torch.Tensor | None) -> int:
    """Rows of the chunk-state buffers (see ``linmix.ops.common.triton.state_rows``)."""
    return common_state_rows(B, T, cu_seqlens, CHUNK)


def _diagonal_options(dtype: torch.dtype) -> dict:
    """``dot_options`` plus how the products inside a sub-block multiply (``DIAG_PRECISION``, ``DIAG_DTYPE``).

    Their operands carry factors up to ``exp(60)``, beyond float16's range, and feed ``dlog_gamma``,
    whose sums cancel: 16-bit inputs multiply there in TF32 (float32 range, 10-bit mantissa).
    """
    options = dot_options(dtype)
    tl = importlib.import_module("triton.language")
    precision = "tf32" if options["DOT_DTYPE"] != tl.float32 else options["PRECISION"]
    return dict(options, DIAG_PRECISION=precision, DIAG_DTYPE=tl.float32)


def _chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    initial_state: torch.Tensor | None,
    layout: ChunkLayout,
    BK: int,
    BV: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk states, the final states and the decay operand of the other kernels.

    Returns:
        The float32 state entering every chunk ``[state_rows, H, K, V]``, the final states
        ``[n_seqs, H, K, V]`` and the decay: for a constant ``log_gamma [H, K]`` itself (contiguous;
        the kernels expand it), for a per-token ``[B, T, H, K]`` its in-chunk cumulative sum
        (float32, same shape).
    """
    B, T, H, K = k.shape
    V = v.shape[3]
    const = log_gamma.dim() == 2
    log_gamma = log_gamma.contiguous()
    decay = log_gamma if const else log_gamma.new_empty(log_gamma.shape, dtype=torch.float32)
    h = k.new_empty(state_rows(B, T, layout.cu_seqlens), H, K, V, dtype=torch.float32)
    ht = k.new_empty(layout.n_seqs, H, K, V, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    _kernels().chunk_states_kernel[(cdiv(K, BK), cdiv(V, BV), layout.n_seqs * H)](
        k, v, log_gamma, decay, h0, h, ht, layout.cu_seqlens, layout.chunk_offsets, layout.T, layout.NT, H, K, V,
        BT=CHUNK, BK=BK, BV=BV, CONST=const, HAS_H0=initial_state is not None, IS_VARLEN=layout.varlen,
        **dot_options(k.dtype), **LAUNCH["states"],
    )
    return h, ht, decay


def _chunk_scores(q: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, const: bool, layout: ChunkLayout,
                  BK: int) -> torch.Tensor:
    """The in-chunk scores ``[B, T, H, CHUNK]`` float32 (row ``t`` against its chunk's keys, causal part only)."""
    B, T, H, K = q.shape
    A = q.new_empty(B, T, H, CHUNK, dtype=torch.float32)
    _kernels().chunk_scores_kernel[(CHUNK // SUB_BLOCK, layout.n_chunks, H)](
        q, k, decay, decay, A, layout.cu_seqlens, layout.chunk_indices, layout.T, layout.NT, H, K,
        BT=CHUNK, BC=SUB_BLOCK, BK=BK, CONST=const, IS_VARLEN=layout.varlen, **_diagonal_options(q.dtype),
        **LAUNCH["scores"],
    )
    return A


def decayed_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels.

    Args:
        q: queries, ``[B, T, H, K]`` in float32, bfloat16 or float16.
        k: keys, ``[B, T, H, K]``, dtype of ``q``.
        v: values, ``[B, T, H, V]``, dtype of ``q``.
        log_gamma: log decay ``<= 0``, ``[H, K]`` (constant) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[N, H, K, V]`` or None for zeros (``N = B``, or the number of sequences).
        cu_seqlens: ``[N + 1]`` starts of the packed sequences (``B = 1``), or None.
        block_k: tile of the key channels (a power of two >= 16); None picks one per kernel.
        block_v: tile of the value channels (a power of two >= 16); None picks one per kernel.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in ``v``'s dtype, the final states ``[N, H, K, V]`` float32,
        and for the backward the chunk states ``[state_rows, H, K, V]``, the in-chunk scores
        ``[B, T, H, CHUNK]`` and the in-chunk cumulative sum of a per-token ``log_gamma``
        ``[B, T, H, K]`` (all float32; the sum is empty ``[0]`` for a constant decay).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    BK, BV = tile_size(K, block_k, MAX_BLOCK_K), tile_size(V, block_v, MAX_BLOCK_V)
    const = log_gamma.dim() == 2
    with launch_device(q):
        layout = _layout(B, T, cu_seqlens)
        BV_states = _sequential_block_v(q, K, V, layout.n_seqs, H, BK, BV, block_v)
        h, final_state, decay = _chunk_states(k, v, log_gamma, initial_state, layout, BK, BV_states)
        A = _chunk_scores(q, k, decay, const, layout, BK)
        o = torch.empty_like(v)
        _kernels().chunk_output_kernel[(cdiv(V, BV), layout.n_chunks, H)](
            q, v, decay, decay, h, A, o, scale, layout.cu_seqlens, layout.chunk_indices, T, layout.NT, H, K, V,
            BT=CHUNK, BK=BK, BV=BV, CONST=const, IS_VARLEN=layout.varlen, **dot_options(q.dtype),
            **LAUNCH["output"],
        )
    return o, final_state, h, A, (decay.new_empty(0, dtype=torch.float32) if const else decay)


def decayed_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    h: torch.Tensor,
    A: torch.Tensor,
    cumulative_decay: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on the chunk states, scores and decays that the forward kept.

    Args:
        q, k, v, log_gamma, scale, initial_state, cu_seqlens: the forward's arguments (see
            ``decayed_attention_forward``).
        do: gradient of ``o``, ``[B, T, H, V]``.
        dfinal_state: gradient of the final states ``[N, H, K, V]``, or None for zeros.
        h: the forward's chunk states, ``[state_rows, H, K, V]`` float32.
        A: the forward's in-chunk scores, ``[B, T, H, CHUNK]`` float32.
        cumulative_decay: the forward's in-chunk cumulative sum of a per-token ``log_gamma`` (unused
            for a constant one).
        block_k: tile of the key channels (a power of two >= 16); None picks one per kernel.
        block_v: tile of the value channels (a power of two >= 16); None picks one per kernel.

    Returns:
        ``dq``, ``dk``, ``dv`` in their inputs' dtypes, ``dlog_gamma`` in the shape and dtype of
        ``log_gamma`` (the per-token gradient summed over ``B`` and ``T`` for a constant decay) and
        the gradient of the initial states ``[N, H, K, V]`` float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    BK, BV = tile_size(K, block_k, MAX_BLOCK_K), tile_size(V, block_v, MAX_BLOCK_V)
    const = log_gamma.dim() == 2
    decay = log_gamma.contiguous() if const else cumulative_decay
    dots = dot_options(q.dtype)
    kernels = _kernels()
    with launch_device(q):
        layout = _layout(B, T, cu_seqlens)
        varlen = dict(cu_seqlens=layout.cu_seqlens, T=T, NT=layout.NT, IS_VARLEN=layout.varlen)
        dh = torch.empty_like(h)
        dh0 = q.new_empty(layout.n_seqs, H, K, V, dtype=torch.float32)
        dht = None if dfinal_state is None else dfinal_state.float().contiguous()
        BV_states = _sequential_block_v(q, K, V, layout.n_seqs, H, BK, BV, block_v)
        kernels.chunk_dstates_kernel[(cdiv(K, BK), cdiv(V, BV_states), layout.n_seqs * H)](
            q, decay, decay, do, dht, dh, dh0, scale, chunk_offsets=layout.chunk_offsets, H=H, K=K, V=V,
            BT=CHUNK, BK=BK, BV=BV_states, CONST=const, HAS_DHT=dfinal_state is not None, **dots,
            **varlen, **LAUNCH["dstates"],
        )
        per_chunk = dict(chunk_indices=layout.chunk_indices, H=H, BT=CHUNK, **varlen)
        dA = torch.empty_like(A)
        kernels.chunk_dscores_kernel[(1, layout.n_chunks, H)](
            v, do, dA, scale, V=V, BV=BV, **per_chunk, **dots, **LAUNCH["dscores"]
        )
        dv = torch.empty_like(v)
        kernels.chunk_dv_kernel[(cdiv(V, BV), layout.n_chunks, H)](
            k, decay, decay, do, dh, A, dv, scale, K=K, V=V, BK=BK, BV=BV, CONST=const, **per_chunk, **dots,
            **LAUNCH["dv"],
        )
        dq_inside = q.new_empty(B, T, H, K, dtype=torch.float32)
        dk_inside = torch.empty_like(dq_inside)
        BK_intra = tile_size(K, block_k, MAX_INTRA_BLOCK_K)
        kernels.chunk_dqk_intra_kernel[(cdiv(K, BK_intra), layout.n_chunks * (CHUNK // SUB_BLOCK), H)](
            q, k, decay, decay, dA, dq_inside, dk_inside, K=K, BC=SUB_BLOCK, BK=BK_intra, CONST=const, **per_chunk,
            **_diagonal_options(q.dtype), **LAUNCH["dqk_intra"],
        )
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dg = q.new_empty(B, T, H, K, dtype=torch.float32 if const else log_gamma.dtype)
        kernels.chunk_dqk_kernel[(cdiv(K, BK), layout.n_chunks, H)](
            q, k, v, decay, decay, h, do, dh, dA, dq_inside, dk_inside, dq, dk, dg, scale, K=K, V=V, BK=BK, BV=BV,
            CONST=const, **per_chunk, **dots, **LAUNCH["dqk"],
        )
    if const:
        dg = dg.sum(dim=(0, 1)).to(log_gamma.dtype)  # [H, K]
    return dq, dk, dv, dg, dh0


def kernel_traffic(B: int, T: int, H: int, K: int, V: int, itemsize: int, per_token: bool, backward: bool) -> int:
    """Bytes the kernels read and write in one forward, and with ``backward`` also in its backward.

    Every tensor a kernel reads or writes is counted once for that kernel, whatever its tiling (a
    tile that several programs read again is assumed to come from the L2 cache): a lower bound on
    the kernels' DRAM traffic. ``q, k, v, o`` and their gradients are ``itemsize`` bytes per
    element; the chunk states and their gradient, the in-chunk scores and their gradient, the
    decays, the in-chunk parts of ``dq, dk`` and ``dlog_gamma`` are float32. Plain batches only
    (no ``cu_seqlens``) and no initial state, as ``linmix bench`` runs the op.

    Args:
        B, T, H, K, V: the shapes of ``q [B, T, H, K]`` and ``v [B, T, H, V]``.
        itemsize: bytes per element of q, k and v.
        per_token: whether the decay is per token ``[B, T, H, K]`` (else constant, ``[H, K]``).
        backward: add the backward's kernels, which reuse the forward's states and scores.
    """
    rows = B * T * H  # positions times heads
    qk, vv = rows * K * itemsize, rows * V * itemsize  # one [B, T, H, K] / [B, T, H, V] tensor
    per_row = rows * K * 4  # a float32 [B, T, H, K] tensor
    decay = per_row if per_token else H * K * 4  # what the kernels read: the in-chunk sums, or log_gamma
    states = B * cdiv(T, CHUNK) * H * K * V * 4  # chunk states, or their gradient
    final = B * H * K * V * 4  # final states, or the initial states' gradient
    scores = rows * CHUNK * 4  # in-chunk scores, or their gradient
    forward = ((qk + vv + decay) + (decay if per_token else 0) + states + final  # states: k, v, log_gamma -> ...
               + (2 * qk + decay) + scores  # scores: q, k, decay -> A
               + (qk + vv + decay + states + scores) + vv)  # output: q, v, decay, states, A -> o
    if not backward:
        return forward
    return forward + (
        (qk + decay + vv) + states + final  # dstates: q, decay, do -> dh, dh0
        + 2 * vv + scores  # dscores: v, do -> dA
        + (qk + decay + vv + states + scores) + vv  # dv: k, decay, do, dh, A -> dv
        + (2 * qk + decay + scores) + 2 * per_row  # dqk_intra: q, k, decay, dA -> dq and dk inside the chunks
        + (2 * qk + vv + decay + 2 * states + vv + scores + 2 * per_row)  # dqk: q, k, v, decay, h, do, dh, dA, parts
        + 2 * qk + per_row  # -> dq, dk, dlog_gamma per token (summed afterwards for a constant decay)
    )


@torch.library.custom_op("linmix::decayed_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, final_state, chunk_states, scores, cumulative_decay)``, see ``decayed_attention_forward``."""
    return decayed_attention_forward(q, k, v, log_gamma, scale, initial_state, cu_seqlens)


@_forward_op.register_fake
def _forward_fake(q, k, v, log_gamma, scale, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    final_state = q.new_empty(sequence_count(q, cu_seqlens), H, K, V, dtype=torch.float32)
    h = q.new_empty(state_rows(B, T, cu_seqlens), H, K, V, dtype=torch.float32)
    A = q.new_empty(B, T, H, CHUNK, dtype=torch.float32)
    decay = q.new_empty(log_gamma.shape if log_gamma.dim() == 4 else (0,), dtype=torch.float32)
    return v.new_empty(v.shape), final_state, h, A, decay


@torch.library.custom_op("linmix::decayed_attention_bwd", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    h: torch.Tensor,
    A: torch.Tensor,
    cumulative_decay: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dlog_gamma, dinitial_state)``, see ``decayed_attention_backward``."""
    return decayed_attention_backward(
        q, k, v, log_gamma, scale, initial_state, do, dfinal_state, h, A, cumulative_decay, cu_seqlens
    )


@_backward_op.register_fake
def _backward_fake(q, k, v, log_gamma, scale, initial_state, cu_seqlens, do, dfinal_state, h, A, cumulative_decay):
    _, _, H, K = q.shape
    dh0 = q.new_empty(sequence_count(q, cu_seqlens), H, K, v.shape[-1], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_gamma.new_empty(log_gamma.shape), dh0


def _setup_context(ctx, inputs, output) -> None:
    """Keep the forward's inputs, chunk states, scores and decays for the backward."""
    q, k, v, log_gamma, scale, initial_state, cu_seqlens = inputs
    _, _, h, A, cumulative_decay = output
    ctx.save_for_backward(q, k, v, log_gamma, initial_state, cu_seqlens, h, A, cumulative_decay)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # unused outputs send None, not zeros the size of the chunk states


def _backward(ctx, do, dfinal_state, dh, dA, ddecay):
    """Gradients of the forward op's inputs (none for ``scale``, ``cu_seqlens`` and an absent initial state).

    The chunk states, scores and decays are outputs only so that the backward can reuse them;
    nothing downstream reads them, so their gradients ``dh``, ``dA`` and ``ddecay`` are None and ignored.
    """
    q, k, v, log_gamma, initial_state, cu_seqlens, h, A, cumulative_decay = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dh0 = _backward_op(
        q, k, v, log_gamma, ctx.scale, initial_state, cu_seqlens, do, dfinal_state, h, A, cumulative_decay
    )
    return dq, dk, dv, dg, None, (None if initial_state is None else dh0.to(initial_state.dtype)), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def triton_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decayed attention on the Triton kernels (CUDA tensors, or any under ``TRITON_INTERPRET=1``).

    Inputs are validated (see ``decayed_attention``). The kernels compute in float32 from float32,
    bfloat16 or float16 inputs.

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``.
        v: values, ``[B, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant, never expanded) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[N, H, K, V]`` or None for zeros.
        output_final_state: whether to return the state after every sequence's last position.
        cu_seqlens: ``[N + 1]`` starts of ``N`` sequences packed along ``T`` (``B = 1``), or None.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in ``v``'s dtype and the final states ``[N, H, K, V]``
        float32 (or None).
    """
    o, final_state, _, _, _ = _forward_op(q, k, v, log_gamma, float(scale), initial_state, cu_seqlens)
    return o, (final_state if output_final_state else None)
