"""Argument checks of ``gated_kalman`` and ``gated_kalman_step``: shapes, dtypes, devices and value ranges.

The same checks serve the sequence form (``[B, T, ...]`` per-token tensors) and the one-token step
(``[B, ...]``). Every failure raises ``ValueError`` or ``TypeError`` naming the argument, what it got
and what was expected.
"""

from __future__ import annotations

import math

import torch

from linmix.ops._validate import (
    LOG_DECAY_SLACK,
    check_range,
    check_cu_seqlens,
    check_finite_number,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    layout,
    first_non_finite,
    shape_str,
)

SYMMETRY_SLACK = 1e-3  # largest |H - H^T| of an initial Gram state, relative to its largest entry


def check_arguments(*, q, k, v, g, beta, alpha, ridge, iters, scale, state, state_name: str, step: bool,
                    cu_seqlens=None) -> None:
    """Check shapes, dtypes, devices and options (no value is read).

    Args:
        q, k, v, g, beta, alpha: the op's tensors (``alpha`` may be None), per token or at one position (``step``).
        ridge: the ridge ratio, a finite number > 0.
        iters: the number of Chebyshev steps, an int >= 0.
        scale: None or a finite number.
        state: the initial state (sequence form) or the carried state (step), or None.
        state_name: ``"initial_state"`` or ``"state"``.
        step: whether the tensors hold one position.
        cu_seqlens: the packed boundaries (sequence form), or None.
    """
    tensors = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)] + ([("alpha", alpha)] if alpha is not None
                                                                          else [])
    for name, tensor in tensors:
        check_tensor(name, tensor)
    lead = 1 if step else 2
    check_ndim("q", q, (lead + 2,), layout(step, "H", "K"))
    check_ndim("v", v, (lead + 2,), layout(step, "H", "V"))
    H, K = q.shape[lead:]
    V = v.shape[-1]
    check_shape("k", k, q.shape, layout(step, "H", "K") + " like q")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape {layout(step, 'H', 'V')} with the leading dims of q "
                         f"{list(q.shape[:-1])}, got {shape_str(v)}")
    if K == 0:
        raise ValueError(f"q must have at least one key channel, got K=0 (shape {shape_str(q)}): the Gram state "
                         "would hold nothing and scale=None means K ** -0.5")
    if V == 0:
        raise ValueError(f"v must have at least one value channel, got V=0 (shape {shape_str(v)}): the Gram state "
                         "H [K, K] would still depend on every key, gate and strength")
    check_same_dtype(("q", q), ("k", k), ("v", v))
    check_same_device(*tensors)
    lead_dims = tuple(q.shape[:lead])
    for name, tensor in tensors[3:]:
        check_shape(name, tensor, (*lead_dims, H), layout(step, "H") + " (one per head)")
    check_finite_number("ridge", ridge)
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (lambda = ridge * ||H||_F; the solve's condition number is at most "
                         f"(1 + ridge) / ridge), got {ridge}")
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"iters must be an int (the number of Chebyshev steps), got {type(iters).__name__}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0 (the number of Chebyshev steps), got {iters}")
    if scale is not None:
        check_finite_number("scale", scale)
    N = q.shape[0]
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("q", q))
        N = cu_seqlens.shape[0] - 1
    if state is not None:
        rows = "N sequences in cu_seqlens" if cu_seqlens is not None else "B"
        _check_state(state, state_name, (N, H, K, K), (N, H, K, V), q, rows)


def _check_state(state, name: str, H_shape: tuple, U_shape: tuple, q: torch.Tensor, rows: str) -> None:
    """The pair ``(H [N, H, K, K], U [N, H, K, V])``."""
    if not isinstance(state, tuple | list) or len(state) != 2:
        raise TypeError(f"{name} must be the pair (H [N, H, K, K], U [N, H, K, V]) (the Gram and the key-value "
                        f"state), got {type(state).__name__}")
    for i, part in enumerate(state):
        check_tensor(f"{name}[{i}]", part)
        check_same_device(("q", q), (f"{name}[{i}]", part))
    if (tuple(state[0].shape), tuple(state[1].shape)) != (H_shape, U_shape):
        raise ValueError(f"{name} must have shape (H [N, H, K, K], U [N, H, K, V]) = ({list(H_shape)}, "
                         f"{list(U_shape)}) (N = {rows}), got ({shape_str(state[0])}, {shape_str(state[1])})")


def check_ranges(*, g, beta, alpha, state, state_name: str) -> None:
    """Check the values in one read from the device: log decays finite and ``<= 0``, strengths finite and
    ``>= 0``, mixing weights in ``[0, 1]``; a Gram state finite, symmetric (to ``SYMMETRY_SLACK`` of its
    largest entry) with a diagonal ``>= 0`` (necessary for positive semi-definiteness, which the solve's
    eigenvalue bounds assume; the eigenvalues themselves are not computed).

    Skipped while torch.compile traces and for tensors on the meta device.
    """
    checks = [("g", g, -math.inf, LOG_DECAY_SLACK, "the log of a decay"),
              ("beta", beta, 0.0, math.inf, "a strength (it scales k and v)")]
    if alpha is not None:
        checks.append(("alpha", alpha, 0.0, 1.0, "a mixing weight"))
    checks = [c for c in checks if c[1].numel() and not c[1].is_meta]
    gram = None
    if state is not None and state[0].numel() and not state[0].is_meta:
        gram = state[0]
    if torch.compiler.is_compiling() or not (checks or gram is not None):
        return
    stats = [torch.stack(torch.aminmax(c[1].detach())).double() for c in checks]
    if gram is not None:
        H = gram.detach()
        asymmetry = (H - H.transpose(-1, -2)).abs().amax()
        stats.append(torch.stack([H.abs().amax(), asymmetry, H.diagonal(dim1=-2, dim2=-1).amin()]).double())
    values = torch.stack([torch.nn.functional.pad(s, (0, 3 - s.numel())) for s in stats]).tolist()  # one read
    for (name, tensor, low, high, what), (lo, hi, _) in zip(checks, values, strict=False):
        check_range(name, tensor, low, high, what, lo, hi)
    if gram is not None:
        largest, asymmetry, diagonal = values[-1]
        name = f"{state_name}[0]"
        if not all(math.isfinite(x) for x in (largest, asymmetry, diagonal)):
            index, value = first_non_finite(gram)
            raise ValueError(f"{name} holds {value} at {index}; it is the Gram state H and must be finite")
        if asymmetry > SYMMETRY_SLACK * largest:
            raise ValueError(f"{name} is the Gram state H and must be symmetric, got max |H - H^T| = {asymmetry:.3g} "
                             f"for max |H| = {largest:.3g}")
        if diagonal < 0:
            raise ValueError(f"{name} is the Gram state H and must be positive semi-definite, got a diagonal entry "
                             f"of {diagonal:.3g}")
