"""Test specs of the ops: what the contract suite (tests/ops) and the benchmark's gate build inputs from.

Every registered op has a ``testing`` module in its package holding ``SPEC``, an ``OpTestSpec``: an
input factory with named regimes (extreme gates, decays from 0.01 to 0.9999, ...), the default small
dimensions and lengths, tolerances per dtype and backend, and the bad inputs its validation must
refuse. The suite runs every check on every backend of ``linmix.ops.OPS`` from these specs alone.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from linmix.ops._dispatch import OPS, Op, State

LENGTHS = (1, 7, 63, 64, 65, 333)  # across and inside chunks of 64 positions
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class OpInputs:
    """One call's inputs, float64 unless a test casts them.

    Attributes:
        tensors: the op's tensor arguments by name, in the public function's order.
        settings: its other arguments by name (scale, form, ...).
        initial_state: a state to start from (the suite passes it or not).
    """

    tensors: dict[str, torch.Tensor]
    settings: dict
    initial_state: State


@dataclass(frozen=True)
class BadInput:
    """An invalid call: ``change`` turns the keyword arguments of a valid call into the bad ones.

    Attributes:
        change: ``kwargs -> kwargs`` on ``{**tensors, **settings, "initial_state", "backend"}``.
        error: ValueError or TypeError.
        match: a regex the message must match; it names the argument at fault.
    """

    change: Callable[[dict], dict]
    error: type[Exception]
    match: str


def replaced(**changes) -> Callable[[dict], dict]:
    """A ``BadInput.change`` that replaces some keyword arguments of the valid call."""
    return lambda kwargs: {**kwargs, **changes}


@dataclass(frozen=True)
class OpTestSpec:
    """How the contract suite exercises one op.

    Attributes:
        op: the registered op's name.
        make_inputs: ``(dims, regime, generator) -> OpInputs`` in float64 on the generator's
            device; ``dims`` holds ``T`` and the keys of ``dims`` below.
        dims: the small dimensions of the suite's cases (without ``T``).
        regimes: the input regimes ``make_inputs`` knows, by name.
        lengths: the sequence lengths of the suite's cases.
        chunk: the chunk length of the chunked backends (split points go inside and on chunks).
        tolerance: relative RMS error allowed per dtype, against the reference in float64.
        backend_tolerance: backend -> dtype -> a looser tolerance (e.g. kernels multiplying in TF32).
        bad_inputs: name -> an invalid call the op must refuse.
        dim_ranges: dimension -> (low, high), the ranges of the property tests' random shapes.
        library_dims: overrides of ``dims`` for the cases of another library's kernels (fla's need
            heads of 16 channels or more).
        library_regimes: the regimes of those cases (another library need not handle the extremes
            linmix's backends do); None takes the first and the last regime.
        mixing_matrix: ``(tensors, settings, backend) -> M``, the explicit operator the op applies to
            its values from a zero initial state (``linmix.ops.mixing_matrix``): ``M [..., T, T]`` with
            ``o == apply_mixing_matrix(M, tensors[values])`` for that backend's call; None for an op
            with no matrix form. ``backend`` matters only where backends compute different operators
            (an exact solve against an iterated one).
        values: the name of the tensor ``mixing_matrix`` acts on.
    """

    op: str
    make_inputs: Callable[..., OpInputs]
    dims: dict[str, int]
    regimes: tuple[str, ...]
    bad_inputs: dict[str, BadInput]
    dim_ranges: dict[str, tuple[int, int]]
    lengths: tuple[int, ...] = LENGTHS
    chunk: int = 64
    tolerance: dict[torch.dtype, float] = field(default_factory=lambda: dict(TOLERANCES))
    backend_tolerance: dict[str, dict[torch.dtype, float]] = field(default_factory=dict)
    library_dims: dict[str, int] = field(default_factory=dict)
    library_regimes: tuple[str, ...] | None = None
    mixing_matrix: Callable[[dict, dict, str], torch.Tensor] | None = None
    values: str = "v"

    @property
    def registered(self) -> Op:
        """The op's registration (backends, per-token tensors, step)."""
        return OPS[self.op]

    def ratio(self, backend: str, dtype: torch.dtype) -> float:
        """The relative RMS error allowed for ``backend`` computing from ``dtype`` inputs."""
        return self.backend_tolerance.get(backend, {}).get(dtype, self.tolerance[dtype])


def spec_of(op: Op) -> OpTestSpec:
    """The ``SPEC`` of the op's ``testing`` module."""
    return importlib.import_module(f"{op.module}.testing").SPEC


def seeded(dims: dict, regime: str, device: str | torch.device = "cpu", salt: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded from a case's dimensions, regime and a salt (same case, same inputs)."""
    key = ",".join(f"{k}{v}" for k, v in sorted(dims.items())) + regime
    return torch.Generator(device=device).manual_seed((hash_text(key) + salt) % 2**31)


def hash_text(text: str) -> int:
    """A hash of ``text`` that is the same in every process (unlike ``hash`` of a str)."""
    value = 0
    for char in text:
        value = (value * 131 + ord(char)) % 2**61
    return value


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 numbers on the generator's device."""
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)


def rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) on the generator's device."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)


def log_spread(count: int, low: float, high: float) -> torch.Tensor:
    """``count`` log decays from ``log(low)`` to ``log(high)``, ``1 - gamma`` evenly spaced on a log scale. float64."""
    one_minus = torch.logspace(math.log10(1.0 - low), math.log10(1.0 - high), count, dtype=torch.float64)
    return torch.log1p(-one_minus)
