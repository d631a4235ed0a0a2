"""Structured mixing as one triangular solve: the dense oracle ``Y = (I - B)^{-1} (A X + far)``.

Per batch row and head, the strictly lower ``[T, T]`` matrix B holds ``beta[t, k]`` at column
``t - f(k)``; ``far`` holds the terms that read the state (``t - f(k) < 0``). For a lattice the
column of ``(t, k)`` depends on the absolute position: ``Lattice.sources`` gives, per batch row,
the output or the initial register slot each entry reads. Memory ``O(T^2)``.
"""

import math

import torch

from linmix.ops._validate import shape_str
from linmix.ops.structured_mix.patterns import Lattice, Offsets


def gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buffer[b, h, rows[b, ...]]``: the rows of ``buffer [B, H, R, D]`` picked per batch row by
    ``rows [B, ...]`` (int64), ``[B, H, ..., D]``."""
    B, H, _, D = buffer.shape
    flat = rows.reshape(B, 1, -1, 1).expand(B, H, -1, D)  # [B, H, M, D]
    return buffer.gather(2, flat).view(B, H, *rows.shape[1:], D)


def lattice_system(beta: torch.Tensor, reads: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``I - B`` of a lattice call, ``[B, H, T, T]``: ``-beta[t, k]`` at column ``reads[t, k] - K`` for the
    entries that read an output of the call (``Lattice.sources``' rows ``>= K``).

    Args:
        beta: ``[B, T, H, K]``.
        reads: ``[B, T, K]`` int64, the first T rows of ``Lattice.sources``.
        present: ``[B, T, K]`` bool, whether each entry is read.
    """
    B, T, H, K = beta.shape
    inside = present & (reads >= K)  # [B, T, K]
    columns = (reads - K).clamp_min(0)[:, None].expand(B, H, T, K)  # [B, H, T, K]
    eye = torch.eye(T, dtype=beta.dtype, device=beta.device).expand(B, H, T, T)
    return eye.scatter_add(-1, columns, -(beta * inside[:, :, None]).transpose(1, 2))


def _dense_lattice(x, alpha, beta, pattern: Lattice, initial_state, output_final_state):
    """The dense solve of a lattice call from ``initial_state = (slots, position)`` (zeros at 0 if None)."""
    B, T, H, D = x.shape
    K = pattern.levels
    if initial_state is None:
        slots = x.new_zeros(B, H, K, D)
        start = torch.zeros(B, dtype=torch.int64, device=x.device)
    else:
        slots, start = initial_state
    rows, present = pattern.sources(start, T)  # [B, T + 1, K]
    reads, read = rows[:, :T], present[:, :T]  # [B, T, K]
    system = lattice_system(beta, reads, read)  # [B, H, T, T]
    from_state = (read & (reads < K)).to(beta.dtype)  # [B, T, K]
    weights = (beta * from_state[:, :, None]).transpose(1, 2)  # [B, H, T, K]
    far = torch.einsum("bhtk,bhtkd->bhtd", weights, gather_rows(slots, reads.clamp_max(K - 1)))  # [B, H, T, D]
    rhs = (alpha[..., None] * x).transpose(1, 2) + far  # [B, H, T, D]
    y = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [B, H, T, D]
    final_state = None
    if output_final_state:
        final_state = (gather_rows(torch.cat([slots, y], dim=2), rows[:, T]), start + T)  # [B, H, K, D], [B]
    return y.transpose(1, 2), final_state


def state_terms(beta: torch.Tensor, pattern: Offsets, past: torch.Tensor, T: int) -> torch.Tensor:
    """``far[t] = sum_{k: t < f(k)} beta[t, k] * y_{t - f(k)}`` for ``t < min(T, S)``, the terms that read the state.

    Args:
        beta: ``[B, T, H, K]``.
        pattern: the offsets, ``S = pattern.max_offset``.
        past: ``[B, H, S, D]``, the outputs at positions ``-S .. -1``.
        T: the sequence length.

    Returns:
        ``[B, H, min(T, S), D]``; rows ``t >= S`` read no state.
    """
    S = pattern.max_offset
    rows = min(T, S)
    f = torch.tensor(pattern.offsets, device=beta.device)  # [K]
    position = torch.arange(rows, device=beta.device)[:, None] - f  # [rows, K], < 0 where the state is read
    reads_state = (position < 0).to(beta.dtype)  # [rows, K]
    slots = (position + S).clamp(0, S - 1)  # [rows, K], index into past (masked where it is not read)
    weights = beta[:, :rows].transpose(1, 2) * reads_state  # [B, H, rows, K]
    gathered = past[:, :, slots]  # [B, H, rows, K, D]
    return torch.einsum("bhtk,bhtkd->bhtd", weights, gathered)


def dense_structured_mix(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    pattern: Offsets | Lattice,
    initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]:
    """Build ``I - B`` per batch row and head and solve the unit lower triangular system.

    Args and returns as ``naive_structured_mix``.
    """
    if isinstance(pattern, Lattice):
        return _dense_lattice(x, alpha, beta, pattern, initial_state, output_final_state)
    B, T, H, D = x.shape
    S = pattern.max_offset
    idx = pattern.index_table(T, x.device)  # [T, K], -1 before position 0
    present = (idx >= 0).to(beta.dtype)  # [T, K]
    columns = idx.clamp_min(0).expand(B, H, T, pattern.levels)  # [B, H, T, K]
    eye = torch.eye(T, dtype=x.dtype, device=x.device).expand(B, H, T, T)
    system = eye.scatter_add(-1, columns, -(beta * present[:, None]).transpose(1, 2))  # [B, H, T, T] = I - B
    rhs = (alpha[..., None] * x).transpose(1, 2)  # [B, H, T, D]
    if initial_state is not None:
        far = state_terms(beta, pattern, initial_state, T)  # [B, H, min(T, S), D]
        rhs = torch.cat([rhs[:, :, : far.shape[2]] + far, rhs[:, :, far.shape[2]:]], dim=2)
    y = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [B, H, T, D]
    final_state = None
    if output_final_state:
        past = x.new_zeros(B, H, S, D) if initial_state is None else initial_state
        final_state = torch.cat([past, y], dim=2)[:, :, -S:]  # [B, H, S, D]
    return y.transpose(1, 2), final_state


def dense_materializes(x: torch.Tensor, **arguments) -> tuple[int, str]:
    """The bytes and description of the dense backend's largest tensor: ``I - B``, ``[B, H, T, T]``."""
    B, T, H, D = x.shape
    shape = (B, H, T, T)
    what = (f"a {list(shape)} {str(x.dtype).removeprefix('torch.')} matrix I - B (one [T, T] per batch row and "
            f"head) for x of shape {shape_str(x)}")
    return math.prod(shape) * x.element_size(), what
