"""Argument checks of ``delta_rule`` and ``delta_rule_step``: shapes, dtypes, devices and value ranges.

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
    shape_str,
)



def check_arguments(*, q, k, v, beta, g, precond: tuple | None, x, eps, scale, normalize_qk, state, state_name: str,
                    step: bool, cu_seqlens=None) -> None:
    """Check shapes, dtypes, devices and options (no value is read).

    Args:
        q, k, v, beta, g: the op's tensors (``g`` may be None), per token or at one position (``step``).
        precond: ``(g, beta, center)`` of the preconditioner, their names being ``precond_g``,
            ``precond_beta`` and ``precond_center``; or None.
        x, eps: the preconditioner's range (``>= 1``) and epsilon (``> 0``), used only with ``precond``.
        scale: None or a finite number.
        normalize_qk: a bool.
        state: the initial state (sequence form) or the carried state (step), or None.
        state_name: ``"initial_state"`` or ``"state"``.
        step: whether the tensors hold one position.
        cu_seqlens: the packed boundaries (sequence form), or None.
    """
    tensors = [("q", q), ("k", k), ("v", v), ("beta", beta)] + ([("g", g)] if g is not None else [])
    if precond is not None:
        tensors += list(zip(("precond_g", "precond_beta", "precond_center"), precond, strict=True))
    for name, tensor in tensors:
        check_tensor(name, tensor)
    lead = 1 if step else 2
    check_ndim("q", q, (lead + 2,), layout(step, "H", "K"))
    check_ndim("v", v, (lead + 2,), layout(step, "HV", "V"))
    H, K = q.shape[lead:]
    HV, V = v.shape[lead:]
    check_shape("k", k, q.shape, layout(step, "H", "K") + " like q")
    if v.shape[:lead] != q.shape[:lead]:
        raise ValueError(f"v must have shape {layout(step, 'HV', 'V')} with the leading dims of q "
                         f"{list(q.shape[:lead])}, got {shape_str(v)}")
    if K == 0:
        raise ValueError(f"q must have at least one key channel, got K=0 (shape {shape_str(q)}): the state "
                         "would hold nothing and scale=None means K ** -0.5")
    if (HV % H != 0 or HV == 0) if H else HV != 0:
        raise ValueError(f"v must have a positive multiple of the H = {H} heads of q and k (HV value heads, each "
                         f"group of HV // H reading one key head), got {HV} in shape {shape_str(v)}")
    check_same_dtype(("q", q), ("k", k), ("v", v))
    check_same_device(*tensors)
    lead_dims = tuple(q.shape[:lead])
    check_shape("beta", beta, (*lead_dims, HV), layout(step, "HV"))
    if g is not None and tuple(g.shape) not in ((*lead_dims, HV), (*lead_dims, HV, K)):
        raise ValueError(f"g must have shape {layout(step, 'HV')} = {list((*lead_dims, HV))} (one log decay per "
                         f"value head) or {layout(step, 'HV', 'K')} = {list((*lead_dims, HV, K))} (one per key "
                         f"channel), got {shape_str(g)}")
    if precond is not None:
        check_shape("precond_g", precond[0], (*lead_dims, H), layout(step, "H") + " (one per key head)")
        check_shape("precond_beta", precond[1], (*lead_dims, H), layout(step, "H") + " (one per key head)")
        check_shape("precond_center", precond[2], (H,), "[H]")
        if V == 0:
            raise ValueError(f"v must have at least one value channel with a preconditioner, got V=0 (shape "
                             f"{shape_str(v)}): its key statistics would still depend on every input")
    check_finite_number("x", x)
    check_finite_number("eps", eps)
    if x < 1:
        raise ValueError(f"x must be >= 1 (the write key's gain lies in [1/x, x]), got {x}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (it keeps log(A + eps) finite at A = 0), got {eps}")
    if scale is not None:
        check_finite_number("scale", scale)
    if not isinstance(normalize_qk, bool):
        raise TypeError(f"normalize_qk must be a bool, got {type(normalize_qk).__name__}")
    N = q.shape[0]
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, ("q", q))
        N = cu_seqlens.shape[0] - 1
    if state is not None:
        _check_state(state, state_name, precond is not None, (N, HV, K, V), (N, H, K), q,
                     "N sequences in cu_seqlens" if cu_seqlens is not None else "B")


def _check_state(state, name: str, precond: bool, S_shape: tuple, A_shape: tuple, q: torch.Tensor, rows: str) -> None:
    """``S [N, HV, K, V]``, or the pair ``(S, A [N, H, K])`` with a preconditioner."""
    if not precond:
        if isinstance(state, tuple | list):
            raise TypeError(f"{name} must be one tensor S [N, HV, K, V] without a preconditioner, got a "
                            f"{type(state).__name__} of {len(state)}")
        check_tensor(name, state)
        check_same_device(("q", q), (name, state))
        check_shape(name, state, S_shape, f"[N, HV, K, V] (N = {rows})")
        return
    if not isinstance(state, tuple | list) or len(state) != 2:
        raise TypeError(f"{name} must be the pair (S [N, HV, K, V], A [N, H, K]) with a preconditioner, "
                        f"got {type(state).__name__}")
    for i, part in enumerate(state):
        check_tensor(f"{name}[{i}]", part)
        check_same_device(("q", q), (f"{name}[{i}]", part))
    if (tuple(state[0].shape), tuple(state[1].shape)) != (S_shape, A_shape):
        raise ValueError(f"{name} must have shape (S [N, HV, K, V], A [N, H, K]) = ({list(S_shape)}, "
                         f"{list(A_shape)}) (N = {rows}), got ({shape_str(state[0])}, {shape_str(state[1])})")


def check_ranges(*, beta, g, precond: tuple | None, state, state_name: str) -> None:
    """Check the values in one read from the device: log decays finite and ``<= 0``, strengths in
    ``[0, 1]``, the centre finite, the key statistics of the state finite and ``>= 0``.

    Skipped while torch.compile traces and for tensors on the meta device.
    """
    checks = [("beta", beta, 0.0, 1.0, "a strength")]
    if g is not None:
        checks.append(("g", g, -math.inf, LOG_DECAY_SLACK, "the log of a decay"))
    if precond is not None:
        checks += [("precond_g", precond[0], -math.inf, LOG_DECAY_SLACK, "the log of a decay"),
                   ("precond_beta", precond[1], 0.0, 1.0, "a strength"),
                   ("precond_center", precond[2], -math.inf, math.inf, "a centre")]
        if state is not None:
            checks.append((f"{state_name}[1]", state[1], 0.0, math.inf, "a second moment"))
    checks = [c for c in checks if c[1].numel() and not c[1].is_meta]
    if torch.compiler.is_compiling() or not checks:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(c[1].detach())).double() for c in checks])  # one read
    for (name, tensor, low, high, what), (lo, hi) in zip(checks, bounds.tolist(), strict=True):
        check_range(name, tensor, low, high, what, lo, hi)
