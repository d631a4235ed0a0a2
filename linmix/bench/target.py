"""What the runner benchmarks: a target (an op entry or a layer, options resolved) and its contenders.

A contender is one backend of the target's function, gated against the target's reference, or a
baseline measured beside them (another function, exempt from the gate). Op entries
(``linmix.bench.op_entries``) and the layer entry (``linmix.bench.layer_entry``) build targets; the
runner knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _unchanged(inputs: dict) -> dict:
    return inputs


def _available(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Contender:
    """One backend of a target, or a baseline measured beside them.

    Attributes:
        description: one line for ``--list``.
        run: ``prepared inputs -> output tensor``; timed.
        flops: ``inputs -> forward FLOPs`` (linmix.bench.cost); only the inputs' shapes are read.
        prepare: ``inputs -> prepared inputs``, run once outside timing (a layout change, a layer
            built at the input's width). Differentiable, so the gate's gradients reach the inputs.
        baseline: computes another function (sdpa, an attention layer): exempt from the gate.
        max_T: the longest sequence measured; longer shapes are "skipped" for ``limit``.
        limit: why shapes beyond ``max_T`` are skipped.
        unavailable: ``device -> reason`` it cannot run there (not installed, needs CUDA), or None.
        tolerance: the relative RMS error the gate allows it (float32 against the float64 reference).
        traffic: ``(inputs, backward) -> bytes`` its kernels move in one call by its own model, or None.
    """

    description: str
    run: Callable[[dict], torch.Tensor]
    flops: Callable[[dict], float]
    prepare: Callable[[dict], dict] = _unchanged
    baseline: bool = False
    max_T: int | None = None
    limit: str = ""
    unavailable: Callable[[torch.device], str | None] = _available
    tolerance: float = 0.0
    traffic: Callable[[dict, bool], float] | None = None


@dataclass(frozen=True)
class BenchTarget:
    """A benchmark ready to plan: contenders, shapes, inputs and the gate's reference.

    Attributes:
        op: the ``--op`` name (an op, or ``"layer"``).
        mixer: the ``--mixer`` of a layer target, else None.
        title: how reports name it, e.g. ``"decayed_attention"`` or ``"layer k2"``.
        description: one line for ``--list``.
        contenders: backend or baseline name -> Contender, in listing order.
        default_backends: what ``--backends`` means when not given.
        reference: the contender the gate runs in float64 as the ground truth.
        shape_keys: the keys of every shape, in label order.
        shape_sets: ``--shapes`` name -> shapes.
        gate_shape: the small shape of the correctness gate.
        build_inputs: ``(shape, dtype, device, requires_grad) -> inputs``: tensors (leaves, floating
            ones requiring grad as asked) and plain settings by name.
        options: the options in force, defaults included.
        option_choices: option name -> its allowed values, where they form a set.
        ratio_baselines: contenders that get an "x vs NAME" speed ratio column when measured.
        cost_model: where the FLOP count of its backends is written down.
    """

    op: str
    mixer: str | None
    title: str
    description: str
    contenders: dict[str, Contender]
    default_backends: tuple[str, ...]
    reference: str
    shape_keys: tuple[str, ...]
    shape_sets: dict[str, list[dict]]
    gate_shape: dict
    build_inputs: Callable[[dict, torch.dtype, torch.device, bool], dict]
    options: dict
    option_choices: dict[str, tuple] = field(default_factory=dict)
    ratio_baselines: tuple[str, ...] = ()
    cost_model: str = ""
