"""The layer entry: ``linmix bench --op layer --mixer NAME`` benchmarks any registered mixer.

The input is ``x [B, T, d]`` (shape keys ``B, T, d``; the sets ``fla`` and ``tsweep`` at d = 1024,
and ``small``). The mixer is built from its registration's bench config at width ``d`` and context
length ``T`` (``MixerEntry.bench_config``); ``--option FIELD=VALUE`` sets further config fields.
It is built on the CPU from the input seed and then moved, so every backend and the gate's
reference hold the same parameters.

Backends: one per backend of the mixer's ``backend_op``, setting its ``backend_field`` (the op's
limits and availability apply), or the single backend "default" for a mixer without one. The gate
runs each in float32 against the same mixer with backend "naive" (else its single backend) in
float64. Baselines: "attention", the registered attention mixer at width ``d`` with its bench
config (heads of width 64), and "sdpa", causal attention on the input split into as many heads.
Every FLOP count is torch's counter over a forward on the meta device (linmix.bench.cost).
"""

from __future__ import annotations

import functools

import torch

from linmix.bench.baselines import Baseline, causal_sdpa, heads_first
from linmix.bench.cost import counted_flops
from linmix.bench.inputs import INPUT_SEED, input_generator
from linmix.bench.op_entries import REFERENCE, op_bench
from linmix.bench.shapes import FLA_SHAPES, tsweep
from linmix.bench.target import BenchTarget, Contender
from linmix.layers import MIXERS, Mixer, build_mixer, mixer_config, mixer_entry
from linmix.layers.registry import SIZE_FIELDS, MixerEntry
from linmix.ops import OPS
from linmix.ops._testing import spec_of

LAYER = "layer"  # the --op name of this entry
SINGLE_BACKEND = "default"  # the backend of a mixer without a backend field
WIDTH = 1024  # d of the fla and tsweep sets
LAYER_SHAPE_SETS = {
    "fla": [{"B": B, "T": T, "d": WIDTH} for B, T, _, _ in FLA_SHAPES],
    "tsweep": tsweep(d=WIDTH),
    "small": [{"B": 2, "T": 64, "d": 64}, {"B": 1, "T": 130, "d": 64}],
}
GATE_SHAPE = {"B": 1, "T": 257, "d": 64}
# The gate's bound for a layer (or its op's, if looser): the gradient of a scalar parameter (K2's
# gate logit) sums B T d products that cancel, 4e-5 off in float32 at the gate shape.
LAYER_TOLERANCE = 1e-3


def _layer_inputs(shape: dict, dtype: torch.dtype, device: torch.device, requires_grad: bool) -> dict:
    """``{"x": [B, T, d]}``, standard normal from the input seed."""
    x = torch.randn(shape["B"], shape["T"], shape["d"], generator=input_generator(device), dtype=torch.float64,
                    device=device)
    return {"x": x.to(dtype).requires_grad_(requires_grad)}


def _layer_fields(entry: MixerEntry, d: int, T: int, fields: dict) -> dict:
    """The config fields of mixer ``entry`` at width ``d`` and context ``T``: its bench config, then ``fields``."""
    return {"d_model": d, "context_length": T, **entry.bench_config(d), **fields}


def _seeded_layer(entry: MixerEntry, fields: dict, x: torch.Tensor) -> Mixer:
    """The mixer for input ``x``, built on the CPU from the input seed, moved to ``x``'s device and dtype.

    On the meta device (FLOP counting) it is built there, without values.
    """
    config = _layer_fields(entry, x.shape[-1], x.shape[1], fields)
    if x.is_meta:
        with torch.device("meta"):
            return build_mixer(entry.name, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPUT_SEED)
        layer = build_mixer(entry.name, **config)
    return layer.to(x.device, x.dtype)


def _prepare_layer(entry: MixerEntry, fields: dict, inputs: dict) -> dict:
    return {"x": inputs["x"], "layer": _seeded_layer(entry, fields, inputs["x"])}


def _run_layer(prepared: dict) -> torch.Tensor:
    """``y [B, T, d]`` of ``prepared["layer"]`` on ``prepared["x"]``."""
    return prepared["layer"](prepared["x"])[0]


def _split_heads(inputs: dict) -> dict:
    """The input split into the attention baseline's heads, as q, k and v ``[B, heads, T, d / heads]``."""
    x = inputs["x"]  # [B, T, d]
    heads = MIXERS["attention"].bench_config(x.shape[-1])["n_heads"]
    split = x.unflatten(-1, (heads, x.shape[-1] // heads))  # [B, T, heads, d / heads]
    return heads_first(split, split, split)


BASELINES = {
    "attention": Baseline("the attention mixer at width d, its bench config (heads of width 64)",
                          functools.partial(_prepare_layer, MIXERS["attention"], {}), _run_layer),
    "sdpa": Baseline("causal scaled_dot_product_attention on the input split into the attention baseline's heads",
                     _split_heads, causal_sdpa),
}


def _mixer_contender(entry: MixerEntry, options: dict, backend: str | None) -> Contender:
    """The mixer with ``options`` and its backend field set to ``backend`` (None: a mixer without one)."""
    def fields(choice: str) -> dict:
        return {**options, entry.backend_field: choice} if backend else options

    prepare = functools.partial(_prepare_layer, entry, fields(backend))
    flops = functools.partial(counted_flops, functools.partial(_prepare_layer, entry, fields("auto")), _run_layer)
    if backend is None:
        return Contender(f"the {entry.name} mixer as configured", _run_layer, flops, prepare=prepare,
                         tolerance=LAYER_TOLERANCE)
    op = OPS[entry.backend_op]
    op_backend = op.backends[backend]
    return Contender(f"{entry.backend_field}={backend}: {op_backend.description}", _run_layer, flops, prepare=prepare,
                     max_T=op_backend.max_T, limit=op_backend.limit, unavailable=op_backend.unavailable,
                     tolerance=max(LAYER_TOLERANCE, spec_of(op).ratio(backend, torch.float32)))


def _check_options(entry: MixerEntry, options: dict) -> None:
    """Refuse options the benchmark sets itself, and any the mixer's config refuses at the gate shape."""
    owned = (*SIZE_FIELDS, *([entry.backend_field] if entry.backend_field else []))
    taken = sorted(set(options) & set(owned))
    if taken:
        picked = f"; --backends picks {entry.backend_field}" if entry.backend_field else ""
        raise ValueError(f"--option may not set {', '.join(taken)} for mixer {entry.name} (the shapes set d_model "
                         f"and context_length{picked})")
    try:
        mixer_config(entry.name, **_layer_fields(entry, GATE_SHAPE["d"], GATE_SHAPE["T"], options))
    except (TypeError, ValueError) as error:
        given = " ".join(f"{key}={value!r}" for key, value in options.items())
        raise ValueError(f"--option {given} for mixer {entry.name}: {error}") from error


def layer_target(mixer: str, options: dict | None = None) -> BenchTarget:
    """The layer benchmark of a registered mixer.

    Args:
        mixer: a name in ``linmix.layers.MIXERS``.
        options: config fields of the mixer, over its bench config.

    Returns:
        the BenchTarget.

    Raises:
        ValueError: an unknown mixer, or options its config refuses or that the benchmark sets.
    """
    entry = mixer_entry(mixer)
    options = dict(options or {})
    _check_options(entry, options)
    if entry.backend_op is None:
        contenders = {SINGLE_BACKEND: _mixer_contender(entry, options, None)}
        reference, defaults, ratios = SINGLE_BACKEND, (SINGLE_BACKEND,), ()
    else:  # the op's backends, and of its entry's defaults and ratio columns those that are backends
        op = OPS[entry.backend_op]
        op_entry = op_bench(op)
        contenders = {name: _mixer_contender(entry, options, name) for name in op.backends}
        reference = REFERENCE
        defaults = tuple(name for name in op_entry.default_backends if name in op.backends)
        ratios = tuple(name for name in op_entry.ratio_baselines if name in op.backends)
    clash = sorted(set(contenders) & set(BASELINES))
    if clash:
        raise ValueError(f"mixer {mixer}: backends {', '.join(clash)} share a name with the layer baselines")
    contenders.update({name: baseline.contender() for name, baseline in BASELINES.items()})
    return BenchTarget(
        op=LAYER, mixer=mixer, title=f"{LAYER} {mixer}",
        description=f"the {mixer} mixer ({entry.module_cls.__name__}) on x [B, T, d] at its bench config",
        contenders=contenders, default_backends=(*defaults, *BASELINES), reference=reference,
        shape_keys=("B", "T", "d"), shape_sets=LAYER_SHAPE_SETS, gate_shape=dict(GATE_SHAPE),
        build_inputs=_layer_inputs, options=options, ratio_baselines=(*BASELINES, *ratios),
        cost_model="torch.utils.flop_counter over a forward on the meta device (linmix/bench/cost.py)",
    )
