"""The contract suite's machinery: cases built from every op's test spec, runs of a backend, cached references.

An op joins the suite by its registration in ``linmix.ops.OPS`` and the ``SPEC`` of its ``testing``
module. Nothing here names an op or a backend except the reference, ``naive``, which every op has.

A case is a frozen description (regime, length, with or without an initial state, packed bounds);
its inputs are float64 CPU tensors drawn from ``spec.make_inputs`` with a generator seeded from the
case, so every backend, device and dtype sees the same numbers, and the float64 reference of a case
is computed once on the CPU (``reference``) and reused by every comparison.

How much of the case grid a backend gets (``budget``): ``FULL`` for backends that run natively
here and are checked nowhere else on this device kind, ``COVERING`` (a subset that still takes every
regime and crosses chunk boundaries) for Triton backends in the CPU interpreter (seconds per case)
and for plain-PyTorch backends on CUDA (the same code the CPU suite checks in full), ``EXTERNAL``
for another library's CUDA kernels (e.g. flash-linear-attention, which autotunes for minutes per
new shape: a handful of cases under that package's own marker).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import pytest
import torch

from linmix.ops import OPS
from linmix.ops._dispatch import Backend, Op, State, compute_dtype, map_floating, map_state
from linmix.ops._testing import OpInputs, OpTestSpec, seeded, spec_of
from linmix.ops.mixing_matrix import apply_mixing_matrix

REFERENCE = "naive"  # the executable spec every backend is compared with
HAS_CUDA = torch.cuda.is_available()
FULL, COVERING, EXTERNAL = "full", "covering", "external"
COVERING_LENGTHS = (1, 7, 65, 130)  # inside one chunk, across one boundary, across two
PACKED_LENGTHS = {FULL: (1, 7, 63, 200), COVERING: (1, 7, 63, 70), EXTERNAL: (1, 7, 63, 200)}
MATRIX_LENGTHS = (1, 7, 65)  # the mixing-matrix check: one position, inside a chunk, past one
ATOL = {torch.float64: 1e-12}  # absolute slack of assert_close per compute dtype (helpers' default otherwise)


# ---- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input configuration of an op: hashable, so that its inputs and reference are computed once.

    Attributes:
        op: the registered op's name.
        regime: a regime of the op's spec.
        T: the sequence length (the packed length with ``bounds``).
        with_state: whether the call starts from the spec's initial state (else from None).
        final_state: whether the call asks for the final state (``output_final_state``).
        bounds: ``cu_seqlens`` of a packed case (``B = 1``), or None for a plain batch.
        dims: overrides of the spec's dimensions, as ``((name, value), ...)``.
        rounded_to: a 16-bit dtype the inputs are rounded to (states to float32), so that the
            float64 reference sees exactly what a 16-bit run reads; None keeps them float64.
        salt: another draw of the same configuration.
    """

    op: str
    regime: str
    T: int
    with_state: bool = True
    final_state: bool = True
    bounds: tuple[int, ...] | None = None
    dims: tuple[tuple[str, int], ...] = ()
    rounded_to: torch.dtype | None = None
    salt: int = 0

    @property
    def spec(self) -> OpTestSpec:
        return spec_of(OPS[self.op])

    @property
    def dimensions(self) -> dict[str, int]:
        """The spec's dimensions with the overrides and ``T`` (and ``B = N`` sequences for a packed case)."""
        dims = {**self.spec.dims, **dict(self.dims), "T": self.T}
        if self.bounds is not None:
            dims["B"] = len(self.bounds) - 1  # one initial-state row per sequence; tensors keep row 0
        return dims

    @property
    def id(self) -> str:
        parts = [self.regime, f"T{self.T}" if self.bounds is None else "packed" + "-".join(map(str, self.bounds))]
        parts += [f"{k}{v}" for k, v in self.dims]
        parts.append("h0" if self.with_state else "no_h0")
        if not self.final_state:
            parts.append("no_final_state")
        if self.rounded_to is not None:
            parts.append(f"rounded_{dtype_name(self.rounded_to)}")
        return "-".join(parts + ([f"salt{self.salt}"] if self.salt else []))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def case_inputs(case: Case) -> OpInputs:
    """The case's float64 CPU inputs (do not modify them: they are cached)."""
    spec, op = case.spec, OPS[case.op]
    dims = case.dimensions
    inputs = spec.make_inputs(dims, case.regime, seeded(dims, case.regime, "cpu", case.salt))
    tensors = inputs.tensors
    if case.bounds is not None:  # the packed batch is row 0 of the per-token tensors
        tensors = {name: (x[:1] if is_per_token(op, name, x) else x) for name, x in tensors.items()}
    state = inputs.initial_state if case.with_state else None
    if case.rounded_to is not None:
        tensors = {name: x.to(case.rounded_to).double() for name, x in tensors.items()}
        state = map_floating(lambda s: s.float().double(), state)
    return OpInputs(tensors, inputs.settings, state)


@functools.cache
def regime_settings(op_name: str, regime: str) -> tuple[tuple[str, object], ...]:
    """The settings a regime's inputs carry (from a one-position draw), as sorted items."""
    spec = spec_of(OPS[op_name])
    dims = {**spec.dims, "T": 1}
    return tuple(sorted(spec.make_inputs(dims, regime, seeded(dims, regime)).settings.items()))


def is_per_token(op: Op, name: str, x: torch.Tensor) -> bool:
    """Whether tensor argument ``name`` holds one row per position (dim 1) in this layout."""
    return x.dim() in op.per_token.get(name, ())


# ---- backends: what runs where, and how much of the grid --------------------------------------------


def budget(backend: Backend, device: str) -> str:
    """How much of the case grid ``backend`` gets on ``device`` (see the module docstring)."""
    if backend.requires and not backend.interpretable:
        return EXTERNAL
    if (backend.interpretable and device == "cpu") or (not backend.needs_cuda and device == "cuda"):
        return COVERING
    return FULL


def devices(backend: Backend) -> tuple[str, ...]:
    """The devices the suite runs ``backend`` on: CUDA, and the CPU unless it needs CUDA and has no interpreter."""
    return ("cuda",) if backend.needs_cuda and not backend.interpretable else ("cpu", "cuda")


def cuda_marks(marker: str = "gpu") -> list:
    """The marks of a CUDA case: ``marker`` (selected with ``-m``) and a skip where there is no CUDA."""
    return [getattr(pytest.mark, marker), pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def cuda_only(marker: str = "gpu"):
    """A decorator that marks a test ``marker`` (run with ``-m marker``) and skips it where there is no CUDA."""
    def mark_test(test):
        for mark in cuda_marks(marker):
            test = mark(test)
        return test

    return mark_test


gpu_only = cuda_only()


def marks(backend: Backend, device: str) -> list:
    """An external library's cases carry its package's marker (``-m fla``), other CUDA cases ``gpu``."""
    if budget(backend, device) == EXTERNAL:
        return cuda_marks(backend.requires)
    return cuda_marks() if device == "cuda" else []


def entries() -> list[tuple[str, str, str]]:
    """Every ``(op, backend, device)`` of the registry, in order."""
    return [(op_name, name, device) for op_name, op in OPS.items() for name, backend in op.backends.items()
            for device in devices(backend)]


def taken_regimes(op_name: str, backend: str) -> tuple[str, ...]:
    """The regimes of the op's spec whose settings ``backend`` takes."""
    op = OPS[op_name]
    return tuple(regime for regime in spec_of(op).regimes
                 if op.backends[backend].refuses(dict(regime_settings(op_name, regime))) is None)


def refused_regimes(op_name: str, backend: str) -> tuple[str, ...]:
    """The regimes whose settings ``backend`` refuses (the suite checks that they raise)."""
    return tuple(r for r in spec_of(OPS[op_name]).regimes if r not in taken_regimes(op_name, backend))


def ends(regimes: tuple[str, ...]) -> tuple[str, ...]:
    """The first and the last regime (one if they are the same)."""
    return tuple(dict.fromkeys((regimes[0], regimes[-1])))


def param(op_name: str, backend: str, device: str, *values, id: str):
    """A ``pytest.param`` of ``(op, backend, device, *values)`` carrying the backend's marks on that device."""
    marked = marks(OPS[op_name].backends[backend], device)
    return pytest.param(op_name, backend, device, *values, id=f"{op_name}-{backend}-{device}-{id}", marks=marked)


def skip_unless_runnable(op_name: str, backend: str, device: str) -> None:
    """Skip, with the reason, a backend that cannot run on ``device`` here (package missing, no CUDA)."""
    reason = OPS[op_name].backends[backend].unavailable(torch.device(device))
    if reason:
        pytest.skip(f"backend {backend!r} of {op_name} {reason}")


def compute_dtypes(backend: Backend) -> tuple[torch.dtype, ...]:
    """The dtypes a backend is compared in on the full grid: float64 where it computes it, and float32."""
    return (torch.float64, torch.float32) if backend.float64 else (torch.float32,)


def exact_dtype(backend: Backend) -> torch.dtype:
    """The most precise dtype the backend computes in itself: float64, or float32."""
    return torch.float64 if backend.float64 else torch.float32


def tolerance(spec: OpTestSpec, backend: str, dtype: torch.dtype) -> dict:
    """``assert_close`` keyword arguments for ``backend`` computing from ``dtype`` inputs."""
    return dict(ratio=spec.ratio(backend, dtype), **({"atol": ATOL[dtype]} if dtype in ATOL else {}))


# ---- running ----------------------------------------------------------------------------------------


def state_items(prefix: str, state: State) -> list[tuple[str, torch.Tensor]]:
    """A state's tensors by name: ``prefix`` for one tensor, ``prefix[i]`` for each of a tuple."""
    if state is None:
        return []
    if isinstance(state, tuple):
        return [(f"{prefix}[{i}]", part) for i, part in enumerate(state)]
    return [(prefix, state)]


def float_items(prefix: str, state: State) -> list[tuple[str, torch.Tensor]]:
    """``state_items`` without the integer parts (counters, ``Op.counters``): the differentiable ones."""
    return [(name, part) for name, part in state_items(prefix, state) if part.is_floating_point()]


def state_to(state: State, device: str, dtype: torch.dtype) -> State:
    """A copy of ``state`` on ``device``, its floating parts in ``dtype`` (counters keep int64)."""
    return map_state(lambda s: s.to(device=device, dtype=dtype if s.is_floating_point() else s.dtype, copy=True),
                     state)


def leaves_of(inputs: OpInputs, dtype: torch.dtype, device: str) -> tuple[dict, State]:
    """Fresh leaf copies of the inputs that require grad: tensors in ``dtype``, the state's floating parts
    in the compute dtype (its counters are copied, int64 and without grad)."""
    tensors = {name: x.to(device=device, dtype=dtype, copy=True).requires_grad_() for name, x in inputs.tensors.items()}
    state = map_floating(lambda s: s.requires_grad_(), state_to(inputs.initial_state, device, compute_dtype(dtype)))
    return tensors, state


def cotangent_loss(case: Case, o: torch.Tensor, final_state: State) -> torch.Tensor:
    """A scalar loss weighing ``o`` and every final-state tensor by fixed random cotangents of the case.

    The cotangents are drawn on the CPU in float64 from the case's seed and rounded like its inputs,
    so every backend, device and dtype is differentiated along the same direction.
    """
    generator = seeded(case.dimensions, case.regime, "cpu", salt=case.salt + 1)
    total = o.new_zeros((), dtype=torch.float64)
    for tensor in (o, *(part for _, part in float_items("s", final_state))):
        weights = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if case.rounded_to is not None:
            weights = weights.to(case.rounded_to if tensor is o else torch.float32)
        total = total + (tensor * weights.to(tensor.device, tensor.dtype)).sum().double()
    return total


def results(case: Case, tensors: dict, state: State, o: torch.Tensor, final_state: State) -> dict:
    """``o``, the final state's tensors and the gradient ``d<name>`` of every leaf under ``cotangent_loss``
    (the initial state's counters are no leaves)."""
    leaves = {**tensors, **dict(float_items("initial_state", state))}
    grads = torch.autograd.grad(cotangent_loss(case, o, final_state), list(leaves.values()), allow_unused=True,
                                materialize_grads=True)
    out = {"o": o.detach(), **{name: part.detach() for name, part in state_items("final_state", final_state)}}
    out.update({f"d{name}": grad for name, grad in zip(leaves, grads, strict=True)})
    return out


def call(op: Op, backend: str, tensors: dict, settings: dict, state: State, **kwargs):
    """The op's public function, keyword arguments only."""
    return op.fn(**tensors, **settings, initial_state=state, backend=backend, **kwargs)


def run(case: Case, backend: str, dtype: torch.dtype, device: str = "cpu",
        index_dtype: torch.dtype = torch.int64) -> dict:
    """One forward and backward of the public function on ``backend``: outputs, final state, every gradient.

    Packed cases pass ``cu_seqlens`` (of ``index_dtype``) and run as one call.
    """
    op, inputs = OPS[case.op], case_inputs(case)
    tensors, state = leaves_of(inputs, dtype, device)
    cu_seqlens = None if case.bounds is None else torch.tensor(case.bounds, dtype=index_dtype, device=device)
    o, final_state = call(op, backend, tensors, inputs.settings, state, output_final_state=case.final_state,
                          cu_seqlens=cu_seqlens)
    return results(case, tensors, state, o, final_state)


@functools.cache
def reference(case: Case, backend: str = REFERENCE) -> dict:
    """``backend`` (``naive`` unless a long case needs a faster one already checked against it) in
    float64 on the CPU; a packed case runs each sequence alone (see ``run_alone``)."""
    return run(case, backend, torch.float64) if case.bounds is None else run_alone(case, backend)


def run_alone(case: Case, backend: str = REFERENCE, dtype: torch.dtype = torch.float64) -> dict:
    """A packed case with every sequence run alone and the results joined, forward and backward.

    Each call gets its piece of every per-token tensor (cut along T by ``Op.per_token``), the shared
    tensors whole and its row of the initial state.
    """
    op, inputs = OPS[case.op], case_inputs(case)
    tensors, state = leaves_of(inputs, dtype, "cpu")
    rows = [None] * (len(case.bounds) - 1) if state is None else split_rows(state)
    outputs, states = [], []
    for (start, end), row in zip(itertools.pairwise(case.bounds), rows, strict=True):
        piece = {name: (x[:, start:end] if is_per_token(op, name, x) else x) for name, x in tensors.items()}
        o, final_state = call(op, backend, piece, inputs.settings, row, output_final_state=case.final_state)
        outputs.append(o)
        states.append(final_state)
    return results(case, tensors, state, torch.cat(outputs, dim=1), join_rows(states) if case.final_state else None)


def split_rows(state: State) -> list[State]:
    """One state per sequence: every tensor cut along dim 0 into rows of one."""
    if isinstance(state, tuple):
        return [tuple(parts) for parts in zip(*(part.split(1) for part in state), strict=True)]
    return list(state.split(1))


def join_rows(states: list[State]) -> State:
    """The inverse of ``split_rows``."""
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states, strict=True))
    return torch.cat(states)


def assert_result_dtypes(out: dict, dtype: torch.dtype) -> None:
    """Outputs and the gradients of the tensors in ``dtype``; states and their gradients in the compute dtype,
    their counters in int64."""
    for name, x in out.items():
        expected = dtype if "state" not in name else compute_dtype(dtype) if x.is_floating_point() else torch.int64
        assert x.dtype == expected, f"{name} has dtype {x.dtype}, expected {expected}"


# ---- the explicit operator --------------------------------------------------------------------------


def matrix_params() -> list:
    """``(op, backend, "cpu", regime, T)`` of the mixing-matrix check, for the ops whose spec gives a matrix.

    A backend running natively gets every regime it takes at the longest of ``MATRIX_LENGTHS`` and the
    shorter ones at its first and last regime; a Triton backend in the interpreter its first regime at
    the longest length and its last at 7.
    """
    params = []
    for op_name, backend, device in entries():
        if device != "cpu" or spec_of(OPS[op_name]).mixing_matrix is None:
            continue
        regimes, longest = taken_regimes(op_name, backend), MATRIX_LENGTHS[-1]
        if budget(OPS[op_name].backends[backend], device) == FULL:
            runs = [(r, longest) for r in regimes] + [(r, T) for r in ends(regimes) for T in MATRIX_LENGTHS[:-1]]
        else:
            runs = list(zip(ends(regimes), (longest, MATRIX_LENGTHS[1])))
        params += [param(op_name, backend, device, r, T, id=f"{r}-T{T}") for r, T in runs]
    return params


def matrix_reference(spec: OpTestSpec, inputs: OpInputs, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """The spec's mixing matrix applied to the values, in float64 on the CPU from the inputs rounded to
    ``dtype`` (what a backend computing in ``dtype`` reads), zero initial state."""
    tensors = {name: x.to(dtype).double() for name, x in inputs.tensors.items()}
    M = spec.mixing_matrix(tensors, inputs.settings, backend)  # [..., T, T]
    return apply_mixing_matrix(M, tensors[spec.values])
