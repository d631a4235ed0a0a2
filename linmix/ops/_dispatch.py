"""Backend tables of the ops and the dispatch every op's public function ends in.

An op declares its backends once (``register_op``), each with what it can do: read 16-bit inputs
itself, take ``cu_seqlens`` itself, compute in float64, run only on CUDA, the longest T worth
running, the optional package it needs, the values of the op's settings it takes. ``dispatch``
then does, for every op alike: the ``"auto"`` choice, the float64 fallback, the casts to the
compute dtype, the per-sequence fallback for packed sequences (``cu_seqlens``) over the op's
per-token tensors, and the cast of the output back to the input dtype. It also answers calls with
nothing to compute (a dimension of size 0) without a backend, refuses a backend's dense
intermediate past the size limit, and checks for NaN and infinities where asked to
(``linmix.ops._guards``).

Conventions of every backend function: it is called with the op's tensors and settings by
keyword, plus ``initial_state`` and ``output_final_state`` (and ``cu_seqlens`` where it takes
them), on validated inputs already in its dtypes, and returns ``(o, final_state)``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from linmix.ops._guards import SETTINGS, check_dense_bytes, check_inputs_finite, check_outputs_finite
from linmix.ops.common.triton import interpreting

State = torch.Tensor | tuple[torch.Tensor, ...] | None
Shape = tuple[int, ...]
StateShape = Shape | tuple[Shape, ...]  # one state tensor's shape, or one per tensor of a tuple state
_INSTALLED: dict[str, bool] = {}  # optional package -> importable, looked up once (torch.compile traces dict reads)


def installed(package: str) -> bool:
    """Whether the optional ``package`` can be imported (checked once, without importing it)."""
    if package not in _INSTALLED:
        _INSTALLED[package] = importlib.util.find_spec(package) is not None
    return _INSTALLED[package]


@dataclass(frozen=True)
class Backend:
    """One way to compute an op, and what it can do.

    Attributes:
        fn: the backend function (see the module docstring for its calling convention).
        description: one line for listings.
        native_dtypes: reads float16/bfloat16 inputs itself and sums in float32 (no upcast copy).
        varlen: takes ``cu_seqlens`` itself; otherwise ``dispatch`` runs it once per sequence.
        float64: computes in float64; otherwise float64 inputs run on the op's first ``auto``
            backend that does.
        needs_cuda: runs on CUDA tensors only (``interpretable`` ones also under ``TRITON_INTERPRET=1``).
        interpretable: a Triton backend that Triton's CPU interpreter can run (slowly).
        max_T: the longest sequence worth running (token loops, quadratic memory), or None; a
            guide for benchmarks and tests, not enforced.
        limit: why ``max_T`` (e.g. "quadratic memory").
        requires: the optional package it imports (e.g. ``"fla"``), or None.
        takes: setting name -> the values of it this backend supports (others are refused).
        materializes: for a backend that builds a tensor growing faster than its inputs and outputs
            (a ``[T, T]`` matrix): called with the backend's arguments, returns the bytes of the
            largest such tensor and what it is, e.g. ``"a [T, T] float32 matrix for x of shape
            [...]"``; ``dispatch`` refuses calls past ``linmix.ops.max_dense_bytes()``. None if
            nothing grows faster than the inputs.
    """

    fn: Callable
    description: str
    native_dtypes: bool = False
    varlen: bool = False
    float64: bool = True
    needs_cuda: bool = False
    interpretable: bool = False
    max_T: int | None = None
    limit: str = ""
    requires: str | None = None
    takes: dict[str, tuple] = field(default_factory=dict)
    materializes: Callable[..., tuple[int, str]] | None = None

    def missing(self) -> str | None:
        """Why the backend cannot be imported here (its package is not installed), or None."""
        if self.requires and not installed(self.requires):
            return f"needs the optional package {self.requires!r}, which is not installed"
        return None

    def unavailable(self, device: torch.device) -> str | None:
        """Why the backend cannot run on ``device`` here, or None."""
        missing = self.missing()
        if missing:
            return missing
        if self.needs_cuda and device.type != "cuda" and not (self.interpretable and interpreting()):
            hint = " (TRITON_INTERPRET=1 runs it on the CPU)" if self.interpretable else ""
            return f"needs CUDA tensors, got {device}{hint}"
        return None

    def refuses(self, settings: dict) -> str | None:
        """Why the backend does not take these settings of the op (see ``takes``), or None."""
        for name, values in self.takes.items():
            if name in settings and settings[name] not in values:
                valid = " or ".join(f"{name}={v!r}" for v in values)
                return f"takes {valid} only, not {name}={settings[name]!r}"
        return None


@dataclass(frozen=True)
class Op:
    """A registered op: its backends and the facts ``dispatch`` needs.

    Attributes:
        name: the op's name, e.g. ``"decayed_attention"``.
        module: the op's package; its ``bench`` module holds the benchmark entry and its
            ``testing`` module the contract-test spec (``linmix.ops._testing.spec_of``).
        fn: the public function ``fn(*tensors, **settings, initial_state=, output_final_state=,
            cu_seqlens=, backend=) -> (o, final_state)``.
        backends: name -> Backend, in listing order.
        auto: backend names in order of preference for ``backend="auto"``: the first one that
            runs on the inputs' device (never an interpreted one) and takes the settings.
        per_token: tensor argument -> the numbers of dimensions at which it holds one row per
            position (dim 1); such tensors are split by ``cu_seqlens``, others are shared.
        float32_args: tensor arguments computed in float32 (float64 for float64 inputs) by every
            backend, whatever the input dtype (log decays, gates).
        step: the one-token step function ``step(**tensors at one position, **settings, state)
            -> (o_t, state)``.
        result_shapes: ``(tensors, settings, initial_state, sequences) -> (o shape, final state
            shape)`` (a tuple of shapes for a tuple state; ``sequences`` is B, or N with
            ``cu_seqlens``). With it ``dispatch`` answers a call whose results are empty, or whose
            T is 0, without a backend (see ``dispatch``); without it every call reaches the backend.
        counters: the indices of a tuple state's integer parts (e.g. the absolute position of the
            next token): int64, never cast to the compute dtype and not differentiated (see
            ``map_floating``); a state of one tensor is floating.
    """

    name: str
    module: str
    fn: Callable
    backends: dict[str, Backend]
    auto: tuple[str, ...]
    per_token: dict[str, tuple[int, ...]]
    step: Callable
    float32_args: tuple[str, ...] = ()
    result_shapes: Callable[[dict, dict, State, int], tuple[Shape, StateShape]] | None = None
    counters: tuple[int, ...] = ()

    def runnable(self, name: str, device: torch.device, settings: dict) -> bool:
        """Whether backend ``name`` runs on ``device`` (not interpreted) and takes ``settings``."""
        backend = self.backends[name]
        if backend.needs_cuda and device.type != "cuda":
            return False
        return backend.missing() is None and backend.refuses(settings) is None

    def choose(self, backend: str, device: torch.device, settings: dict, dtype: torch.dtype) -> str:
        """The backend that runs: ``auto`` resolved, and float64 inputs moved to one that computes float64.

        Raises:
            ValueError: the named backend cannot run here or does not take the settings.
        """
        if backend == "auto":
            candidates = [name for name in self.auto if self.runnable(name, device, settings)]
            if not candidates:
                raise ValueError(f"no backend of {self.name} in its auto order {self.auto} runs on {device} "
                                 f"with {settings}; name one with backend=")
            backend = candidates[0]
        chosen = self.backends[backend]
        if dtype == torch.float64 and not chosen.float64:
            fallbacks = [name for name in self.auto
                         if self.backends[name].float64 and self.runnable(name, device, settings)]
            if not fallbacks:
                raise ValueError(f"backend {backend!r} of {self.name} computes in float32 at most and no backend "
                                 f"of its auto order takes float64 inputs with {settings}")
            return fallbacks[0]
        reason = chosen.refuses(settings) or chosen.unavailable(device)
        if reason:
            raise ValueError(f"backend {backend!r} of {self.name} {reason}")
        return backend

    def backend_names(self) -> tuple[str, ...]:
        """The names ``backend=`` accepts: every backend and ``"auto"``."""
        return (*self.backends, "auto")


OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Add ``op`` to the registry ``OPS``.

    Raises:
        ValueError: the name is taken, or ``auto`` names an unknown backend or none that computes float64.
    """
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    unknown = [name for name in op.auto if name not in op.backends]
    if unknown or not op.auto:
        raise ValueError(f"op {op.name!r}: auto must name its backends, got {op.auto}")
    if not any(op.backends[name].float64 for name in op.auto):
        raise ValueError(f"op {op.name!r}: one backend of auto must compute float64 (the fallback)")
    for backend in op.backends.values():
        if backend.requires:
            installed(backend.requires)  # looked up now, outside any traced call
    OPS[op.name] = op
    return op


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``fn`` applied to a state: None, one tensor, or a tuple of tensors."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(fn(part) for part in state)
    return fn(state)


def map_floating(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``fn`` applied to a state's floating tensors; integer ones (counters, see ``Op.counters``) pass as they are."""
    return map_state(lambda part: fn(part) if part.is_floating_point() else part, state)


def _split_state(state: State, count: int) -> list[State]:
    """One state per sequence: every tensor split along dim 0 (``[N, ...]`` -> ``N`` of ``[1, ...]``)."""
    if state is None:
        return [None] * count
    if isinstance(state, tuple):
        return [tuple(parts) for parts in zip(*(part.split(1) for part in state), strict=True)]
    return list(state.split(1))


def _cat_states(states: list[State]) -> State:
    """The per-sequence states joined along dim 0 (the inverse of ``_split_state``)."""
    if states[0] is None:
        return None
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states, strict=True))
    return torch.cat(states)


def _per_sequence(op: Op, fn: Callable, tensors: dict, settings: dict, initial_state: State,
                  output_final_state: bool, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, State]:
    """Run ``fn`` on each packed sequence as if alone and join the results.

    The per-token tensors (``op.per_token``) are cut along T at the boundaries; every sequence
    starts from its row of ``initial_state`` (zeros if None).
    """
    lengths = cu_seqlens.diff().tolist()
    pieces = {name: (x.split(lengths, dim=1) if x.dim() in op.per_token.get(name, ()) else [x] * len(lengths))
              for name, x in tensors.items()}
    outputs, states = [], []
    for n, state in enumerate(_split_state(initial_state, len(lengths))):
        o, final_state = fn(**{name: parts[n] for name, parts in pieces.items()}, **settings,
                            initial_state=state, output_final_state=output_final_state)
        outputs.append(o)
        states.append(final_state)
    return torch.cat(outputs, dim=1), (_cat_states(states) if output_final_state else None)


def _state_items(prefix: str, state: State) -> list[tuple[str, torch.Tensor]]:
    """A state's tensors by name: ``prefix`` for one tensor, ``prefix[i]`` for each of a tuple."""
    if state is None:
        return []
    if isinstance(state, tuple):
        return [(f"{prefix}[{i}]", part) for i, part in enumerate(state)]
    return [(prefix, state)]


def _call_backend(op: Op, name: str, **kwargs) -> tuple[torch.Tensor, State]:
    """Backend ``name`` of ``op`` called with ``kwargs``, refused if its dense intermediate is past the limit."""
    backend = op.backends[name]
    if backend.materializes is not None:
        check_dense_bytes(op.name, name, *backend.materializes(**kwargs))
    return backend.fn(**kwargs)


def _run(op: Op, name: str, tensors: dict, settings: dict, initial_state: State, output_final_state: bool,
         cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, State]:
    """Backend ``name`` on the call: inputs cast to its dtypes, packed sequences one by one unless it takes them."""
    input_dtype = next(iter(tensors.values())).dtype
    dtype = compute_dtype(input_dtype)
    io_dtype = input_dtype if op.backends[name].native_dtypes else dtype
    tensors = {key: x.to(dtype if key in op.float32_args else io_dtype) for key, x in tensors.items()}
    initial_state = map_floating(lambda part: part.to(dtype), initial_state)
    backend = functools.partial(_call_backend, op, name)
    if cu_seqlens is None:
        o, final_state = backend(**tensors, **settings, initial_state=initial_state,
                                 output_final_state=output_final_state)
    elif op.backends[name].varlen:
        o, final_state = backend(**tensors, **settings, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    else:
        o, final_state = _per_sequence(op, backend, tensors, settings, initial_state, output_final_state, cu_seqlens)
    return o.to(input_dtype), final_state


def _is_one_shape(shape: StateShape) -> bool:
    """Whether ``shape`` is one tensor's shape (sizes, symbolic ones too), not one per tensor of a tuple state."""
    return not any(isinstance(n, tuple) for n in shape)


def _shapes_of(shape: StateShape) -> tuple[Shape, ...]:
    """The shapes of a state's tensors: ``shape`` itself for one tensor, its items for a tuple."""
    return (shape,) if _is_one_shape(shape) else shape


def _nothing_to_compute(T: int, o_shape: Shape, state_shape: StateShape, output_final_state: bool) -> bool:
    """Whether a call's results are known without a backend: ``o`` is empty and the final state is not
    asked for, or is empty too, or is the initial state (T = 0)."""
    if math.prod(o_shape) != 0:
        return False
    return T == 0 or not output_final_state or all(math.prod(shape) == 0 for shape in _shapes_of(state_shape))


def _zero_depending_on(leaves: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A float32 zero whose gradient to each leaf that requires grad is zeros of its shape (no value is read)."""
    zero = torch.zeros((), device=device)
    return sum((x.reshape(-1)[:0].sum().float() for x in leaves if x.requires_grad), zero)


def _result_without_backend(op: Op, tensors: dict, initial_state: State, o_shape: Shape, state_shape: StateShape,
                            output_final_state: bool) -> tuple[torch.Tensor, State]:
    """The results of a call with nothing to compute: ``o`` of zeros (empty); the final state the initial
    state if T = 0 (zeros if None), else zeros (empty), its counters int64. Gradients flow: zeros to
    every input, and the final state's to the initial state when it passes through."""
    first = next(iter(tensors.values()))
    dtype = compute_dtype(first.dtype)
    leaves = [*tensors.values(), *(part for _, part in _state_items("s", initial_state))]
    zero = _zero_depending_on(leaves, first.device)
    o = torch.zeros(o_shape, dtype=first.dtype, device=first.device) + zero.to(first.dtype)
    if not output_final_state:
        return o, None
    if first.shape[1] == 0 and initial_state is not None:
        return o, map_floating(lambda part: part.to(dtype) + zero.to(dtype), initial_state)
    zeros = tuple(torch.zeros(shape, dtype=torch.int64, device=first.device) if i in op.counters
                  else torch.zeros(shape, dtype=dtype, device=first.device) + zero.to(dtype)
                  for i, shape in enumerate(_shapes_of(state_shape)))
    return o, (zeros[0] if _is_one_shape(state_shape) else zeros)


def dispatch(op: Op, backend: str, tensors: dict[str, torch.Tensor], settings: dict, *,
             initial_state: State = None, output_final_state: bool = False,
             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
    """Run a validated call of ``op`` on a backend.

    Zero-size dimensions: a call whose ``o`` has no element, and whose final state is not asked for,
    has no element either, or is the initial state (``T = 0``), is answered without a backend
    (where the op gives ``result_shapes``): ``o`` empty, the final state the initial state for
    ``T = 0`` (zeros if None) and empty otherwise, gradients zeros of the inputs' shapes. So every
    backend behaves alike on empty batches.

    Args:
        op: the registered op.
        backend: a name of ``op.backend_names()``.
        tensors: the op's tensor arguments by name, all in one floating dtype (the first one's is
            the output's; its dims 0 and 1 are B and T), validated.
        settings: the op's other arguments by name (scale, form, ...), passed through.
        initial_state: the state before the first position (one tensor or a tuple; one row per
            sequence), or None.
        output_final_state: whether to return the state after the last position.
        cu_seqlens: boundaries of sequences packed along T (``B = 1``), or None.

    Returns:
        ``(o, final_state)``: ``o`` in the input dtype; the state in float32 (float64 for
        float64 inputs), or None unless ``output_final_state``.

    Raises:
        ValueError: the backend cannot run here or take the settings; it would build a dense
            intermediate past ``linmix.ops.max_dense_bytes()``; with ``linmix.ops.check_finite``
            on, an input or an output holds NaN or an infinity.
    """
    first = next(iter(tensors.values()))
    if SETTINGS.check_finite:
        check_inputs_finite(op.name, [*tensors.items(), *_state_items("initial_state", initial_state)])
    name = op.choose(backend, first.device, settings, compute_dtype(first.dtype))
    if op.result_shapes is not None:
        sequences = first.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        o_shape, state_shape = op.result_shapes(tensors, settings, initial_state, sequences)
        if _nothing_to_compute(first.shape[1], o_shape, state_shape, output_final_state):
            return _result_without_backend(op, tensors, initial_state, o_shape, state_shape, output_final_state)
    o, final_state = _run(op, name, tensors, settings, initial_state, output_final_state, cu_seqlens)
    if SETTINGS.check_finite:
        check_outputs_finite(op.name, name, [("o", o), *_state_items("final_state", final_state)])
    return o, final_state
