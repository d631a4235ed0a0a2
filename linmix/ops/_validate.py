"""Argument checks shared by the functional ops.

Every check raises ``ValueError`` (wrong shape, value or option) or ``TypeError`` (wrong type or
dtype) with a message that names the argument, what it got and what was expected.
"""

import itertools
import math
from collections.abc import Mapping
from numbers import Real

import torch


def layout(step: bool, *dims: str) -> str:
    """The layout string of a per-token tensor in messages: ``[B, T, H, K]``, or ``[B, H, K]`` for a step."""
    return "[" + ", ".join(("B",) if step else ("B", "T")) + "".join(f", {d}" for d in dims) + "]"


def shape_str(tensor: torch.Tensor) -> str:
    """Format a tensor's shape as ``[2, 7, 3]`` for error messages."""
    return "[" + ", ".join(str(n) for n in tensor.shape) + "]"


def check_tensor(name: str, value: object) -> None:
    """Raise TypeError unless ``value`` is a tensor with a floating dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")


def check_ndim(name: str, tensor: torch.Tensor, ndims: tuple[int, ...], layout: str) -> None:
    """Raise ValueError unless ``tensor`` has one of ``ndims`` dimensions.

    Args:
        name: argument name used in the message.
        tensor: the argument.
        ndims: accepted numbers of dimensions.
        layout: the expected layout in words, e.g. ``"[B, T, H, K]"``.
    """
    if tensor.dim() not in ndims:
        raise ValueError(f"{name} must be {layout}, got shape {shape_str(tensor)}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    """Raise ValueError unless ``tensor.shape == expected``; ``layout`` names the dimensions."""
    if tuple(tensor.shape) != tuple(expected):
        want = "[" + ", ".join(str(n) for n in expected) + "]"
        raise ValueError(f"{name} must have shape {layout} = {want}, got {shape_str(tensor)}")


def check_same_dtype(reference: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor]) -> None:
    """Raise TypeError unless every ``(name, tensor)`` in ``others`` has the reference's dtype."""
    ref_name, ref = reference
    for name, tensor in others:
        if tensor.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_same_device(reference: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor]) -> None:
    """Raise ValueError unless every ``(name, tensor)`` in ``others`` is on the reference's device."""
    ref_name, ref = reference
    for name, tensor in others:
        if tensor.device != ref.device:
            raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}; they must match")


def check_finite_number(name: str, value: object) -> None:
    """Raise TypeError unless ``value`` is a real Python number, ValueError unless it is finite."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_choice(name: str, value: str, choices: Mapping | tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``, listing the valid names."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; valid names are {valid}")


def check_log_decay(name: str, log_decay: torch.Tensor, tol: float = 1e-6) -> None:
    """Raise ValueError unless every entry of a log-space decay is finite and ``<= tol``.

    The check reads the tensor's values, so it is skipped while torch.compile traces and for
    tensors on the meta device.

    Args:
        name: argument name used in the message.
        log_decay: natural log of a decay in (0, 1].
        tol: slack above 0 that rounding may produce.
    """
    if torch.compiler.is_compiling() or log_decay.is_meta or log_decay.numel() == 0:
        return
    lo, hi = torch.aminmax(log_decay.detach())
    lo, hi = lo.item(), hi.item()
    if math.isnan(lo) or math.isnan(hi):
        index, value = first_non_finite(log_decay)
        raise ValueError(f"{name} holds {value} at {index}; it is the log of a decay and must be finite")
    if hi > tol:
        raise ValueError(f"{name} is the log of a decay and must be <= 0, got a maximum of {hi:.3g}")
    if lo == -math.inf:
        index, value = first_non_finite(log_decay)
        raise ValueError(f"{name} must be finite, got {value} at {index}; clamp full resets to a large negative "
                         "value such as -30")


def first_non_finite(tensor: torch.Tensor) -> tuple[list[int], float] | None:
    """The first NaN or infinite entry of ``tensor`` in row-major order, or None if every entry is finite.

    It reads the tensor's values (on a GPU, a wait for the device).

    Returns:
        ``(index, value)``: the entry's index, one int per dimension, and its value (nan, inf or -inf).
    """
    bad = ~torch.isfinite(tensor.detach())
    if not bad.any():
        return None
    flat = bad.reshape(-1).to(torch.uint8).argmax().item()  # argmax returns the first of equal maxima
    index = []
    for size in reversed(tensor.shape):
        flat, position = divmod(flat, size)
        index.append(position)
    index.reverse()
    return index, tensor[tuple(index)].item()


def check_cu_seqlens(name: str, cu_seqlens: object, packed: tuple[str, torch.Tensor]) -> None:
    """Raise TypeError/ValueError unless ``cu_seqlens`` splits a packed ``[1, T, ...]`` tensor.

    ``cu_seqlens`` holds the ``N + 1`` boundaries of ``N`` sequences packed along T (FlashAttention's
    and fla's convention): 1-D, int32 or int64, on the packed tensor's device, starting at 0, ending
    at T and strictly increasing (every sequence at least one position). The value checks read the
    tensor, so they are skipped while torch.compile traces and for tensors on the meta device.

    Args:
        name: argument name used in the message.
        cu_seqlens: the argument.
        packed: ``(name, tensor)`` of the packed ``[1, T, ...]`` tensor whose T axis is split.
    """
    packed_name, x = packed
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D [N + 1] with N >= 1 sequences, got shape {shape_str(cu_seqlens)}")
    check_same_device((packed_name, x), (name, cu_seqlens))
    if x.shape[0] != 1:
        raise ValueError(
            f"{packed_name} must have batch size 1 when {name} is given (sequences are packed along T), "
            f"got shape {shape_str(x)}"
        )
    if torch.compiler.is_compiling() or cu_seqlens.is_meta:
        return
    bounds = cu_seqlens.tolist()
    T = x.shape[1]
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    if bounds[-1] != T:
        raise ValueError(f"{name} must end at T = {T} (the length of {packed_name}), got {bounds[-1]}")
    for n, (start, end) in enumerate(itertools.pairwise(bounds)):
        if end <= start:
            raise ValueError(
                f"{name} must be strictly increasing (every sequence at least one position), "
                f"got sequence {n} from {start} to {end}"
            )


LOG_DECAY_SLACK = 1e-6  # how far above 0 rounding may put a log decay


def check_range(name: str, tensor: torch.Tensor, low: float, high: float, what: str, lo: float, hi: float) -> None:
    """Raise ValueError unless ``tensor``'s minimum ``lo`` and maximum ``hi`` (read back by the caller, all
    checks of an op in one read) are finite and within ``[low, high]``; ``high == LOG_DECAY_SLACK`` marks
    a log decay. The message names the argument, what it is and, for a NaN or inf, its first index."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        index, value = first_non_finite(tensor)
        raise ValueError(f"{name} holds {value} at {index}; it is {what} and must be finite"
                         + ("; clamp full resets to a large negative value such as -30" if value == -math.inf
                            and high == LOG_DECAY_SLACK else ""))
    if lo < low or hi > high:
        if high == LOG_DECAY_SLACK:
            raise ValueError(f"{name} is the log of a decay and must be <= 0, got a maximum of {hi:.3g}")
        interval = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name} is {what} and must be {interval}, got values from {lo:.3g} to {hi:.3g}")
