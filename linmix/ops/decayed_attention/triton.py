"""Decayed attention on fused Triton kernels, wrapped as ``torch.library`` custom ops.

The forward runs the state recurrence over chunks of 64 positions (``chunk_states_kernel``) and then
every chunk's output in parallel (``chunk_output_kernel``); the backward recomputes the chunk
states, runs the state gradient backwards (``chunk_dstates_kernel``) and then ``dv`` and
``dq, dk, dlog_gamma`` per chunk in parallel. The ops ``linmix::decayed_attention_fwd`` and
``linmix::decayed_attention_bwd`` have fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through them without a graph break.
"""

import functools
import importlib

import torch

from linmix.ops._triton import launch_device

from linmix.ops.decayed_attention.chunk import chunk_decayed_attention

CHUNK = 64  # positions per chunk (BT)
SUB_BLOCK = 16  # positions per sub-block inside a chunk (BC)
MAX_BLOCK_K = 32  # largest tile of the key channels: in-block decays are [16, 16, BK] in registers
MAX_BLOCK_V = 64  # largest tile of the value channels
MAX_BLOCK_V_DQK = 32  # largest tile of the value channels in chunk_dqk_kernel, which loops over them
# Launch options that keep every kernel free of register spills on sm_90 (checked with ptxas -v):
# the sequential state kernels prefetch the next chunk, the parallel ones spread a chunk over 8 warps.
SEQUENTIAL = dict(num_warps=4, num_stages=2)
PARALLEL = dict(num_warps=8, num_stages=1)


@functools.cache
def _kernels():
    """The kernel module, and with it triton, imported at the first launch rather than with linmix.

    Triton decides when its functions are decorated whether to interpret them
    (``TRITON_INTERPRET=1``), so importing late lets a test switch the interpreter on after
    ``import linmix``.
    """
    return importlib.import_module("linmix.ops.decayed_attention.triton_kernels")


def _cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for positive integers."""
    return -(-n // d)


def _tile_size(n: int, block: int | None, largest: int) -> int:
    """``block`` if given, else the power of two covering ``n``, clamped to ``[16, largest]``."""
    return block or max(16, min(largest, 1 << (n - 1).bit_length()))


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact float32 products for float32 inputs, TF32 for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_decay(log_gamma: torch.Tensor, B: int, T: int, H: int, K: int) -> tuple[torch.Tensor, bool]:
    """The decay operand of the kernels and whether it is constant.

    Returns:
        For ``[H, K]``: the contiguous constant log decay (the kernels compute ``c`` from it), ``True``.
        For ``[B, T, H, K]``: the in-chunk cumulative log decay ``[B, Tp, H, K]`` float32, ``False``.
    """
    if log_gamma.dim() == 2:
        return log_gamma.contiguous(), True
    NT = _cdiv(T, CHUNK)
    BK = _tile_size(K, None, MAX_BLOCK_K)
    c = log_gamma.new_empty(B, NT * CHUNK, H, K, dtype=torch.float32)
    _kernels().chunk_cumsum_kernel[(NT, B * H, _cdiv(K, BK))](
        log_gamma.contiguous(), c, T, NT * CHUNK, H, K, BT=CHUNK, BK=BK
    )
    return c, False


def _chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    const: bool,
    initial_state: torch.Tensor | None,
    BK: int,
    BV: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 state entering every chunk ``[B, H, NT, K, V]`` and the final state ``[B, H, K, V]``."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = _cdiv(T, CHUNK)
    h = k.new_empty(B, H, NT, K, V, dtype=torch.float32)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    h0 = ht if initial_state is None else initial_state.float().contiguous()
    _kernels().chunk_states_kernel[(_cdiv(K, BK), _cdiv(V, BV), B * H)](
        k, v, decay, decay, h0, h, ht, T, NT * CHUNK, H, K, V, NT,
        BT=CHUNK, BK=BK, BV=BV, CONST=const, HAS_H0=initial_state is not None, PRECISION=_precision(k.dtype),
        **SEQUENTIAL,
    )
    return h, ht


def decayed_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernels.

    Args:
        q: queries, ``[B, T, H, K]`` in float32, bfloat16 or float16.
        k: keys, ``[B, T, H, K]``, dtype of ``q``.
        v: values, ``[B, T, H, V]``, dtype of ``q``.
        log_gamma: log decay ``<= 0``, ``[H, K]`` (constant) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[B, H, K, V]`` or None for zeros.
        block_k: tile of the key channels (a power of two >= 16); None picks one.
        block_v: tile of the value channels (a power of two >= 16); None picks one.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in ``v``'s dtype and the final state ``[B, H, K, V]`` float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    BK, BV = _tile_size(K, block_k, MAX_BLOCK_K), _tile_size(V, block_v, MAX_BLOCK_V)
    NT = _cdiv(T, CHUNK)
    with launch_device(q):
        decay, const = _chunk_decay(log_gamma, B, T, H, K)
        h, final_state = _chunk_states(k, v, decay, const, initial_state, BK, BV)
        o = torch.empty_like(v)
        _kernels().chunk_output_kernel[(_cdiv(V, BV), NT, B * H)](
            q, k, v, decay, decay, h, o, scale, T, NT * CHUNK, H, K, V, NT,
            BT=CHUNK, BC=SUB_BLOCK, BK=BK, BV=BV, CONST=const, PRECISION=_precision(q.dtype), **PARALLEL,
        )
    return o, final_state


def decayed_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    block_k: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; the chunk states are recomputed, not stored by the forward.

    Args:
        q, k, v, log_gamma, scale, initial_state: the forward's arguments (see ``decayed_attention_forward``).
        do: gradient of ``o``, ``[B, T, H, V]``.
        dfinal_state: gradient of the final state ``[B, H, K, V]``, or None for zeros.
        block_k: tile of the key channels (a power of two >= 16); None picks one.
        block_v: tile of the value channels (a power of two >= 16); None picks one.

    Returns:
        ``dq``, ``dk``, ``dv`` in their inputs' dtypes, ``dlog_gamma`` in the shape and dtype of
        ``log_gamma`` (the per-token gradient summed over ``B`` and ``T`` for a constant decay) and
        the gradient of the initial state ``[B, H, K, V]`` float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    BK, BV = _tile_size(K, block_k, MAX_BLOCK_K), _tile_size(V, block_v, MAX_BLOCK_V)
    NK, NV, NT = _cdiv(K, BK), _cdiv(V, BV), _cdiv(T, CHUNK)
    precision = _precision(q.dtype)
    kernels = _kernels()
    with launch_device(q):
        decay, const = _chunk_decay(log_gamma, B, T, H, K)
        h, _ = _chunk_states(k, v, decay, const, initial_state, BK, BV)
        dh = torch.empty_like(h)
        dh0 = q.new_empty(B, H, K, V, dtype=torch.float32)
        dht = dh0 if dfinal_state is None else dfinal_state.float().contiguous()
        kernels.chunk_dstates_kernel[(NK, NV, B * H)](
            q, decay, decay, do, dht, dh, dh0, scale, T, NT * CHUNK, H, K, V, NT,
            BT=CHUNK, BK=BK, BV=BV, CONST=const, HAS_DHT=dfinal_state is not None, PRECISION=precision,
            **SEQUENTIAL,
        )
        dv = torch.empty_like(v)
        kernels.chunk_dv_kernel[(NV, NT, B * H)](
            q, k, decay, decay, do, dh, dv, scale, T, NT * CHUNK, H, K, V, NT,
            BT=CHUNK, BC=SUB_BLOCK, BK=BK, BV=BV, CONST=const, PRECISION=precision, **PARALLEL,
        )
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dg = q.new_empty(B, T, H, K, dtype=torch.float32 if const else log_gamma.dtype)
        kernels.chunk_dqk_kernel[(NK, NT, B * H)](
            q, k, v, decay, decay, h, do, dh, dq, dk, dg, scale, T, NT * CHUNK, H, K, V, NT,
            BT=CHUNK, BC=SUB_BLOCK, BK=BK, BV=min(BV, MAX_BLOCK_V_DQK), CONST=const, PRECISION=precision,
            **PARALLEL,
        )
    if const:
        dg = dg.sum(dim=(0, 1)).to(log_gamma.dtype)  # [H, K]
    return dq, dk, dv, dg, dh0


@torch.library.custom_op("linmix::decayed_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, final_state)``, see ``decayed_attention_forward``."""
    return decayed_attention_forward(q, k, v, log_gamma, scale, initial_state)


@_forward_op.register_fake
def _forward_fake(q, k, v, log_gamma, scale, initial_state):
    B, T, H, K = q.shape
    return v.new_empty(v.shape), q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("linmix::decayed_attention_bwd", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dlog_gamma, dinitial_state)``, see ``decayed_attention_backward``."""
    return decayed_attention_backward(q, k, v, log_gamma, scale, initial_state, do, dfinal_state)


@_backward_op.register_fake
def _backward_fake(q, k, v, log_gamma, scale, initial_state, do, dfinal_state):
    B, T, H, K = q.shape
    dh0 = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_gamma.new_empty(log_gamma.shape), dh0


def _setup_context(ctx, inputs, output) -> None:
    """Keep the forward's inputs: the backward recomputes the chunk states from them."""
    q, k, v, log_gamma, scale, initial_state = inputs
    ctx.save_for_backward(q, k, v, log_gamma, initial_state)
    ctx.scale = scale


def _backward(ctx, do, dfinal_state):
    """Gradients of the forward op's inputs (none for ``scale``, none for an absent initial state)."""
    q, k, v, log_gamma, initial_state = ctx.saved_tensors
    dq, dk, dv, dg, dh0 = _backward_op(q, k, v, log_gamma, ctx.scale, initial_state, do, dfinal_state)
    return dq, dk, dv, dg, None, (None if initial_state is None else dh0.to(initial_state.dtype))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def triton_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decayed attention on the Triton kernels (CUDA tensors, or any under ``TRITON_INTERPRET=1``).

    Inputs are validated (see ``decayed_attention``). The kernels compute in float32 from float32,
    bfloat16 or float16 inputs; float64 inputs run the chunked PyTorch form instead, in float64.

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``.
        v: values, ``[B, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant, never expanded) or ``[B, T, H, K]`` (per token).
        scale: factor applied to every output.
        initial_state: ``[B, H, K, V]`` or None for zeros.
        output_final_state: whether to return the state after the last position.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in ``v``'s dtype and the final state ``[B, H, K, V]``
        float32 (or None).
    """
    if q.dtype == torch.float64:
        return chunk_decayed_attention(q, k, v, log_gamma, scale, initial_state, output_final_state)
    o, final_state = _forward_op(q, k, v, log_gamma, float(scale), initial_state)
    return o, (final_state if output_final_state else None)
