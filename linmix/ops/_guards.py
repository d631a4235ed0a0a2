"""Guards every op call passes through in ``dispatch``: the finite check and the dense-size limit.

Both are process-wide settings, read from the environment when linmix is imported and changed from
Python by a switch that works as a call (for the rest of the process) or as a context manager (for
a block, the previous setting restored after it), like ``torch.set_grad_enabled``:

- ``LINMIX_CHECK_FINITE=1``, ``linmix.ops.check_finite(True)``: every op call checks its floating
  input tensors and initial state for NaN and infinities before the backend runs, and its outputs
  after, and raises ValueError naming the op, the argument (or the backend) and the first bad
  entry. Off by default, when it costs one attribute read per call. It reads values back from
  the device (a wait on a GPU), and is skipped while torch.compile traces.
- ``LINMIX_MAX_DENSE_BYTES=N``, ``linmix.ops.limit_dense_bytes(N)``: the largest tensor a backend
  may build whose size grows faster than the call's inputs and outputs (the ``[T, T]`` matrix of a
  quadratic form, declared by ``Backend.materializes``). A call past it is refused with a
  ValueError saying what it would build and how many bytes that takes. Default
  ``MAX_DENSE_BYTES`` (4 GiB: a float32 ``[32768, 32768]`` matrix).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from linmix.ops._validate import first_non_finite

CHECK_FINITE_ENV = "LINMIX_CHECK_FINITE"
MAX_DENSE_BYTES_ENV = "LINMIX_MAX_DENSE_BYTES"
MAX_DENSE_BYTES = 4 * 2**30  # the default limit: 4 GiB
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """The boolean environment variable ``name`` (unset is False).

    Raises:
        ValueError: its value is not one of 1/true/yes/on or 0/false/no/off.
    """
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} must be 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE


def env_bytes(name: str, default: int) -> int:
    """The byte count in environment variable ``name`` (an integer >= 0), or ``default`` if unset.

    Raises:
        ValueError: its value is not an integer >= 0.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.replace("_", "").isdigit():
        raise ValueError(f"environment variable {name}={value!r} must be a whole number of bytes, e.g. {default}")
    return int(value)


@dataclass
class _Settings:
    """The guards' process-wide settings (see the module docstring)."""

    check_finite: bool
    max_dense_bytes: int


SETTINGS = _Settings(check_finite=env_flag(CHECK_FINITE_ENV),
                     max_dense_bytes=env_bytes(MAX_DENSE_BYTES_ENV, MAX_DENSE_BYTES))


class _Switch:
    """Sets one field of ``SETTINGS`` when created; as a context manager, restores its previous value on exit."""

    field: str

    def __init__(self, value) -> None:
        self._previous = getattr(SETTINGS, self.field)
        setattr(SETTINGS, self.field, value)

    def __enter__(self) -> _Switch:
        return self

    def __exit__(self, *exc_info) -> None:
        setattr(SETTINGS, self.field, self._previous)


class check_finite(_Switch):
    """Switch the finite check of every op call on or off (``LINMIX_CHECK_FINITE`` sets it at import).

    ``linmix.ops.check_finite(True)`` turns it on for the rest of the process; ``with
    linmix.ops.check_finite():`` for a block. While on, an op call raises ValueError when an input
    tensor or the initial state holds NaN or an infinity (``"decayed_attention: argument q holds nan
    at [0, 3, 1, 2]"``), and when the backend returns one from finite inputs (naming the backend).

    Args:
        enabled: whether op calls check.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """

    field = "check_finite"

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        super().__init__(enabled)


class limit_dense_bytes(_Switch):
    """Set the largest dense intermediate a backend may build, in bytes (``LINMIX_MAX_DENSE_BYTES`` sets it at import).

    ``linmix.ops.limit_dense_bytes(16 * 2**30)`` for the rest of the process; ``with
    linmix.ops.limit_dense_bytes(n):`` for a block. The default is ``MAX_DENSE_BYTES`` (4 GiB).

    Args:
        limit: bytes, an integer >= 0.

    Raises:
        TypeError: ``limit`` is not an int. ValueError: it is negative.
    """

    field = "max_dense_bytes"

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int (bytes), got {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0 bytes, got {limit}")
        super().__init__(limit)


def is_checking_finite() -> bool:
    """Whether op calls check their inputs and outputs for NaN and infinities (see ``check_finite``)."""
    return SETTINGS.check_finite


def max_dense_bytes() -> int:
    """The largest dense intermediate a backend may build, in bytes (see ``limit_dense_bytes``)."""
    return SETTINGS.max_dense_bytes


def _readable(tensor: torch.Tensor) -> bool:
    """Whether the finite check reads ``tensor``: a floating tensor with values, outside a torch.compile trace."""
    return tensor.is_floating_point() and not tensor.is_meta and not torch.compiler.is_compiling()


def check_inputs_finite(op_name: str, arguments: list[tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError naming the op, the argument and its first NaN or infinite entry, if any.

    Args:
        op_name: the op's name.
        arguments: ``(name, tensor)`` of every tensor argument and initial-state tensor.
    """
    for name, tensor in arguments:
        bad = first_non_finite(tensor) if _readable(tensor) else None
        if bad is not None:
            index, value = bad
            raise ValueError(f"{op_name}: argument {name} holds {value} at {index}")


def check_outputs_finite(op_name: str, backend_name: str, outputs: list[tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError naming the op, the backend, the output and its first NaN or infinite entry, if any.

    Called on the results of finite inputs, so a bad entry is the backend's (or an overflow of the
    output dtype).

    Args:
        op_name: the op's name.
        backend_name: the backend that ran.
        outputs: ``(name, tensor)`` of ``o`` and every final-state tensor.
    """
    for name, tensor in outputs:
        bad = first_non_finite(tensor) if _readable(tensor) else None
        if bad is not None:
            index, value = bad
            raise ValueError(f"{op_name}: backend {backend_name!r} returned {value} at {index} of {name} "
                             "from finite inputs")


def _byte_count(count: int) -> str:
    """``count`` bytes for a message: ``"6,400,000,000 bytes (5.96 GiB)"``, ``"196 bytes"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count:,} bytes ({count / size:.2f} {unit})"
    return f"{count:,} bytes"


def check_dense_bytes(op_name: str, backend_name: str, needed: int, what: str) -> None:
    """Raise ValueError if a backend would build a dense intermediate past ``max_dense_bytes()``.

    Args:
        op_name: the op's name.
        backend_name: the backend about to run.
        needed: the intermediate's size in bytes.
        what: the intermediate and the argument it comes from, e.g. ``"a [T, T] float32 matrix for x of
            shape [1, 40000, 8]"``.
    """
    limit = SETTINGS.max_dense_bytes
    if needed > limit:
        raise ValueError(
            f"{op_name}: backend {backend_name!r} would build {what}: {_byte_count(needed)}, over the limit of "
            f"{_byte_count(limit)}; raise the limit with "
            f"linmix.ops.limit_dense_bytes(n) or the environment variable {MAX_DENSE_BYTES_ENV}=n, or pick a "
            "backend that does not build it"
        )
