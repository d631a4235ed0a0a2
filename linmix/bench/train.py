"""Training-throughput benchmark: tokens/s of presets against a baseline preset, in one run.

Every model trains through the real ``Trainer`` (the optimizer, bf16 autocast on CUDA, gradient
clipping and, with ``compile``, ``torch.compile``) on random tokens of its vocabulary: the cost of
a step does not depend on the data. Each preset's model gets ``context_length`` as its own context
(so a dense Kbase is built ``[T, T]``) and trains on windows of that length. A run is
``warmup + steps`` optimizer steps; throughput is the Trainer's steady figure, the tokens of the
last ``steps`` over their training time, so compilation and the first steps are left out.
Evaluation and the final checkpoint fall outside the timed steps.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import torch

from linmix.bench.inputs import INPUT_SEED
from linmix.bench.machine import machine_info
from linmix.models import get_preset, with_overrides
from linmix.train import TrainConfig, Trainer
from linmix.train.config import COMPILE_MODES

DEFAULT_BASELINE = "kops-ts-v2"
DEFAULT_PRESETS = ("kops-ts-linear-long",)
MIB = 2**20
# Host calls that start work on the GPU: kernels (CUDA runtime and driver, as Triton launches them) and graphs.
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                          "cudaGraphLaunch"})


@dataclass
class TrainBenchPlan:
    """A validated training-throughput request.

    Attributes:
        presets: the measured presets.
        baseline: the preset every ratio is taken against, measured in the same run, or None.
        context_length: training window T, also each model's context length.
        batch_sizes: windows per step; every model runs at each.
        steps: timed optimizer steps per run.
        warmup: untimed steps before them (compilation happens here).
        compile: train through ``torch.compile``.
        compile_mode: its mode, one of ``COMPILE_MODES``.
        device: where everything runs.
        overrides: model-config fields applied to every preset and the baseline.
        profile_steps: steps profiled after the timed ones (0: none).
    """

    presets: list[str]
    baseline: str | None
    context_length: int
    batch_sizes: list[int]
    steps: int
    warmup: int
    compile: bool
    compile_mode: str
    device: torch.device
    overrides: dict = field(default_factory=dict)
    profile_steps: int = 0

    @property
    def models(self) -> list[str]:
        """The presets in run order, the baseline first."""
        return ([self.baseline] if self.baseline else []) + [name for name in self.presets if name != self.baseline]


def _check_positive(option: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")


def plan_train(presets: list[str] | None = None, *, baseline: str | None = DEFAULT_BASELINE, context_length: int,
               batch_sizes: list[int], steps: int = 50, warmup: int = 10, compile: bool = False,
               compile_mode: str = "default", device: str | None = None,
               overrides: dict | None = None, profile_steps: int = 0) -> TrainBenchPlan:
    """Check a training-throughput request and resolve its defaults.

    Args:
        presets: the measured presets; None for ``["kops-ts-linear-long"]``.
        baseline: the preset the ratios are taken against, or None.
        context_length: training window T, set as every model's context length.
        batch_sizes: windows per step, each a positive integer.
        steps: timed optimizer steps per run.
        warmup: untimed steps before them.
        compile: train through ``torch.compile``.
        compile_mode: its mode, one of ``COMPILE_MODES``.
        device: "cuda", "cuda:N" or "cpu"; None for cuda when available, else cpu.
        overrides: model-config fields applied to every model (validated per preset).
        profile_steps: after the timed steps, this many more under ``torch.profiler`` (0: none).

    Returns:
        the TrainBenchPlan.

    Raises:
        ValueError: a bad value, with the command-line option it came from.
    """
    _check_positive("--context-length", context_length)
    if not batch_sizes:
        raise ValueError("--batch-sizes needs at least one batch size")
    for value in batch_sizes:
        _check_positive("--batch-sizes", value)
    _check_positive("--steps", steps)
    _check_positive("--warmup", warmup)
    if not isinstance(profile_steps, int) or profile_steps < 0:
        raise ValueError(f"--profile-steps must be a non-negative integer, got {profile_steps!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    names = list(dict.fromkeys(presets or DEFAULT_PRESETS))
    for option, group in (("--presets", names), ("--baseline", [baseline] if baseline else [])):
        for name in group:
            try:
                preset = get_preset(name)
            except KeyError as error:
                raise ValueError(f"{option}: {error.args[0]}") from error
            try:
                with_overrides(preset, **(overrides or {}), context_length=context_length)
            except (TypeError, ValueError) as error:
                raise ValueError(f"--set: {error}") from error
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return TrainBenchPlan(names, baseline, context_length, list(batch_sizes), steps, warmup, compile, compile_mode,
                          device, dict(overrides or {}), profile_steps)


def measure_training(name: str, plan: TrainBenchPlan, batch_size: int, *, progress: bool = False) -> dict:
    """Train one preset for ``plan.warmup + plan.steps`` steps at one batch size; its row of the report.

    Returns:
        preset, batch_size, context_length, params, tokens_per_s (steady), train_time_s, the final
        training loss's step count, on CUDA peak_allocated_mib and, with ``plan.profile_steps``,
        the fields of ``profile_steps``.
    """
    preset = with_overrides(get_preset(name), **plan.overrides, context_length=plan.context_length)
    T = plan.context_length
    generator = torch.Generator().manual_seed(INPUT_SEED)
    vocab_size = preset.model["vocab_size"]
    train = torch.randint(vocab_size, (batch_size * (T + 1) * 4,), generator=generator)
    val = torch.randint(vocab_size, (2 * T + 1,), generator=generator)
    torch.manual_seed(INPUT_SEED)
    model = preset.build_model()
    max_steps = plan.warmup + plan.steps
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    with tempfile.TemporaryDirectory(prefix="linmix-bench-train-") as out_dir:
        config = TrainConfig.from_dict({
            **preset.train, "max_steps": max_steps, "warmup_steps": min(preset.train.get("warmup_steps", 1), max_steps),
            "batch_size": batch_size, "context_length": T, "eval_interval": max_steps, "eval_protocols": ("full",),
            "eval_batch_size": 2, "log_interval": plan.warmup, "checkpoint_interval": max_steps,
            "device": str(plan.device), "compile": plan.compile, "compile_mode": plan.compile_mode,
            "out_dir": out_dir,
        })
        trainer = Trainer(model, train, val, config, progress=progress)
        summary = trainer.fit()
        profile = profile_steps(trainer, plan.profile_steps) if plan.profile_steps else {}
    row = {
        "preset": name,
        "role": "baseline" if name == plan.baseline else "model",
        "batch_size": batch_size,
        "context_length": T,
        "params": summary["params"],
        "tokens_per_s": summary["tokens_per_s_steady"],
        "train_time_s": summary["train_time_s"],
        **profile,
    }
    if plan.device.type == "cuda":
        row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(plan.device) / MIB
    return row


def profile_steps(trainer: Trainer, steps: int) -> dict:
    """Where ``steps`` more training steps spend their time, under ``torch.profiler``.

    Returns:
        profiled_steps; wall_ms_per_step (under the profiler, which slows the host a little);
        launches_per_step, the host's kernel and CUDA-graph launches; and on CUDA gpu_ms_per_step,
        the summed kernel time. A step whose wall time is far above its GPU time is bound by the host.
    """
    on_cuda = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    synchronize = (lambda: torch.cuda.synchronize(trainer.device)) if on_cuda else (lambda: None)
    synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        synchronize()
        wall_s = time.perf_counter() - start
    events = profiler.key_averages()
    launches = sum(event.count for event in events if event.key in LAUNCH_CALLS)
    result = {"profiled_steps": steps, "wall_ms_per_step": wall_s / steps * 1e3, "launches_per_step": launches / steps}
    if on_cuda:
        kernel_us = sum(event.self_device_time_total for event in events
                        if event.device_type == torch.autograd.DeviceType.CUDA)
        result["gpu_ms_per_step"] = kernel_us / steps / 1e3
    return result


def run_train(plan: TrainBenchPlan, *, progress: bool = False) -> dict:
    """Measure every model of the plan at every batch size.

    Returns:
        the report: machine, settings and rows (one per model and batch size), each row with
        ``x_vs_baseline``, its tokens/s over the baseline's at the same batch size (None without one).
    """
    rows = [measure_training(name, plan, batch, progress=progress)
            for batch in plan.batch_sizes for name in plan.models]
    baseline_speed = {row["batch_size"]: row["tokens_per_s"] for row in rows if row["role"] == "baseline"}
    for row in rows:
        reference = baseline_speed.get(row["batch_size"])
        row["x_vs_baseline"] = row["tokens_per_s"] / reference if reference else None
    settings = {
        "presets": plan.presets, "baseline": plan.baseline, "context_length": plan.context_length,
        "batch_sizes": plan.batch_sizes, "steps": plan.steps, "warmup": plan.warmup, "compile": plan.compile,
        "compile_mode": plan.compile_mode if plan.compile else None,
        "overrides": plan.overrides, "profile_steps": plan.profile_steps,
        "data": "random tokens of each model's vocabulary",
        "timer": "Trainer.tokens_per_s_steady (CUDA-synchronised at each log)",
    }
    return {"kind": "train", "machine": machine_info(plan.device), "settings": settings, "rows": rows}


def format_train_report(report: dict) -> str:
    """The report as a table, with the settings in a header line."""
    settings = report["settings"]
    machine = report["machine"]
    where = machine.get("gpu") or machine.get("cpu")
    compiled = settings.get("compile_mode") or settings["compile"]
    profiled = bool(settings.get("profile_steps"))
    header = f"{'preset':24s} {'batch':>5s} {'params':>10s} {'tokens/s':>12s} {'x vs baseline':>13s} {'peak MiB':>9s}"
    lines = [
        f"training throughput on {where}: T={settings['context_length']}, {settings['steps']} timed steps after "
        f"{settings['warmup']}, compile {compiled}, commit {machine.get('git_commit')}",
        header + (f" {'ms/step*':>9s} {'GPU ms*':>8s} {'launches*':>9s}" if profiled else ""),
    ]
    for row in report["rows"]:
        ratio = "-" if row["x_vs_baseline"] is None else f"{row['x_vs_baseline']:.2f}"
        peak = row.get("peak_allocated_mib")
        line = (f"{row['preset']:24s} {row['batch_size']:5d} {row['params']:10,d} {row['tokens_per_s']:12,.0f} "
                f"{ratio:>13s} {'-' if peak is None else f'{peak:.0f}':>9s}")
        if profiled:
            gpu = row.get("gpu_ms_per_step")
            line += (f" {row['wall_ms_per_step']:9.2f} {'-' if gpu is None else f'{gpu:.2f}':>8s}"
                     f" {row['launches_per_step']:9.0f}")
        lines.append(line)
    lines.append("x vs baseline = tokens/s of the row / tokens/s of the baseline at the same batch size")
    if profiled:
        lines.append(f"* per step over {settings['profile_steps']} more steps under torch.profiler: wall time, summed "
                     "kernel time, host launches of kernels and CUDA graphs")
    return "\n".join(lines)
