"""Decayed attention on flash-linear-attention's ``chunk_gla`` (the optional ``fla`` package).

fla's gated linear attention is the same recurrence, ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and
``o_t = scale * S_t^T q_t``, with the per-token log decay ``g = log_gamma``. Its Triton kernels run on
CUDA only, read float32, float16 or bfloat16 q/k/v and take a float32 initial state; they handle
``cu_seqlens`` themselves.
"""

import functools
import importlib

import torch


@functools.cache
def _chunk_gla():
    """fla's ``chunk_gla``, imported at the first call rather than with linmix (it imports triton)."""
    return importlib.import_module("fla.ops.gla").chunk_gla


def fla_decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decayed attention through ``fla.ops.gla.chunk_gla`` (CUDA tensors only).

    Inputs are validated (see ``decayed_attention``): q/k/v in their own dtype, ``log_gamma`` and
    ``initial_state`` in float32.

    Args:
        q: queries, ``[B, T, H, K]``.
        k: keys, ``[B, T, H, K]``.
        v: values, ``[B, T, H, V]``.
        log_gamma: log decay, ``[H, K]`` (constant, expanded to fla's per-token gate) or ``[B, T, H, K]``.
        scale: factor applied to every output.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or None for zeros.
        output_final_state: whether to return the state after the last position.
        cu_seqlens: ``[N + 1]`` boundaries of ``N`` sequences packed along T (``B = 1``), or None.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in ``v``'s dtype and the final state ``[B, H, K, V]``
        (``[N, H, K, V]`` with ``cu_seqlens``) float32 (or None).

    Raises:
        ValueError: the tensors are not on a CUDA device.
    """
    if not q.is_cuda:
        raise ValueError(f"backend 'fla' needs CUDA tensors, got {q.device} (fla's kernels run on CUDA only)")
    g = log_gamma.expand(q.shape) if log_gamma.dim() == 2 else log_gamma  # [B, T, H, K]
    return _chunk_gla()(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
