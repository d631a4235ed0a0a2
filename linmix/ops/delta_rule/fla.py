"""The delta rule on flash-linear-attention's chunk kernels (the optional ``fla`` package, CUDA only).

Each variant goes to the fla kernel that computes it, by keyword:

* DeltaNet: ``chunk_delta_rule`` (``HV = H``), or ``chunk_gated_delta_rule`` with ``g = 0`` (GVA);
* Gated DeltaNet: ``chunk_gated_delta_rule``; KDA: ``chunk_kda``;
* PDN / PGDN: ``chunk_precond_gated_delta_rule`` (PDN with ``g = 0``), returning ``(o, S, A)``;
* PKDA: ``chunk_precond_kda``, which has one head count for keys and values: under GVA the key-head
  tensors (q, k, the preconditioner's gates, centre and A) are repeated for the value heads and one
  copy of each group's identical A is returned.

q and k are always L2-normalised in fla's kernels (``chunk_precond_kda`` has no switch), so the
backend takes ``normalize_qk=True`` only. fla normalises with ``x / sqrt(|x|^2 + 1e-6)``, linmix with
``x / max(|x|, 1e-12)``: a relative difference below ``1e-6 / |x|^2``.
"""

from __future__ import annotations

import functools
import importlib

import torch

from linmix.ops.delta_rule.naive import State


@functools.cache
def _kernel(module: str, name: str):
    """An fla kernel, imported at the first call rather than with linmix (fla imports triton)."""
    return getattr(importlib.import_module(module), name)


def _repeat(x: torch.Tensor | None, times: int, dim: int) -> torch.Tensor | None:
    return x if x is None or times == 1 else x.repeat_interleave(times, dim=dim)


def fla_delta_rule(
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
    initial_state: State | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """The delta rule through fla's chunk kernels (CUDA tensors; ``naive_delta_rule``'s arguments plus ``cu_seqlens``).

    Raises:
        ValueError: the tensors are not on a CUDA device.
    """
    if not q.is_cuda:
        raise ValueError(f"backend 'fla' needs CUDA tensors, got {q.device} (fla's kernels run on CUDA only)")
    H, HV = q.shape[2], v.shape[2]
    common = dict(scale=scale, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if g is None and (precond_g is not None or HV != H):
        g = q.new_zeros(v.shape[:3], dtype=torch.float32)  # no decay: the gated kernels with exp(0) = 1
    if precond_g is None:
        if g is None:
            kernel = _kernel("fla.ops.delta_rule", "chunk_delta_rule")
            return kernel(q=q, k=k, v=v, beta=beta, initial_state=initial_state, use_qk_l2norm_in_kernel=True,
                          **common)
        if g.dim() == 3:
            kernel = _kernel("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")
        else:
            kernel = _kernel("fla.ops.kda", "chunk_kda")
        return kernel(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, use_qk_l2norm_in_kernel=True,
                      **common)
    S, A = (None, None) if initial_state is None else initial_state
    precond = dict(x=x, eps=eps, initial_state=S, **common)
    if g.dim() == 3:
        kernel = _kernel("fla.ops.precond_gated_delta_rule", "chunk_precond_gated_delta_rule")
        o, S, A = kernel(q=q, k=k, v=v, g_atk=precond_g, g=g, beta_atk=precond_beta, beta=beta, initial_A_state=A,
                         log_atk_scale=precond_center, use_qk_l2norm_in_kernel=True, **precond)
    else:
        group = HV // H
        kernel = _kernel("fla.ops.precond_kda", "chunk_precond_kda")
        o, S, A = kernel(q=_repeat(q, group, 2), k=_repeat(k, group, 2), v=v, g=g, g_atk=_repeat(precond_g, group, 2),
                         beta_atk=_repeat(precond_beta, group, 2), beta=beta, initial_A_state=_repeat(A, group, 1),
                         log_atk_scale=_repeat(precond_center, group, 0), **precond)
        A = None if A is None else A[:, ::group]
    return o, ((S, A) if output_final_state else None)
