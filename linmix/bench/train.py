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
from dataclasses import dataclass, field

import torch

from linmix.bench.registry import INPUT_SEED
from linmix.bench.runner import machine_info
from linmix.models import MODEL_CLASSES, get_preset, with_overrides
from linmix.train import TrainConfig, Trainer
from linmix.train.config import COMPILE_MODES

DEFAULT_BASELINE = "kops-ts-v2"
DEFAULT_PRESETS = ("kops-ts-linear-long",)
MIB = 2**20


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
               overrides: dict | None = None) -> TrainBenchPlan:
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
                          device, dict(overrides or {}))


def measure_training(name: str, plan: TrainBenchPlan, batch_size: int, *, progress: bool = False) -> dict:
    """Train one preset for ``plan.warmup + plan.steps`` steps at one batch size; its row of the report.

    Returns:
        preset, batch_size, context_length, params, tokens_per_s (steady), train_time_s, the final
        training loss's step count and, on CUDA, peak_allocated_mib.
    """
    preset = with_overrides(get_preset(name), **plan.overrides, context_length=plan.context_length)
    T = plan.context_length
    generator = torch.Generator().manual_seed(INPUT_SEED)
    vocab_size = preset.model["vocab_size"]
    train = torch.randint(vocab_size, (batch_size * (T + 1) * 4,), generator=generator)
    val = torch.randint(vocab_size, (2 * T + 1,), generator=generator)
    torch.manual_seed(INPUT_SEED)
    model = MODEL_CLASSES[preset.model_kind](preset.model_config())
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
        summary = Trainer(model, train, val, config, progress=progress).fit()
    row = {
        "preset": name,
        "role": "baseline" if name == plan.baseline else "model",
        "batch_size": batch_size,
        "context_length": T,
        "params": summary["params"],
        "tokens_per_s": summary["tokens_per_s_steady"],
        "train_time_s": summary["train_time_s"],
    }
    if plan.device.type == "cuda":
        row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(plan.device) / MIB
    return row


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
        "overrides": plan.overrides, "data": "random tokens of each model's vocabulary",
        "timer": "Trainer.tokens_per_s_steady (CUDA-synchronised at each log)",
    }
    return {"kind": "train", "machine": machine_info(plan.device), "settings": settings, "rows": rows}


def format_train_report(report: dict) -> str:
    """The report as a table, with the settings in a header line."""
    settings = report["settings"]
    machine = report["machine"]
    where = machine.get("gpu") or machine.get("cpu")
    compiled = settings.get("compile_mode") or settings["compile"]
    lines = [
        f"training throughput on {where}: T={settings['context_length']}, {settings['steps']} timed steps after "
        f"{settings['warmup']}, compile {compiled}, commit {machine.get('git_commit')}",
        f"{'preset':24s} {'batch':>5s} {'params':>10s} {'tokens/s':>12s} {'x vs baseline':>13s} {'peak MiB':>9s}",
    ]
    for row in report["rows"]:
        ratio = "-" if row["x_vs_baseline"] is None else f"{row['x_vs_baseline']:.2f}"
        peak = row.get("peak_allocated_mib")
        lines.append(
            f"{row['preset']:24s} {row['batch_size']:5d} {row['params']:10,d} {row['tokens_per_s']:12,.0f} "
            f"{ratio:>13s} {'-' if peak is None else f'{peak:.0f}':>9s}"
        )
    lines.append("x vs baseline = tokens/s of the row / tokens/s of the baseline at the same batch size")
    return "\n".join(lines)
