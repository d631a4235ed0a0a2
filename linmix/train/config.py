"""The training run's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from linmix.models.param_groups import OPTIMIZER_MODES

EVAL_PROTOCOLS = ("full", "random")
# torch.compile modes: "reduce-overhead" replays the step's kernels as CUDA graphs, which removes
# the host's launch cost from models whose step is many small kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Fields that may change between a run and its resumption: where it runs, how often it reports and
# how long it tolerates non-finite steps. Every other field changes the run itself, so a resume that
# changes one is refused.
FIELDS_FREE_ON_RESUME = frozenset(
    {
        "out_dir",
        "device",
        "compile",
        "compile_mode",
        "log_interval",
        "checkpoint_interval",
        "max_nonfinite_steps",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    The defaults are the K-Operators Tiny Shakespeare recipe (spec/k_operators.md section 4.2).

    Attributes:
        lr: peak learning rate (multiplied by each parameter group's `lr_scale`).
        lr_floor: learning rate at `max_steps`, the end of the cosine decay.
        warmup_steps: steps of linear warmup.
        max_steps: optimizer updates in the whole run.
        batch_size: windows per step on each process, B. Under torchrun every one of N ranks
            trains on its own B windows, so the global batch is N x B windows
            (`Trainer.global_batch_size`); one process is N = 1 (docs/DISTRIBUTED.md).
        context_length: tokens per window, T; None takes the model's `config.context_length`.
        weight_decay: AdamW decay of the parameter groups that decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: maximum global gradient norm.
        optimizer_mode: parameter grouping, passed to the `param_groups_fn`.
        eval_interval: evaluate every this many steps (step 0 and the last step too).
        eval_protocols: "full" (every non-overlapping validation window) and/or "random"
            (nanoGPT's mean over `eval_random_iters` random batches).
        eval_batch_size: windows per evaluation batch.
        eval_random_iters: batches of the "random" protocol.
        eval_seed: seed of the "random" protocol's windows, the same at every evaluation.
        eval_budget: all evaluations of the run read at most this many times the windows the run
            trains on, over all ranks (forward passes only); when the protocols would read more, each shrinks by
            the same factor (see `linmix.train.evaluate.plan_evaluation`). The presets' full
            recipes fit in 1.0 and are unchanged; a few-step run evaluates in seconds. None reads
            the whole protocols whatever the run's length.
        seed: seed of the training batches and of the global RNGs (dropout); each rank derives
            its own streams from it, rank 0 those of a single-process run.
        device: torch device string, e.g. "cpu", "cuda", "cuda:1".
        compile: run the model's forward through torch.compile.
        compile_mode: the torch.compile mode, one of COMPILE_MODES (used with `compile`).
        out_dir: folder of metrics.jsonl, summary.json, best.pt and last.pt.
        log_interval: write a training record every this many steps.
        checkpoint_interval: write last.pt every this many steps; None means `eval_interval`.
        max_nonfinite_steps: stop the run when this many steps in a row had a non-finite loss or
            gradients (each such step's update is skipped); 1 stops at the first one.
    """

    lr: float = 1e-2
    lr_floor: float = 3.5e-4
    warmup_steps: int = 2000
    max_steps: int = 3500
    batch_size: int = 64
    context_length: int | None = None
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.8, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer_mode: str = "simple"
    eval_interval: int = 250
    eval_protocols: tuple[str, ...] = EVAL_PROTOCOLS
    eval_batch_size: int = 64
    eval_random_iters: int = 200
    eval_seed: int = 1337
    eval_budget: float | None = 1.0
    seed: int = 42
    device: str = "cpu"
    compile: bool = False
    compile_mode: str = "default"
    out_dir: str = "runs/default"
    log_interval: int = 10
    checkpoint_interval: int | None = None
    max_nonfinite_steps: int = 8

    def __post_init__(self) -> None:
        # JSON and YAML give lists where the dataclass holds tuples.
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "eval_protocols", tuple(self.eval_protocols))
        object.__setattr__(self, "out_dir", str(self.out_dir))
        self._validate()

    @property
    def checkpoint_every(self) -> int:
        """Steps between two writes of last.pt."""
        return (
            self.checkpoint_interval if self.checkpoint_interval is not None else self.eval_interval
        )

    @property
    def selection_protocol(self) -> str:
        """The evaluation protocol whose loss picks best.pt: "full" when run, else "random"."""
        return "full" if "full" in self.eval_protocols else "random"

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values (tuples become lists).

        Returns:
            One entry per field.
        """
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict such as `to_dict` returns; missing fields keep defaults.

        Args:
            values: field name to value.

        Returns:
            The validated config.

        Raises:
            ValueError: a key is not a field of TrainConfig, or a value is out of range.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def _validate(self) -> None:
        _check_number("lr", self.lr, low=0.0, low_inclusive=False)
        _check_number("lr_floor", self.lr_floor, low=0.0)
        if self.lr_floor > self.lr:
            raise ValueError(f"lr_floor must be <= lr ({self.lr}), got {self.lr_floor}")
        _check_int("max_steps", self.max_steps, low=1)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps must be <= max_steps ({self.max_steps}), got {self.warmup_steps}"
            )
        _check_int("batch_size", self.batch_size, low=1)
        if self.context_length is not None:
            _check_int("context_length", self.context_length, low=1)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        if len(self.betas) != 2:
            raise ValueError(f"betas must hold 2 numbers, got {self.betas}")
        for beta in self.betas:
            _check_number("betas", beta, low=0.0, high=1.0)
        _check_number("eps", self.eps, low=0.0, low_inclusive=False)
        _check_number("grad_clip", self.grad_clip, low=0.0, low_inclusive=False)
        if self.optimizer_mode not in OPTIMIZER_MODES:
            raise ValueError(
                f"optimizer_mode must be one of {OPTIMIZER_MODES}, got {self.optimizer_mode!r}"
            )
        _check_int("eval_interval", self.eval_interval, low=1)
        unknown = [p for p in self.eval_protocols if p not in EVAL_PROTOCOLS]
        if (
            not self.eval_protocols
            or unknown
            or len(set(self.eval_protocols)) != len(self.eval_protocols)
        ):
            raise ValueError(
                f"eval_protocols must be distinct names from {EVAL_PROTOCOLS}, "
                f"got {self.eval_protocols}"
            )
        _check_int("eval_batch_size", self.eval_batch_size, low=1)
        _check_int("eval_random_iters", self.eval_random_iters, low=1)
        _check_int("eval_seed", self.eval_seed, low=0)
        if self.eval_budget is not None:
            _check_number("eval_budget", self.eval_budget, low=0.0, low_inclusive=False)
        _check_int("seed", self.seed, low=0)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"device must be a device string such as 'cpu' or 'cuda', got {self.device!r}"
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be a bool, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if not self.out_dir:
            raise ValueError("out_dir must be a non-empty path")
        _check_int("log_interval", self.log_interval, low=1)
        if self.checkpoint_interval is not None:
            _check_int("checkpoint_interval", self.checkpoint_interval, low=1)
        _check_int("max_nonfinite_steps", self.max_nonfinite_steps, low=1)


def run_changing_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Fields that differ between a saved config and the current one and change the run.

    Args:
        saved: a config as `TrainConfig.to_dict` stored it in a checkpoint.
        current: the config of the run that wants to resume.

    Returns:
        One "field: saved -> current" line per differing field outside FIELDS_FREE_ON_RESUME.
        A field the saved config lacks (written by an older linmix) counts as its default.
    """
    now = current.to_dict()
    then = {**TrainConfig.from_dict({}).to_dict(), **saved}
    return [
        f"{name}: {then[name]!r} -> {now[name]!r}"
        for name in now
        if name not in FIELDS_FREE_ON_RESUME and then[name] != now[name]
    ]


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_number(
    name: str,
    value: Any,
    *,
    low: float,
    low_inclusive: bool = True,
    high: float | None = None,
) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (value == low and not low_inclusive):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
