"""Run a benchmark: plan it, gate every backend for correctness, time the sweep.

A backend is timed only after it passes the correctness gate (linmix.bench.gate). Every timing
is reported beside the baselines measured in the same run ("x vs NAME" = the baseline's time over
this backend's: above 1 is faster), with its TFLOP/s, GB/s and roofline fraction by the cost
model of linmix.bench.cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import yaml

from linmix.bench.cost import Cost, mode_cost
from linmix.bench.gate import describe, gate_backends, grad_targets, output_grad
from linmix.bench.inputs import DTYPES, tensor_bytes
from linmix.bench.layer_entry import LAYER, layer_target
from linmix.bench.machine import machine_info
from linmix.bench.op_entries import op_target
from linmix.bench.roofs import Roofs, find_roofs
from linmix.bench.shapes import parse_shapes, shape_label
from linmix.bench.target import BenchTarget
from linmix.bench.timing import Timing, measure, timer_name
from linmix.ops import OPS

MODES = ("fwd", "fwdbwd")
SCALING_REFERENCE_T = 4096  # the scaling summary reports time(longest T) / time(T=4096)


@dataclass
class Plan:
    """A validated benchmark request.

    Attributes:
        target: what is benchmarked (an op entry or a layer, options resolved).
        backends: contender names, in report order.
        modes: subset of ``MODES``.
        shapes: shape dicts with the target's shape keys.
        shape_set: the shape set's name, or "custom".
        dtype: name of the benchmark dtype (a key of ``DTYPES``).
        device: where everything runs.
        warmup_ms: warm-up time per measurement.
        rep_ms: timed time per measurement.
        roofs: the roofline's peaks and where they came from.
        kernel_calls: calls profiled per timed row for its per-kernel GPU times (0: none; CUDA only).
    """

    target: BenchTarget
    backends: list[str]
    modes: list[str]
    shapes: list[dict]
    shape_set: str
    dtype: str
    device: torch.device
    warmup_ms: float
    rep_ms: float
    roofs: Roofs
    kernel_calls: int = 0


def parse_options(pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as ``{KEY: VALUE}``, each value read as YAML (as ``--set`` reads them).

    Raises:
        ValueError: a pair without ``=`` or a key, or a value that is not YAML.
    """
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--option {key}: {value!r} is not a YAML value") from error
    return options


def bench_target(op: str, mixer: str | None = None, options: dict | None = None) -> BenchTarget:
    """The target of ``--op`` (and ``--mixer`` for ``--op layer``) with ``--option`` values applied.

    Raises:
        ValueError: an unknown op or mixer, a mixer without ``--op layer`` or the reverse, a bad option.
    """
    if op == LAYER:
        if not mixer:
            raise ValueError("--op layer needs --mixer (see `linmix bench --list`)")
        return layer_target(mixer, options)
    if mixer is not None:
        raise ValueError(f"--mixer goes with --op layer, not --op {op}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}, or {LAYER} (with --mixer)")
    return op_target(op, options)


def _resolve_device(device: str | None) -> torch.device:
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return resolved


def plan_benchmark(op: str, *, mixer: str | None = None, backends: list[str] | None = None,
                   modes: list[str] | None = None, shapes: str = "fla", dtype: str = "bf16", device: str | None = None,
                   options: dict | None = None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                   peak_tflops: float | None = None, peak_gbps: float | None = None, kernel_calls: int = 0) -> Plan:
    """Check a benchmark request and resolve its defaults.

    Args:
        op: a registered op, or ``"layer"``.
        mixer: with ``op="layer"``, a registered mixer.
        backends: backend and baseline names; None for the target's defaults.
        modes: subset of ``("fwd", "fwdbwd")``; None for both.
        shapes: a shape set of the target, or a JSON dict or list of dicts with its shape keys.
        dtype: "bf16", "fp16" or "fp32".
        device: "cuda", "cuda:N" or "cpu"; None for cuda when available, else cpu.
        options: an op entry's options (``{"regime": ...}``) or a mixer's config fields.
        warmup_ms: warm-up time per measurement.
        rep_ms: timed time per measurement.
        peak_tflops: compute roof; None for the GPU's datasheet peak in ``dtype`` (linmix.bench.roofs).
        peak_gbps: memory roof; None for the GPU's datasheet bandwidth.
        kernel_calls: after timing a row, profile this many more calls and record each kernel's
            GPU time per call (CUDA only; 0 for none).

    Returns:
        the Plan.

    Raises:
        ValueError: a name, shape, option or number that the target or this machine does not support.
    """
    target = bench_target(op, mixer, options)
    backends = list(dict.fromkeys(backends or target.default_backends))
    unknown = [name for name in backends if name not in target.contenders]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)} for {target.title}; backends and baselines: "
                         f"{', '.join(target.contenders)}")
    modes = list(modes or MODES)
    if not modes or any(mode not in MODES for mode in modes):
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {modes}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("warmup_ms", warmup_ms), ("rep_ms", rep_ms)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not isinstance(kernel_calls, int) or kernel_calls < 0:
        raise ValueError(f"kernels must be a non-negative number of calls, got {kernel_calls!r}")
    resolved = _resolve_device(device)
    if kernel_calls and resolved.type != "cuda":
        raise ValueError("kernels: per-kernel GPU times need a CUDA device")
    shape_set, shape_list = parse_shapes(shapes, target.shape_keys, target.shape_sets, target.title)
    return Plan(target=target, backends=backends, modes=modes, shapes=shape_list, shape_set=shape_set, dtype=dtype,
                device=resolved, warmup_ms=warmup_ms, rep_ms=rep_ms,
                roofs=find_roofs(resolved, dtype, peak_tflops, peak_gbps), kernel_calls=kernel_calls)


# ----------------------------------------------------------------------------- timing


def _detached_leaves(prepared: dict) -> dict:
    """The prepared inputs cut from the graph that built them: leaves keeping ``requires_grad``."""
    return {key: value.detach().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value
            for key, value in prepared.items()}


def _timed_step(plan: Plan, name: str, inputs: dict, mode: str) -> tuple[Callable[[], None], list, Cost]:
    """The call that a row times, the tensors whose gradients are reset before each call, and its cost.

    In fwd the forward runs under ``torch.no_grad``; in fwdbwd the forward and the backward of a
    fixed random output gradient. The cost's bytes are those of the prepared inputs and of one
    output (linmix.bench.cost).
    """
    contender = plan.target.contenders[name]
    prepared = _detached_leaves(contender.prepare(inputs))
    with torch.no_grad():
        probe = contender.run(prepared)
    cost = Cost(contender.flops(inputs), tensor_bytes(prepared), tensor_bytes(probe))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                contender.run(prepared)
        grads = []
    else:
        do = output_grad(probe.shape, probe.dtype, probe.device)

        def step():
            contender.run(prepared).backward(do)  # the gradient of (o * do).sum()
        grads = list(grad_targets(prepared, prepared).values())
    del probe
    return step, grads, cost


def kernel_times(plan: Plan, name: str, inputs: dict, mode: str) -> dict[str, float]:
    """GPU microseconds per call of every kernel a row's call launches, over ``plan.kernel_calls`` calls.

    The calls run back to back under ``torch.profiler`` (after the timing, so everything is
    compiled); the times are the kernels' own, without launch gaps, largest first.
    """
    step, grads, _ = _timed_step(plan, name, inputs, mode)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(plan.kernel_calls):
            for tensor in grads:
                tensor.grad = None
            step()
        torch.cuda.synchronize(plan.device)
    per_call = {event.key: event.self_device_time_total / plan.kernel_calls for event in profiler.key_averages()
                if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0}
    return dict(sorted(per_call.items(), key=lambda item: -item[1]))


def performance(plan: Plan, name: str, inputs: dict, cost: Cost, mode: str, timing: Timing) -> dict:
    """Achieved TFLOP/s, GB/s, the fraction of the roofline time (``max(F / peak_F, B / peak_B)``) and
    the contender's own kernel traffic, where it has a model of it.

    Args:
        plan: the plan (its roofs).
        name: the contender.
        inputs: the row's inputs.
        cost: the forward cost of one call.
        mode: "fwd" or "fwdbwd".
        timing: the row's timing.

    Returns:
        ``flops, bytes, tflops, gbps, roofline_pct, bound`` and, with a traffic model,
        ``kernel_bytes, kernel_gbps, kernel_bandwidth_pct`` (None without a memory roof).
    """
    flops, traffic = mode_cost(cost, mode)
    seconds = timing.median_ms * 1e-3
    result = {"flops": flops, "bytes": traffic, "tflops": flops / seconds / 1e12, "gbps": traffic / seconds / 1e9,
              "roofline_pct": None, "bound": None}
    roofs = plan.roofs
    if roofs.tflops and roofs.gbps:
        compute_s, memory_s = flops / (roofs.tflops * 1e12), traffic / (roofs.gbps * 1e9)
        result["roofline_pct"] = 100 * max(compute_s, memory_s) / seconds
        result["bound"] = "compute" if compute_s >= memory_s else "memory"
    kernel_traffic = plan.target.contenders[name].traffic
    if kernel_traffic is not None:
        kernel_bytes = kernel_traffic(inputs, mode == "fwdbwd")
        result.update(kernel_bytes=kernel_bytes, kernel_gbps=kernel_bytes / seconds / 1e9, kernel_bandwidth_pct=None)
        if roofs.gbps:
            result["kernel_bandwidth_pct"] = 100 * result["kernel_gbps"] / roofs.gbps
    return result


# ----------------------------------------------------------------------------- sweep


def _row(plan: Plan, name: str, shape: dict, mode: str, gate: dict | None) -> dict:
    return {
        "op": plan.target.title, "backend": name, "mode": mode, "shape": shape,
        "label": shape_label(plan.target.shape_keys, shape), "dtype": plan.dtype,
        "baseline": plan.target.contenders[name].baseline, "status": "ok", "reason": None,
        "gate": gate["status"] if gate else None, "gate_error": (gate or {}).get("error"),
        "median_ms": None, "p20_ms": None, "p80_ms": None, "vs": {},
    }


def _measure_row(plan: Plan, row: dict, inputs: dict) -> None:
    """Fill a row's timing and performance, or its error."""
    try:
        step, grads, cost = _timed_step(plan, row["backend"], inputs, row["mode"])
        timing = measure(step, plan.device, warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms, grad_to_none=grads)
        del step, grads
        if plan.kernel_calls:
            row["kernels_us"] = kernel_times(plan, row["backend"], inputs, row["mode"])
    except Exception as error:  # out of memory, a kernel refusing the shape: recorded, the sweep goes on
        row.update(status="error", reason=describe(error))
        return
    finally:
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
    row.update(performance(plan, row["backend"], inputs, cost, row["mode"], timing))


def _skip_reason(plan: Plan, name: str, shape: dict, gate: dict | None,
                 unavailable: str | None) -> tuple[str, str] | None:
    """``(status, reason)`` of a contender that is not timed on this shape, or None."""
    if unavailable:
        return "unavailable", unavailable
    if gate["status"] == "error":
        return "error", gate["message"]
    if gate["status"] == "failed":
        return "gate failed", f"relative RMS error {gate['error']:.2e} > {gate['tolerance']:.0e}"
    contender = plan.target.contenders[name]
    if contender.max_T is not None and shape["T"] > contender.max_T:
        return "skipped", f"{contender.limit}: T > {contender.max_T}"
    return None


def add_speed_ratios(rows: list[dict], baselines: tuple[str, ...]) -> None:
    """Set ``row["vs"][b] = time(b) / time(row)`` for each baseline b timed on the row's shape and mode."""
    times = {(row["label"], row["mode"], row["backend"]): row["median_ms"] for row in rows if row["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        for baseline in baselines:
            base_ms = times.get((row["label"], row["mode"], baseline))
            if base_ms is not None:
                row["vs"][baseline] = base_ms / row["median_ms"]


def scaling_summary(rows: list[dict]) -> dict:
    """How times grow with T, and where backends overtake the baselines.

    Args:
        rows: timed rows of one target, at least two distinct T per backend and mode to say anything.

    Returns:
        ``{"scaling": [{mode, backend, long_T, short_T, ratio}], "crossover": [{mode, backend,
        baseline, T, max_T}]}``: ratio is time(longest T) / time(T = 4096, else the shortest); T is
        the smallest length at which the backend is faster than the baseline, None if at none.
    """
    series: dict[tuple[str, str], dict[int, float]] = {}
    baseline_names = set()
    for row in rows:
        if row["status"] == "ok":
            series.setdefault((row["mode"], row["backend"]), {})[row["shape"]["T"]] = row["median_ms"]
            if row["baseline"]:
                baseline_names.add(row["backend"])
    scaling, crossover = [], []
    for (mode, name), times in series.items():
        if len(times) < 2:
            continue
        short = SCALING_REFERENCE_T if SCALING_REFERENCE_T in times else min(times)
        longest = max(times)
        if longest > short:
            scaling.append({"mode": mode, "backend": name, "long_T": longest, "short_T": short,
                            "ratio": times[longest] / times[short]})
        if name in baseline_names:
            continue
        for baseline in sorted(baseline_names):
            base = series.get((mode, baseline), {})
            common = sorted(set(times) & set(base))
            if len(common) >= 2:
                wins = [T for T in common if times[T] < base[T]]
                crossover.append({"mode": mode, "backend": name, "baseline": baseline, "T": wins[0] if wins else None,
                                  "max_T": common[-1]})
    return {"scaling": scaling, "crossover": crossover}


def _settings(plan: Plan) -> dict:
    """The report's record of what was run and against which roofs."""
    target = plan.target
    return {
        "op": target.op, "mixer": target.mixer, "title": target.title, "backends": plan.backends,
        "modes": plan.modes, "shape_set": plan.shape_set, "options": target.options, "dtype": plan.dtype,
        "device": str(plan.device), "timer": timer_name(plan.device), "warmup_ms": plan.warmup_ms,
        "rep_ms": plan.rep_ms, "peak_tflops": plan.roofs.tflops, "peak_gbps": plan.roofs.gbps,
        "roofs": plan.roofs.source, "gate_shape": target.gate_shape, "gate_reference": f"{target.reference}, float64",
        "cost_model": target.cost_model, "kernel_calls": plan.kernel_calls,
    }


def run_benchmark(plan: Plan, progress: Callable[[dict], None] | None = None) -> dict:
    """Gate every available backend, then time each backend on each shape and mode.

    Args:
        plan: from ``plan_benchmark``.
        progress: called with each finished row, or None.

    Returns:
        the report: ``{"machine", "settings", "gates", "rows", "summary"}``; every requested
        backend has a row per shape and mode, with status "ok" (timed), "skipped",
        "unavailable", "gate failed" or "error", and a reason for the last four.
    """
    target = plan.target
    unavailable = {name: target.contenders[name].unavailable(plan.device) for name in plan.backends}
    gates = gate_backends(target, [name for name in plan.backends if unavailable[name] is None], plan.modes,
                          plan.device)
    rows = []
    for shape in plan.shapes:
        for mode in plan.modes:
            inputs = target.build_inputs(shape, DTYPES[plan.dtype], plan.device, mode == "fwdbwd")
            for name in plan.backends:
                gate = gates.get(name, {}).get(mode)
                row = _row(plan, name, shape, mode, gate)
                skip = _skip_reason(plan, name, shape, gate, unavailable[name])
                if skip:
                    row.update(status=skip[0], reason=skip[1])
                else:
                    _measure_row(plan, row, inputs)
                rows.append(row)
                if progress:
                    progress(row)
            del inputs
    add_speed_ratios(rows, target.ratio_baselines)
    return {"machine": machine_info(plan.device), "settings": _settings(plan), "gates": gates, "rows": rows,
            "summary": scaling_summary(rows)}
