"""The op entries: every registered op declares its benchmark in its package's ``bench.py``.

An entry (``BENCH = OpBench(...)``) states what only the op can say: its benchmark shapes, the
gate's dims, the default input regime, its forward FLOP count with the derivation, its baselines
and default backends, and a backend's own traffic model where one has it. Everything else comes
from the op's registration (``linmix.ops.OPS``) and test spec (``linmix.ops._testing``):

* the backends are the op's registered backends, with their limits (``Backend.max_T``, ``limit``:
  longer shapes are "skipped") and availability (``needs_cuda``, ``requires``, settings the backend
  does not take: "unavailable");
* the inputs are the test spec's ``make_inputs`` in the chosen regime, cast to the benchmark dtype
  (``Op.float32_args`` kept in float32), without an initial state;
* the correctness gate runs each backend in float32 against the ``naive`` backend in float64 on the
  gate dims, held to the spec's tolerance ``spec.ratio(backend, torch.float32)``.

So an op is benchmarked once its ``bench.py`` exists: neither this module nor the runner names one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from linmix.bench.baselines import Baseline
from linmix.bench.inputs import input_generator
from linmix.bench.target import BenchTarget, Contender
from linmix.ops import OPS, Op
from linmix.ops._testing import OpTestSpec, spec_of

REFERENCE = "naive"  # the backend the gate runs in float64: every op's executable spec


@dataclass(frozen=True)
class OpBench:
    """An op's benchmark entry: ``BENCH`` in its package's ``bench.py``.

    Attributes:
        shape_keys: the dims of a shape in label order: ``T`` and the test spec's dims.
        shape_sets: ``--shapes`` name -> dims (``fla``, ``tsweep``, ``small``, ...).
        gate_dims: the dims of the correctness gate, small enough for the naive reference.
        regime: the default input regime, one of the test spec's (``--option regime=NAME``).
        flops: ``flops(**tensors, **settings) -> float``, the forward FLOPs of the op's algorithm
            on these inputs (linmix.bench.cost).
        default_backends: what ``--backends`` means when not given: backends and baselines.
        baselines: name -> a function measured beside the backends.
        ratio_baselines: backends or baselines that get an "x vs NAME" column when measured.
        traffic: backend -> ``traffic(**tensors, **settings, backward) -> bytes``, the bytes its
            kernels move in one call by their own model.
        call_kwargs: keyword arguments of the op's public function added to every benchmarked call.
    """

    shape_keys: tuple[str, ...]
    shape_sets: dict[str, list[dict]]
    gate_dims: dict
    regime: str
    flops: Callable[..., float]
    default_backends: tuple[str, ...]
    baselines: dict[str, Baseline] = field(default_factory=dict)
    ratio_baselines: tuple[str, ...] = ()
    traffic: dict[str, Callable[..., float]] = field(default_factory=dict)
    call_kwargs: dict = field(default_factory=dict)


def op_bench(op: Op) -> OpBench:
    """The ``BENCH`` of the op's ``bench`` module (``f"{op.module}.bench"``)."""
    return importlib.import_module(f"{op.module}.bench").BENCH


def op_entries() -> dict[str, OpBench]:
    """The entry of every op in ``linmix.ops.OPS``, by op name."""
    return {name: op_bench(op) for name, op in OPS.items()}


def _resolve_options(op: Op, entry: OpBench, spec: OpTestSpec, options: dict) -> dict:
    """The entry's options (the input regime) with ``options`` applied, checked against the spec."""
    unknown = sorted(set(options) - {"regime"})
    if unknown:
        raise ValueError(f"{op.name} takes no option {', '.join(unknown)}; its option: regime "
                         f"(one of {', '.join(spec.regimes)})")
    regime = options.get("regime", entry.regime)
    if regime not in spec.regimes:
        raise ValueError(f"regime must be one of {', '.join(spec.regimes)} for {op.name}, got {regime!r}")
    return {"regime": regime}


def _arg_dtype(op: Op, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of an op argument in a benchmark of ``dtype``: float32 arguments stay float32 (float64 in float64)."""
    return torch.float32 if name in op.float32_args and dtype != torch.float64 else dtype


def _op_inputs(op: Op, spec: OpTestSpec, regime: str, shape: dict, dtype: torch.dtype, device: torch.device,
               requires_grad: bool) -> dict:
    """The test spec's inputs for ``shape`` in the regime: tensors in the benchmark dtype, then the settings."""
    made = spec.make_inputs(dict(shape), regime, input_generator(device))
    tensors = {name: x.to(_arg_dtype(op, name, dtype)).requires_grad_(requires_grad) if x.is_floating_point() else x
               for name, x in made.tensors.items()}
    return {**tensors, **made.settings}


def _backend_contender(op: Op, entry: OpBench, spec: OpTestSpec, name: str, settings: dict) -> Contender:
    """Backend ``name`` of the op as the runner drives it: its public function with ``backend=name``."""
    backend = op.backends[name]
    traffic = entry.traffic.get(name)

    def run(inputs: dict) -> torch.Tensor:
        return op.fn(**inputs, **entry.call_kwargs, backend=name)[0]

    def unavailable(device: torch.device) -> str | None:
        return backend.unavailable(device) or backend.refuses(settings)

    return Contender(
        backend.description, run, lambda inputs: entry.flops(**inputs), max_T=backend.max_T, limit=backend.limit,
        unavailable=unavailable, tolerance=spec.ratio(name, torch.float32),
        traffic=None if traffic is None else lambda inputs, backward: traffic(**inputs, backward=backward),
    )


def op_target(name: str, options: dict | None = None) -> BenchTarget:
    """The benchmark of a registered op, its entry's options overridden by ``options``.

    Args:
        name: a name in ``linmix.ops.OPS``.
        options: ``{"regime": NAME}`` or empty.

    Returns:
        the BenchTarget.

    Raises:
        ValueError: an unknown option or regime, or an entry that names backends the op lacks.
    """
    op = OPS[name]
    entry, spec = op_bench(op), spec_of(op)
    options = _resolve_options(op, entry, spec, dict(options or {}))
    named = (*entry.default_backends, *entry.ratio_baselines, *entry.traffic, REFERENCE)
    unknown = sorted({backend for backend in named if backend not in {*op.backends, *entry.baselines}})
    if unknown:
        raise ValueError(f"{op.module}.bench names {', '.join(unknown)}, neither a backend of {name} nor a baseline")
    settings = spec.make_inputs(dict(entry.gate_dims), options["regime"], input_generator("cpu")).settings
    contenders = {backend: _backend_contender(op, entry, spec, backend, settings) for backend in op.backends}
    contenders.update({baseline: declared.contender() for baseline, declared in entry.baselines.items()})
    description = (importlib.import_module(op.module).__doc__ or name).strip().splitlines()[0]
    return BenchTarget(
        op=name, mixer=None, title=name, description=description, contenders=contenders,
        default_backends=entry.default_backends, reference=REFERENCE, shape_keys=entry.shape_keys,
        shape_sets=entry.shape_sets, gate_shape=dict(entry.gate_dims),
        build_inputs=lambda shape, dtype, device, requires_grad: _op_inputs(
            op, spec, options["regime"], shape, dtype, device, requires_grad),
        options=options, option_choices={"regime": spec.regimes}, ratio_baselines=entry.ratio_baselines,
        cost_model=f"{op.module.replace('.', '/')}/bench.py",
    )
