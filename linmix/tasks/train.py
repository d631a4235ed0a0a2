"""One synthetic-task run: data, model, AdamW with warmup and cosine decay, evaluation on the fixed
test set every `eval_interval` steps, early stop at the target accuracy.

A run is described by a *spec*, a JSON-ready dict that the sweep runner builds (see
`linmix.tasks.runner.build_specs`) and that fully determines the run: task, generator arguments,
cell segments, model, optimiser, step budget, seed and device. Loss and accuracy are computed on
the scored positions only; accuracy is zoology's, the mean over examples of the fraction of an
example's scored positions predicted exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from linmix.models.param_groups import param_groups
from linmix.tasks.generators import GENERATORS, TaskBatch
from linmix.tasks.model import TaskModel, TaskModelConfig
from linmix.train.evaluate import autocast_for
from linmix.train.schedule import lr_multiplier

CACHE_SEGMENTS = 32  # data segments a worker keeps between runs
BARRIER_TIMEOUT_S = 180.0  # the longest a probe waits for the others before timing alone


def stable_seed(*parts) -> int:
    """A seed in [0, 2**63) from JSON-ready parts, the same in every process (unlike `hash`)."""
    text = json.dumps(parts, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class DataCache:
    """Generated segments kept on their device between runs of one worker, least recently used dropped."""

    def __init__(self, capacity: int = CACHE_SEGMENTS):
        self.capacity = capacity
        self.entries: OrderedDict[str, TaskBatch] = OrderedDict()

    def get(self, key: str, build: Callable[[], TaskBatch]) -> TaskBatch:
        """The entry under `key`, built with `build()` on a miss."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = build()
        self.entries[key] = value
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


def generate(spec: dict, args: dict, examples: int, seed: int) -> TaskBatch:
    """`examples` examples of the spec's task with segment arguments `args` (over the fixed ones)."""
    return GENERATORS[spec["generator"]](num_examples=examples, **spec["fixed"], **args, seed=seed)


def fixed_segment(spec: dict, segment: dict, split: str, device: torch.device, cache: DataCache) -> TaskBatch:
    """A fixed segment's examples on `device`; its seed depends on the data, not on the run's seed,
    so every run of a cell sees the same training set and the same held-out test set."""
    seed = stable_seed(split, spec["task"], spec["fixed"], segment["args"], segment["examples"], spec["data_seed"])
    key = json.dumps([seed, str(device)])
    return cache.get(key, lambda: generate(spec, segment["args"], segment["examples"], seed).to(device))


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


class TaskRun:
    """The state of one run: data, model, optimiser and step budget.

    Args:
        spec: the run's spec.
        cache: segments shared with earlier runs of the same process.
    """

    def __init__(self, spec: dict, cache: DataCache | None = None):
        start = time.perf_counter()
        self.spec = spec
        self.device = resolve_device(spec["device"])
        cache = cache or DataCache()
        self.test = [fixed_segment(spec, s, "test", self.device, cache) for s in spec["test"]]
        self.fresh = all(s["examples"] is None for s in spec["train"])
        if not self.fresh and any(s["examples"] is None for s in spec["train"]):
            raise ValueError("a cell's training segments are either all fixed or all fresh")
        self.train_sets = [] if self.fresh else [
            fixed_segment(spec, s, "train", self.device, cache) for s in spec["train"]]
        lengths = [b.inputs.shape[1] for b in self.test + self.train_sets]
        lengths += [generate(spec, s["args"], 1, 0).inputs.shape[1] for s in spec["train"] if self.fresh]
        vocab = self.test[0].vocab_size
        torch.manual_seed(spec["seed"])
        self.model = TaskModel(TaskModelConfig(
            vocab_size=vocab, mixer=spec["mixer"], d_model=spec["d_model"], n_layers=spec["n_layers"],
            context_length=max(lengths), mixer_kwargs=spec["mixer_kwargs"], mlp_ratio=spec["mlp_ratio"],
            short_conv=spec["short_conv"], position_embedding=spec["position_embedding"],
        )).to(self.device)
        groups = param_groups(self.model, "simple", spec["weight_decay"])
        self.optimizer = torch.optim.AdamW(
            groups, lr=spec["lr"], fused=True if self.device.type == "cuda" else None
        )
        batch = spec["batch_size"]
        self.steps_per_epoch = sum(math.ceil(len(s) / batch) for s in self.train_sets)
        if self.fresh:
            self.max_steps = spec["max_steps"]
        else:
            self.max_steps = spec["epochs"] * self.steps_per_epoch
            if spec["max_steps"] is not None:
                self.max_steps = min(self.max_steps, spec["max_steps"])
        self.eval_interval = spec["eval_interval"] or self.steps_per_epoch
        self._epoch_plan: tuple[int, list] = (-1, [])
        self.setup_s = time.perf_counter() - start

    def batch(self, step: int) -> TaskBatch:
        """The training batch of update `step` (0-based): a fresh sample, or the next batch of the
        epoch's shuffled order (each batch from one segment, as sequence lengths differ)."""
        spec = self.spec
        if self.fresh:
            segment = spec["train"][step % len(spec["train"])]
            seed = stable_seed("train-step", spec["seed"], spec["data_seed"], step)
            return generate(spec, segment["args"], spec["batch_size"], seed).to(self.device)
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_plan[0] != epoch:
            rng = torch.Generator().manual_seed(stable_seed("epoch", spec["seed"], epoch))
            plan = [(i, chunk) for i, data in enumerate(self.train_sets)
                    for chunk in torch.randperm(len(data), generator=rng).split(spec["batch_size"])]
            order = torch.randperm(len(plan), generator=rng).tolist()
            self._epoch_plan = (epoch, [plan[i] for i in order])
        index, rows = self._epoch_plan[1][position]
        return self.train_sets[index].select(rows.to(self.device))

    def train_step(self, step: int) -> torch.Tensor:
        """One AdamW update on batch `step`; returns the loss (a detached device scalar)."""
        spec = self.spec
        scale = lr_multiplier(step, spec["warmup_steps"], self.max_steps, 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = spec["lr"] * scale * group.get("lr_scale", 1.0)
        data = self.batch(step)
        self.model.train()
        with autocast_for(self.device):
            hidden = self.model(data.inputs)[data.mask]  # [M, d], the scored positions only
            logits = self.model.logits(hidden)
        loss = F.cross_entropy(logits.float(), data.targets[data.mask])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec["grad_clip"])
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy and loss on every test segment, and the run's accuracy over the primary ones.

        Returns:
            {"accuracy": mean per-example accuracy over the primary segments' examples,
             "loss": mean loss over their scored positions,
             "segments": [{"accuracy", "loss"} per test segment]}.
        """
        self.model.eval()
        segments, primary_acc, primary_loss = [], [], []
        for data, segment in zip(self.test, self.spec["test"]):
            accuracies, loss_sum, positions = [], 0.0, 0
            for start in range(0, len(data), self.spec["test_batch_size"]):
                part = data.select(slice(start, start + self.spec["test_batch_size"]))
                with autocast_for(self.device):
                    hidden = self.model(part.inputs)[part.mask]
                    logits = self.model.logits(hidden).float()
                targets = part.targets[part.mask]
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                positions += targets.numel()
                correct = torch.zeros(part.mask.shape, device=self.device)
                correct[part.mask] = (logits.argmax(dim=-1) == targets).float()
                accuracies.append(correct.sum(dim=1) / part.mask.sum(dim=1))
            accuracy = torch.cat(accuracies)
            segments.append({"accuracy": accuracy.mean().item(), "loss": loss_sum / positions})
            if segment["primary"]:
                primary_acc.append(accuracy)
                primary_loss.append((loss_sum, positions))
        return {
            "accuracy": torch.cat(primary_acc).mean().item(),
            "loss": sum(s for s, _ in primary_loss) / sum(n for _, n in primary_loss),
            "segments": segments,
        }

    def synchronize(self) -> None:
        """Wait for the device (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def segment_records(spec: dict, evaluation: dict) -> list[dict]:
    """Per test segment: its generator arguments, its axis values and label, and its scores."""
    records = []
    for segment, scores in zip(spec["test"], evaluation["segments"]):
        axes = {name: segment["args"][arg] for arg, name in spec["axes"].items() if arg in segment["args"]}
        records.append({
            "args": segment["args"], "axes": axes, "label": " ".join(f"{k}={v}" for k, v in axes.items()),
            "primary": segment["primary"], **scores,
        })
    return records


def train_run(spec: dict, report: Callable[[dict], None] | None = None, cache: DataCache | None = None) -> dict:
    """Train one run until the test accuracy reaches the target or the step budget ends.

    Args:
        spec: the run's spec (see the module docstring).
        report: called after every evaluation with {"step", "max_steps", "accuracy", "loss", "train_loss"}.
        cache: data segments kept from earlier runs of the same process.

    Returns:
        The run's result: the spec's identity fields, "params", "steps", "max_steps", "stopped"
        ("target", "max_steps" or "diverged"), "accuracy" (best evaluation), "best_step",
        "final_accuracy", "test" (per segment, at the best evaluation), "evals" ([step, accuracy,
        loss, train loss] each), "setup_s", "train_s", "eval_s", "wall_s", "device_name".
    """
    start = time.perf_counter()
    run = TaskRun(spec, cache)
    evals, best, stopped, step = [], None, "max_steps", 0
    eval_s = 0.0
    loss_sum = torch.zeros((), device=run.device)
    since_eval = 0
    train_start = time.perf_counter()
    while step < run.max_steps:
        loss_sum += run.train_step(step)
        step += 1
        since_eval += 1
        if step % run.eval_interval and step != run.max_steps:
            continue
        train_loss = loss_sum.item() / since_eval
        loss_sum.zero_()
        since_eval = 0
        tick = time.perf_counter()
        evaluation = run.evaluate()
        eval_s += time.perf_counter() - tick
        evals.append([step, evaluation["accuracy"], evaluation["loss"], train_loss])
        if best is None or evaluation["accuracy"] > best[1]["accuracy"]:
            best = (step, evaluation)
        if report:
            report({"step": step, "max_steps": run.max_steps, "accuracy": evaluation["accuracy"],
                    "loss": evaluation["loss"], "train_loss": train_loss})
        if not math.isfinite(train_loss):
            stopped = "diverged"
            break
        if evaluation["accuracy"] >= spec["target"]:
            stopped = "target"
            break
    train_s = time.perf_counter() - train_start - eval_s
    return {
        "run_id": spec["run_id"], "task": spec["task"], "cell": spec["cell"], "mixer": spec["mixer"],
        "model": spec["model_label"], "d_model": spec["d_model"], "n_layers": spec["n_layers"],
        "lr": spec["lr"], "seed": spec["seed"], "params": run.model.num_parameters(),
        "steps": step, "max_steps": run.max_steps, "stopped": stopped,
        "accuracy": best[1]["accuracy"], "best_step": best[0], "final_accuracy": evals[-1][1],
        "test": segment_records(spec, best[1]), "evals": evals,
        "setup_s": run.setup_s, "train_s": train_s, "eval_s": eval_s, "wall_s": time.perf_counter() - start,
        "device_name": device_name(run.device), "torch": torch.__version__, "spec": spec,
    }


def wait_at_barrier(folder: str | Path, count: int, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Sign in at a barrier (a folder shared by the processes) and wait until `count` have, or the timeout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{platform.node()}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while sum(1 for _ in folder.iterdir()) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def probe_run(
    spec: dict,
    steps: int,
    cache: DataCache | None = None,
    warmup: int = 3,
    barrier: dict | None = None,
) -> dict:
    """Time a run's setup, its training steps and one evaluation without training it to the end.

    Args:
        spec: the run's spec.
        steps: timed steps, after `warmup` untimed ones.
        cache: data segments kept from earlier runs of the same process.
        warmup: untimed steps first (allocator, kernels' first launches).
        barrier: {"dir", "count"}: wait after the warmup until `count` probes have reached this
            point, so that probes sharing a device time their steps together.

    Returns:
        {"setup_s", "step_s" (seconds per step), "eval_s" (one evaluation), "params", "max_steps",
        "evals" (evaluations a full run makes), "device_name"}.
    """
    run = TaskRun(spec, cache)
    for step in range(warmup):
        run.train_step(step)
    run.synchronize()
    if barrier is not None:
        wait_at_barrier(barrier["dir"], barrier["count"])
    tick = time.perf_counter()
    for step in range(warmup, warmup + steps):
        run.train_step(step)
    run.synchronize()
    step_s = (time.perf_counter() - tick) / steps
    tick = time.perf_counter()
    run.evaluate()
    eval_s = time.perf_counter() - tick
    return {
        "setup_s": run.setup_s, "step_s": step_s, "eval_s": eval_s, "params": run.model.num_parameters(),
        "max_steps": run.max_steps, "evals": math.ceil(run.max_steps / run.eval_interval),
        "device_name": device_name(run.device),
    }
