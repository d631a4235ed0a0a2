"""Run a benchmark: plan it, gate every backend for correctness, time the sweep, report.

A backend is timed only after it passes the correctness gate: one run on the op's small gate
shape in float32 against the op's reference backend in float64, forward (and backward when
fwdbwd is measured), compared in relative RMS error ``||ref - out|| / ||ref||``. Baselines
compute another function and are exempt. Every timing is reported beside the baselines measured
in the same run ("x vs NAME" = the baseline's time over this backend's: above 1 is faster).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from linmix.bench.registry import INPUT_SEED, OPS, Op, get_op, mode_cost, shape_label
from linmix.bench.timing import Timing, measure, timer_name

MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# H100 SXM5 (80 GB HBM3) datasheet peaks, dense: bf16/fp16 tensor cores 989.4 TFLOP/s; float32
# without tensor cores 66.9 TFLOP/s (PyTorch's float32 matmuls use no TF32 unless asked); HBM3
# 3.35 TB/s. --peak-tflops and --peak-gbps override them for other GPUs or precisions.
H100_PEAK_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}
H100_PEAK_GBPS = 3350.0
SCALING_REFERENCE_T = 4096  # the scaling summary reports time(longest T) / time(T=4096)


@dataclass
class Plan:
    """A validated benchmark request.

    Attributes:
        op: the op.
        backends: backend names, in report order.
        modes: subset of ``MODES``.
        shapes: complete shape dicts (the op's options merged in).
        shape_set: the shape set's name, or "custom".
        options: the op's input options after overrides (also used by the gate).
        dtype: name of the benchmark dtype (a key of ``DTYPES``).
        device: where everything runs.
        warmup_ms: warm-up time per measurement.
        rep_ms: timed time per measurement.
        peak_tflops: compute roof in TFLOP/s, or None (no roofline).
        peak_gbps: memory roof in GB/s, or None.
        kernel_calls: calls profiled per timed row for its per-kernel GPU times (0: none; CUDA only).
    """

    op: Op
    backends: list[str]
    modes: list[str]
    shapes: list[dict]
    shape_set: str
    options: dict
    dtype: str
    device: torch.device
    warmup_ms: float
    rep_ms: float
    peak_tflops: float | None
    peak_gbps: float | None
    kernel_calls: int = 0


def _parse_shapes(op: Op, shapes: str, options: dict) -> tuple[str, list[dict]]:
    """A shape set's name, or a JSON dict or list of dicts, as complete shape dicts."""
    if not shapes.lstrip().startswith(("{", "[")):
        if shapes not in op.shape_sets:
            raise ValueError(f"unknown shape set {shapes!r} for {op.name}; sets: {', '.join(op.shape_sets)}, "
                             "or a JSON dict or list of dicts")
        return shapes, [{**shape, **options} for shape in op.shape_sets[shapes]]
    try:
        custom = json.loads(shapes)
    except json.JSONDecodeError as error:
        raise ValueError(f"--shapes is not valid JSON ({error}): {shapes!r}") from error
    custom = [custom] if isinstance(custom, dict) else custom
    if not isinstance(custom, list) or not custom or not all(isinstance(shape, dict) for shape in custom):
        raise ValueError(f"custom --shapes must be a JSON dict or a non-empty list of dicts, got {shapes!r}")
    complete = []
    for shape in custom:
        unknown = set(shape) - set(op.shape_keys) - set(op.options)
        missing = [key for key in op.shape_keys if key not in shape]
        if unknown or missing:
            raise ValueError(f"shape {shape} for {op.name}: needs keys {', '.join(op.shape_keys)}"
                             + (f" and may set {', '.join(op.options)}" if op.options else "")
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(sorted(unknown))}" if unknown else ""))
        if not all(isinstance(shape[key], int) and shape[key] > 0 for key in op.shape_keys):
            raise ValueError(f"shape {shape}: {', '.join(op.shape_keys)} must be positive integers")
        complete.append({**options, **shape})
    return "custom", complete


def plan_benchmark(op: str, *, backends: list[str] | None = None, modes: list[str] | None = None,
                   shapes: str = "fla", dtype: str = "bf16", device: str | None = None,
                   options: dict | None = None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                   peak_tflops: float | None = None, peak_gbps: float | None = None, kernel_calls: int = 0) -> Plan:
    """Check a benchmark request and resolve its defaults.

    Args:
        op: a registered op name.
        backends: backend names; None for the op's defaults.
        modes: subset of ``("fwd", "fwdbwd")``; None for both.
        shapes: a shape set of the op, or a JSON dict or list of dicts with the op's shape keys.
        dtype: "bf16", "fp16" or "fp32".
        device: "cuda", "cuda:N" or "cpu"; None for cuda when available, else cpu.
        options: overrides of the op's input options, e.g. ``{"decay": "per-token"}``.
        warmup_ms: warm-up time per measurement.
        rep_ms: timed time per measurement.
        peak_tflops: compute roof; None for the H100's peak in ``dtype`` on CUDA, no roofline on CPU.
        peak_gbps: memory roof; None for the H100's HBM3 on CUDA, no roofline on CPU.
        kernel_calls: after timing a row, profile this many more calls and record each kernel's
            GPU time per call (CUDA only; 0 for none).

    Returns:
        the Plan.

    Raises:
        ValueError: a name, shape, option or number that the op or this machine does not support.
    """
    spec = get_op(op)
    backends = list(dict.fromkeys(backends or spec.default_backends))
    unknown = [name for name in backends if name not in spec.backends]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)} for {op}; backends: {', '.join(spec.backends)}")
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
    options = dict(options or {})
    unknown_options = set(options) - set(spec.options)
    if unknown_options:
        raise ValueError(f"{op} takes no option {', '.join(sorted(unknown_options))}"
                         + (f"; its options: {', '.join(spec.options)}" if spec.options else ""))
    for name, value in options.items():
        choices = spec.option_choices.get(name)
        if choices and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    options = {**spec.options, **options}
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    shape_set, shape_list = _parse_shapes(spec, shapes, options)
    on_gpu = resolved.type == "cuda"
    if kernel_calls and not on_gpu:
        raise ValueError("kernels: per-kernel GPU times need a CUDA device")
    return Plan(
        op=spec, backends=backends, modes=modes, shapes=shape_list, shape_set=shape_set, options=options,
        dtype=dtype, device=resolved, warmup_ms=warmup_ms, rep_ms=rep_ms,
        peak_tflops=peak_tflops or (H100_PEAK_TFLOPS[dtype] if on_gpu else None),
        peak_gbps=peak_gbps or (H100_PEAK_GBPS if on_gpu else None), kernel_calls=kernel_calls,
    )


# ----------------------------------------------------------------------------- correctness gate


def relative_rms_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||ref - out||_2 / ||ref||_2`` in float64 (the plain norm of the difference if ``ref`` is 0).

    Returns:
        the error; ``inf`` for a shape mismatch or a non-finite value in ``out``.
    """
    if ref.shape != out.shape or not torch.isfinite(out).all():
        return math.inf
    ref64, out64 = ref.detach().double(), out.detach().double()
    diff = torch.linalg.vector_norm(ref64 - out64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    return diff / norm if norm > 0 else diff


def _leaf_copies(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaves of the inputs' tensors (cast to ``dtype`` if given); plain values unchanged."""
    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().to(dtype or value.dtype, copy=True).requires_grad_(value.requires_grad)

    return {name: copy(value) for name, value in inputs.items()}


def _grad_targets(inputs: dict, prepared: dict) -> dict[str, torch.Tensor]:
    """The tensors a backward fills: inputs that require grad, and parameters of prepared layers."""
    targets = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor) and value.requires_grad}
    for key, value in prepared.items():
        if isinstance(value, nn.Module):
            targets.update({f"{key}.{name}": param for name, param in value.named_parameters()})
    return targets


def _output_grad(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed random gradient of the output: ``do`` of ``(o * do).sum()``."""
    generator = torch.Generator(device=device).manual_seed(INPUT_SEED + 1)
    return torch.randn(shape, generator=generator, device=device).to(dtype)


def _outputs_and_grads(op: Op, name: str, inputs: dict, shape: dict, with_grads: bool) -> dict[str, torch.Tensor]:
    """The output ``"o"`` of one backend and, with ``with_grads``, every gradient of ``(o * do).sum()``."""
    backend = op.backends[name]
    prepared = backend.prepare(inputs, shape)
    out = backend.run(prepared)
    if not with_grads:
        return {"o": out.detach()}
    targets = _grad_targets(inputs, prepared)
    out.backward(_output_grad(out.shape, out.dtype, out.device))
    grads = {f"d{key}": (t.grad if t.grad is not None else torch.zeros_like(t)) for key, t in targets.items()}
    return {"o": out.detach(), **grads}


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def gate_backend(op: Op, name: str, modes: list[str], options: dict, device: torch.device) -> dict[str, dict]:
    """Check one backend against the op's reference on the gate shape, float32 against float64.

    Args:
        op: the op.
        name: the backend to check.
        modes: the modes to check ("fwd": the output; "fwdbwd": the output and all gradients).
        options: the op's input options (e.g. the decay kind) for the gate's inputs.
        device: where both run.

    Returns:
        mode -> ``{"status": "passed" | "failed" | "error" | "baseline", "tolerance", "error"
        (largest relative RMS error), "errors" (per tensor), "message" (for "error")}``.
    """
    if op.backends[name].baseline:
        return {mode: {"status": "baseline"} for mode in modes}
    tolerance = op.backends[name].gate_tolerance or op.gate_tolerance
    shape = {**options, **op.gate_shape}
    with_grads = "fwdbwd" in modes
    try:
        inputs = op.build_inputs(shape, torch.float32, str(device), True)
        ref = _outputs_and_grads(op, op.reference, _leaf_copies(inputs, torch.float64), shape, with_grads)
        out = _outputs_and_grads(op, name, _leaf_copies(inputs), shape, with_grads)
    except Exception as error:  # a backend that refuses these inputs is reported, not raised
        return {mode: {"status": "error", "message": _describe(error)} for mode in modes}
    errors = {key: relative_rms_error(ref[key], out.get(key, torch.zeros_like(ref[key]))) for key in ref}
    results = {}
    for mode in modes:
        checked = {key: value for key, value in errors.items() if mode == "fwdbwd" or key == "o"}
        worst = max(checked.values())
        status = "passed" if worst <= tolerance else "failed"
        results[mode] = {"status": status, "tolerance": tolerance, "error": worst, "errors": checked}
    return results


# ----------------------------------------------------------------------------- sweep


def unavailable_reason(op: Op, name: str, device: torch.device) -> str | None:
    """Why a backend cannot run here ("not installed", "needs a CUDA device", ...), or None."""
    backend = op.backends[name]
    missing = backend.missing()
    if missing:
        return missing
    if backend.needs_cuda and device.type != "cuda":
        return "needs a CUDA device"
    return None


def _detached_leaves(prepared: dict) -> dict:
    """The prepared inputs cut from the graph that built them: leaves keeping ``requires_grad``."""
    return {key: value.detach().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value
            for key, value in prepared.items()}


def _timed_step(plan: Plan, name: str, inputs: dict, shape: dict, mode: str) -> tuple[Callable[[], None], list]:
    """The call that a row times, and the tensors whose gradients are reset before each call.

    In fwd the forward runs under ``torch.no_grad``; in fwdbwd the forward and the backward of a
    fixed random output gradient.
    """
    backend = plan.op.backends[name]
    prepared = _detached_leaves(backend.prepare(inputs, shape))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                backend.run(prepared)
        grads = []
    else:
        with torch.no_grad():
            probe = backend.run(prepared)
        do = _output_grad(probe.shape, probe.dtype, probe.device)
        del probe

        def step():
            backend.run(prepared).backward(do)  # the gradient of (o * do).sum()
        grads = list(_grad_targets(prepared, prepared).values())
    return step, grads


def time_backend(plan: Plan, name: str, inputs: dict, shape: dict, mode: str) -> Timing:
    """Time one backend on inputs built once; in fwdbwd the output gradient is fixed and random.

    Args:
        plan: the benchmark plan (device, warm-up and timed durations).
        name: the backend.
        inputs: the op's inputs for ``shape`` (requiring grad in fwdbwd).
        shape: the shape dict.
        mode: "fwd" (forward under ``torch.no_grad``) or "fwdbwd" (forward and backward).

    Returns:
        the Timing.
    """
    step, grads = _timed_step(plan, name, inputs, shape, mode)
    return measure(step, plan.device, warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms, grad_to_none=grads)


def kernel_times(plan: Plan, name: str, inputs: dict, shape: dict, mode: str) -> dict[str, float]:
    """GPU microseconds per call of every kernel a row's call launches, over ``plan.kernel_calls`` calls.

    The calls run back to back under ``torch.profiler`` (after the timing, so everything is
    compiled); the times are the kernels' own, without launch gaps, largest first.
    """
    step, grads = _timed_step(plan, name, inputs, shape, mode)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(plan.kernel_calls):
            for tensor in grads:
                tensor.grad = None
            step()
        torch.cuda.synchronize(plan.device)
    per_call = {event.key: event.self_device_time_total / plan.kernel_calls for event in profiler.key_averages()
                if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0}
    return dict(sorted(per_call.items(), key=lambda item: -item[1]))


def _performance(plan: Plan, name: str, shape: dict, mode: str, timing: Timing) -> dict:
    """Achieved TFLOP/s, GB/s and the fraction of the roofline time (``max(F / peak_F, B / peak_B)``)."""
    flops, traffic = mode_cost(plan.op.cost_of(name, shape, DTYPES[plan.dtype]), mode)
    seconds = timing.median_ms * 1e-3
    result = {"flops": flops, "bytes": traffic, "tflops": flops / seconds / 1e12, "gbps": traffic / seconds / 1e9,
              "roofline_pct": None, "bound": None}
    if plan.peak_tflops and plan.peak_gbps:
        compute_s, memory_s = flops / (plan.peak_tflops * 1e12), traffic / (plan.peak_gbps * 1e9)
        result["roofline_pct"] = 100 * max(compute_s, memory_s) / seconds
        result["bound"] = "compute" if compute_s >= memory_s else "memory"
    kernel_traffic = plan.op.backends[name].traffic
    if kernel_traffic is not None:
        kernel_bytes = kernel_traffic(shape, DTYPES[plan.dtype], mode)
        result.update(kernel_bytes=kernel_bytes, kernel_gbps=kernel_bytes / seconds / 1e9, kernel_bandwidth_pct=None)
        if plan.peak_gbps:
            result["kernel_bandwidth_pct"] = 100 * result["kernel_gbps"] / plan.peak_gbps
    return result


def _row(plan: Plan, name: str, shape: dict, mode: str, gate: dict | None) -> dict:
    return {
        "op": plan.op.name, "backend": name, "mode": mode, "shape": shape, "label": shape_label(plan.op, shape),
        "dtype": plan.dtype, "baseline": plan.op.backends[name].baseline, "status": "ok", "reason": None,
        "gate": gate["status"] if gate else None, "gate_error": (gate or {}).get("error"),
        "median_ms": None, "p20_ms": None, "p80_ms": None, "vs": {},
    }


def _measure_row(plan: Plan, row: dict, inputs: dict, shape: dict) -> None:
    """Fill a row's timing and performance, or its error."""
    try:
        timing = time_backend(plan, row["backend"], inputs, shape, row["mode"])
    except Exception as error:  # out of memory, a kernel refusing the shape: recorded, the sweep goes on
        row.update(status="error", reason=_describe(error))
        return
    finally:
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
    row.update(_performance(plan, row["backend"], shape, row["mode"], timing))
    if plan.kernel_calls:
        row["kernels_us"] = kernel_times(plan, row["backend"], inputs, shape, row["mode"])


def _skip_reason(plan: Plan, name: str, shape: dict, gate: dict | None,
                 unavailable: str | None) -> tuple[str, str] | None:
    """``(status, reason)`` of a backend that is not timed on this shape, or None."""
    if unavailable:
        return "unavailable", unavailable
    if gate["status"] == "error":
        return "error", gate["message"]
    if gate["status"] == "failed":
        return "gate failed", f"relative RMS error {gate['error']:.2e} > {gate['tolerance']:.0e}"
    backend = plan.op.backends[name]
    if backend.max_T is not None and shape["T"] > backend.max_T:
        return "skipped", f"{backend.skip_reason}: T > {backend.max_T}"
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
        rows: timed rows of one op, at least two distinct T per backend and mode to say anything.

    Returns:
        ``{"scaling": [{mode, backend, long_T, short_T, ratio}], "crossover": [{mode, backend,
        baseline, T}]}``: ratio is time(longest T) / time(T = 4096, else the shortest); T is the
        smallest length at which the backend is faster than the baseline, None if at none.
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


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _distribution_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info(device: torch.device) -> dict:
    """The machine and software a report was measured on.

    Returns:
        device, gpu (name or None), cpu, cuda, torch, triton and fla versions (None when absent),
        python, date (UTC, ISO 8601), git_commit (short hash of linmix's checkout, or None) and
        git_dirty (tracked files modified, or None outside a checkout).
    """
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": _cpu_model(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _distribution_version("triton"),
        "fla": _distribution_version("flash-linear-attention", "fla-core"),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def run_benchmark(plan: Plan, progress=None) -> dict:
    """Gate every available backend, then time each backend on each shape and mode.

    Args:
        plan: from ``plan_benchmark``.
        progress: called with each finished row, or None.

    Returns:
        the report: ``{"machine", "settings", "gates", "rows", "summary"}``; every requested
        backend has a row per shape and mode, with status "ok" (timed), "skipped",
        "unavailable", "gate failed" or "error", and a reason for the last four.
    """
    op = plan.op
    unavailable = {name: unavailable_reason(op, name, plan.device) for name in plan.backends}
    gates = {name: gate_backend(op, name, plan.modes, plan.options, plan.device)
             for name in plan.backends if unavailable[name] is None}
    rows = []
    for shape in plan.shapes:
        for mode in plan.modes:
            inputs = op.build_inputs(shape, DTYPES[plan.dtype], str(plan.device), mode == "fwdbwd")
            for name in plan.backends:
                gate = gates.get(name, {}).get(mode)
                row = _row(plan, name, shape, mode, gate)
                skip = _skip_reason(plan, name, shape, gate, unavailable[name])
                if skip:
                    row.update(status=skip[0], reason=skip[1])
                else:
                    _measure_row(plan, row, inputs, shape)
                rows.append(row)
                if progress:
                    progress(row)
            del inputs
    add_speed_ratios(rows, op.ratio_baselines)
    settings = {
        "op": op.name, "backends": plan.backends, "modes": plan.modes, "shape_set": plan.shape_set,
        "options": plan.options, "dtype": plan.dtype, "device": str(plan.device), "timer": timer_name(plan.device),
        "warmup_ms": plan.warmup_ms, "rep_ms": plan.rep_ms, "peak_tflops": plan.peak_tflops,
        "peak_gbps": plan.peak_gbps, "gate_shape": op.gate_shape, "gate_reference": op.reference,
        "cost_model": "linmix/bench/registry.py (module docstring)", "kernel_calls": plan.kernel_calls,
    }
    return {"machine": machine_info(plan.device), "settings": settings, "gates": gates, "rows": rows,
            "summary": scaling_summary(rows)}


# ----------------------------------------------------------------------------- output


def _finite(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    """Write a report as JSON (non-finite numbers as null).

    Args:
        report: from ``run_benchmark``.
        path: the file; its folder is created.

    Returns:
        the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2) + "\n")
    return path


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _kernel_traffic_cell(row: dict) -> str:
    """``"GB/s (percent of the memory roof)"`` of a backend's own kernel traffic, or "-"."""
    if row.get("kernel_gbps") is None:
        return "-"
    share = row.get("kernel_bandwidth_pct")
    return f"{row['kernel_gbps']:.4g}" + ("" if share is None else f" ({share:.0f}%)")


def format_table(report: dict) -> str:
    """The rows as an aligned text table with one "x vs NAME" column per baseline measured."""
    rows = report["rows"]
    ratio_names = list(dict.fromkeys(name for row in rows for name in row["vs"]))
    with_traffic = any(row.get("kernel_gbps") is not None for row in rows)
    header = ["op", "backend", "mode", "shape", "ms", "p20", "p80", "TFLOP/s", "GB/s", "roofline",
              *(["kernel traffic"] if with_traffic else []), "gate", *(f"x vs {name}" for name in ratio_names), "note"]
    table = [header]
    for row in rows:
        roofline = "-" if row.get("roofline_pct") is None else f"{row['roofline_pct']:.0f}% {row['bound']}"
        note = "" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        traffic = [_kernel_traffic_cell(row)] if with_traffic else []
        table.append([
            row["op"], row["backend"], row["mode"], row["label"], _number(row["median_ms"], ".3f"),
            _number(row["p20_ms"], ".3f"), _number(row["p80_ms"], ".3f"), _number(row.get("tflops"), ".3g"),
            _number(row.get("gbps"), ".4g"), roofline, *traffic, row["gate"] or "-",
            *(_number(row["vs"].get(name), ".2f") for name in ratio_names), note,
        ])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def format_summary(summary: dict) -> str:
    """The scaling and crossover lines of a sweep over T, or "" when it has one length."""
    lines = []
    if summary["scaling"]:
        lines.append("scaling: time(longest T) / time(T=4096, else the shortest T)")
        lines += [f"  {s['mode']:<7} {s['backend']:<10} t(T={s['long_T']}) / t(T={s['short_T']}) = {s['ratio']:.2f}"
                  for s in summary["scaling"]]
    if summary["crossover"]:
        lines.append("crossover: smallest T at which the backend is faster than the baseline")
        lines += [f"  {c['mode']:<7} {c['backend']:<10} vs {c['baseline']:<10} "
                  + (f"T={c['T']}" if c["T"] is not None else f"never up to T={c['max_T']}")
                  for c in summary["crossover"]]
    return "\n".join(lines)


def machine_line(title: str, machine: dict) -> str:
    """``"<title> on <GPU or CPU>: torch ..., CUDA ..., triton ..., commit ..., <date>"`` of a report's machine."""
    where = machine["gpu"] or machine["cpu"] or machine["device"]
    return (f"{title} on {where}: torch {machine['torch']}, CUDA {machine['cuda']}, triton {machine['triton']}, "
            f"commit {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}, {machine['date']}")


def format_report(report: dict) -> str:
    """The machine line, the table and the summary as printed by ``linmix bench``."""
    machine, settings = report["machine"], report["settings"]
    lines = [
        machine_line(settings["op"], machine),
        f"dtype {settings['dtype']}, options {settings['options']}, timer {settings['timer']}, "
        f"warm-up {settings['warmup_ms']} ms, timed {settings['rep_ms']} ms, roofline peaks "
        f"{settings['peak_tflops']} TFLOP/s and {settings['peak_gbps']} GB/s",
        format_table(report),
    ]
    if any(row["vs"] for row in report["rows"]):
        lines.append("x vs NAME = time(NAME) / time(row), on the same shape and mode: above 1 is faster than NAME")
    summary = format_summary(report["summary"])
    return "\n".join(lines + ([summary] if summary else []) + format_kernels(report))


def format_kernels(report: dict, *, width: int = 60) -> list[str]:
    """One block per row with per-kernel times: each kernel's GPU us per call and share of their sum."""
    lines = []
    for row in report["rows"]:
        kernels = row.get("kernels_us")
        if not kernels:
            continue
        total = sum(kernels.values())
        lines.append(f"kernels of {row['backend']} {row['mode']} {row['label']}: {total:.0f} us per call "
                     f"(timed call {1e3 * row['median_ms']:.0f} us)")
        lines += [f"  {us:9.1f} us {100 * us / total:5.1f}%  {name[:width]}" for name, us in kernels.items()]
    return lines


def format_op_list(device: torch.device) -> str:
    """The registered ops with their backends (and whether each can run here) and shape sets."""
    lines = []
    for op in OPS.values():
        lines.append(f"{op.name}: {op.description}")
        lines.append(f"  reference (gate, float64): {op.reference}; default backends: {', '.join(op.default_backends)}")
        for name, backend in op.backends.items():
            reason = unavailable_reason(op, name, device)
            role = "baseline" if backend.baseline else "backend"
            lines.append(f"  {role:<8} {name:<10} {reason or 'available'}")
        for set_name, shapes in op.shape_sets.items():
            labels = ", ".join(shape_label(op, shape) for shape in shapes)
            lines.append(f"  shapes   {set_name:<10} {labels}")
        if op.options:
            lines.append(f"  options  {op.options}")
    return "\n".join(lines)
