"""The synthetic-task sweep runner: a grid of runs (cells x mixers x widths x lrs x seeds) on long-lived
worker processes that share one device, resumable, with a timing probe for planning.

Layout of a sweep folder:

* `runs/<run_id>.json`: one finished run's result (written atomically when the run ends). A run
  whose file exists is skipped when the sweep is run again; a run cut short (the sweep killed, the
  budget spent) left no file and starts again from step 0: runs last minutes, so they keep no checkpoint.
* `results.jsonl`: every finished run's result, one per line, rewritten from `runs/` after each run.
* `logs/worker-<i>.log`: what each worker printed (tracebacks of failed runs among it).
* `summary.md`, `summary.json` and the plots: see `linmix.tasks.report`.

The run id names the run's cell, model, width, lr and seed, plus a hash of its whole spec (the
device aside), so a changed setting makes a new run rather than reusing an old result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from linmix.sweep import child_environment, exit_on_sigterm
from linmix.tasks.protocols import RECIPES, Cell, Protocol, Recipe
from linmix.train.checkpoint import atomic_write

RUNS_DIR = "runs"
RESULTS = "results.jsonl"
LOGS_DIR = "logs"
STATUS_INTERVAL_S = 60.0
IDENTITY_EXCLUDED = ("device", "run_id")


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def model_label(mixer: str, overrides: dict, recipe: Recipe) -> str:
    """How tables name a model: the mixer, its overridden config fields, and the recipe's shape,
    e.g. "attention L2 conv3", "k2[kbase=toeplitz] L1 mlp4 pos"."""
    fields = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    parts = [mixer + (f"[{fields}]" if fields else ""), f"L{recipe.n_layers}"]
    parts += [f"mlp{recipe.mlp_ratio}"] if recipe.mlp_ratio else []
    parts += [f"conv{recipe.short_conv}"] if recipe.short_conv else []
    parts += ["pos"] if recipe.position_embedding else []
    return " ".join(parts)


def mixer_kwargs(protocol: Protocol, mixer: str, d_model: int, overrides: dict) -> dict:
    """A mixer's config fields in a task: the protocol's defaults for it (else the fields its
    registration benchmarks it with at this width), then `overrides`.

    Raises:
        ValueError: an unknown mixer or config field, or a config the mixer rejects.
    """
    from linmix.layers.registry import mixer_config_in_model, mixer_entry

    entry = mixer_entry(mixer)
    kwargs = {**protocol.mixer_kwargs.get(mixer, entry.bench_config(d_model)), **overrides}
    mixer_config_in_model(mixer, kwargs, {"d_model": d_model, "context_length": 1})
    return kwargs


def run_id(spec: dict) -> str:
    """The run's id: readable fields and a hash of everything that changes the result."""
    identity = {k: v for k, v in spec.items() if k not in IDENTITY_EXCLUDED}
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=4).hexdigest()
    return slug(f"{spec['task']}-{spec['cell']}-{spec['model_label']}-d{spec['d_model']}-lr{spec['lr']:g}"
                f"-s{spec['seed']}-{digest}")


def build_specs(
    protocol: Protocol,
    cells: list[Cell],
    mixers: list[str],
    d_models: list[int],
    lrs: list[float],
    seeds: list[int],
    recipe: Recipe,
    settings: dict,
    fixed: dict,
    overrides: dict[str, dict] | None = None,
) -> list[dict]:
    """The grid's run specs, cells outermost, seeds innermost.

    Args:
        protocol: the task's protocol.
        cells: the cells.
        mixers, d_models, lrs, seeds: the grid's other axes.
        recipe: the model recipe.
        settings: batch_size, test_batch_size, epochs, max_steps, eval_interval, warmup_steps,
            weight_decay, grad_clip, target, device and data_seed.
        fixed: the generator's fixed arguments.
        overrides: mixer -> config fields given on the command line.

    Returns:
        The specs (see `linmix.tasks.train`), each with its "run_id".
    """
    overrides = overrides or {}
    specs = []
    for cell in cells:
        for mixer in mixers:
            label = model_label(mixer, overrides.get(mixer, {}), recipe)
            for d_model in d_models:
                kwargs = mixer_kwargs(protocol, mixer, d_model, overrides.get(mixer, {}))
                for lr in lrs:
                    for seed in seeds:
                        spec = {
                            "task": protocol.task, "generator": protocol.generator, "fixed": dict(fixed),
                            "axes": dict(protocol.axes), "cell": cell.label,
                            "train": [s.as_dict() for s in cell.train], "test": [s.as_dict() for s in cell.test],
                            "mixer": mixer, "mixer_kwargs": kwargs, "model_label": label, "d_model": d_model,
                            "n_layers": recipe.n_layers, "mlp_ratio": recipe.mlp_ratio,
                            "short_conv": recipe.short_conv, "position_embedding": recipe.position_embedding,
                            "lr": lr, "seed": seed, **settings,
                        }
                        spec["run_id"] = run_id(spec)
                        specs.append(spec)
    return specs


def default_recipe(protocol: Protocol, name: str | None = None, **changes) -> Recipe:
    """The protocol's recipe (or the named one) with the given fields changed (None keeps a field)."""
    base = RECIPES[name or protocol.recipe]
    fields = {k: v for k, v in changes.items() if v is not None}
    return Recipe(**{**base.__dict__, **fields})


def finished_results(out_dir: str | Path) -> dict[str, dict]:
    """The results of the finished runs in a sweep folder, by run id."""
    results = {}
    for path in sorted((Path(out_dir) / RUNS_DIR).glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        results[result["run_id"]] = result
    return results


def _save_result(out_dir: Path, result: dict, results: dict[str, dict]) -> None:
    """Write the run's file, then results.jsonl from every finished run (both atomically)."""
    results[result["run_id"]] = result
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out_dir / RUNS_DIR / f"{result['run_id']}.json", lambda f: f.write(text.encode()))
    lines = "".join(json.dumps(results[key]) + "\n" for key in sorted(results))
    atomic_write(out_dir / RESULTS, lambda f: f.write(lines.encode()))


class _Worker:
    """A `linmix.tasks.worker` process; a thread forwards its messages to the pool's queue."""

    def __init__(self, index: int, log_path: Path, env: dict, events: queue.Queue):
        self.index = index
        self.job: dict | None = None
        with open(log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "linmix.tasks.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, bufsize=1, env=env,
            )
        threading.Thread(target=self._forward, args=(events,), daemon=True).start()

    def _forward(self, events: queue.Queue) -> None:
        for line in self.process.stdout:
            events.put((self, json.loads(line)))
        events.put((self, None))

    def send(self, job: dict) -> None:
        """Give the worker a job (if it has died, its reader reports the job's end)."""
        self.job = job
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()


class WorkerPool:
    """Up to `size` workers that take jobs from a queue; a worker that dies is replaced.

    Args:
        size: the number of workers.
        log_dir: where each worker's log goes.
    """

    def __init__(self, size: int, log_dir: Path):
        self.size = size
        self.log_dir = log_dir
        self.env = child_environment(size)
        self.events: queue.Queue = queue.Queue()
        self.workers: list[_Worker | None] = [None] * size
        log_dir.mkdir(parents=True, exist_ok=True)

    def _idle_worker(self) -> _Worker | None:
        """A worker without a job, started in a free slot if needed; None when all are busy."""
        for index, worker in enumerate(self.workers):
            if worker is None:
                self.workers[index] = _Worker(index, self.log_dir / f"worker-{index}.log", self.env, self.events)
                return self.workers[index]
            if worker.job is None:
                return worker
        return None

    def busy(self) -> list[_Worker]:
        """The workers with a job."""
        return [worker for worker in self.workers if worker is not None and worker.job is not None]

    def process(
        self,
        jobs: list[dict],
        on_event: Callable[[dict, dict | None], None],
        deadline: float | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> list[dict]:
        """Run `jobs`, calling `on_event(job, message)` for each message (None: the worker died).

        Args:
            jobs: the jobs, in order.
            on_event: the handler; a "done" or "error" message, or None, ends the job.
            deadline: a `time.monotonic()` after which no job starts and running ones are stopped.
            on_tick: called after every message, and once a second while none comes.

        Returns:
            The jobs that did not end (stopped at the deadline or never started).
        """
        pending = deque(jobs)
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGTERM, exit_on_sigterm) if on_main_thread else None
        try:
            while pending or self.busy():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                while pending and (worker := self._idle_worker()) is not None:
                    worker.send(pending.popleft())
                try:
                    worker, message = self.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                finally:
                    if on_tick:
                        on_tick()
                if message is None:  # the worker died: free its slot, end its job
                    worker.stop()
                    if self.workers[worker.index] is worker:
                        self.workers[worker.index] = None
                    if worker.job is not None:
                        on_event(worker.job, None)
                elif worker.job is not None:
                    on_event(worker.job, message)
                    if message["event"] in ("done", "error"):
                        worker.job = None
            unfinished = [worker.job for worker in self.busy()] + list(pending)
        finally:
            self.close()
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous_handler)
        return unfinished

    def close(self) -> None:
        """Stop every worker: idle ones when their input closes, busy ones at once (their job is lost)."""
        started = [worker for worker in self.workers if worker is not None]
        for worker in started:
            if worker.job is None and worker.process.poll() is None:
                worker.process.stdin.close()
            else:
                worker.process.terminate()
        for worker in started:
            worker.process.wait()
        self.workers = [None] * self.size


def describe_run(result: dict) -> str:
    """One line about a finished run."""
    return (f"{result['task']} {result['cell']} {result['model']} d={result['d_model']} lr={result['lr']:g} "
            f"seed={result['seed']}: acc {result['accuracy']:.4f} (step {result['best_step']}), "
            f"{result['steps']}/{result['max_steps']} steps ({result['stopped']}), "
            f"{result['params'] / 1e6:.2f}M params, {result['wall_s']:.1f} s")


def run_grid(
    specs: list[dict],
    out_dir: str | Path,
    parallel: int = 1,
    budget_s: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Run every spec without a result in `out_dir`, `parallel` at a time, each in a worker.

    Args:
        specs: the grid (see `build_specs`).
        out_dir: the sweep folder.
        parallel: workers sharing the device.
        budget_s: stop after this many seconds: start nothing new and stop the running runs (which
            start again next time); None runs the whole grid.
        echo: prints a progress line (default: print).

    Returns:
        {"finished", "failed", "skipped", "unfinished" (counts), "wall_s", "runs_per_minute"}.

    Raises:
        ValueError: parallel < 1.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    echo = echo or functools.partial(print, flush=True)
    out_dir = Path(out_dir)
    results = finished_results(out_dir)
    pending = [spec for spec in specs if spec["run_id"] not in results]
    skipped = len(specs) - len(pending)
    echo(f"{len(specs)} runs: {skipped} already finished, {len(pending)} to run, {parallel} at a time")
    start = time.monotonic()
    counts = {"finished": 0, "failed": 0}
    last_status = [start]

    def on_event(job: dict, message: dict | None) -> None:
        spec = job["spec"]
        if message is None or message["event"] == "error":
            counts["failed"] += 1
            why = "the worker died" if message is None else message["message"]
            echo(f"[failed] {spec['run_id']}: {why} (see {out_dir / LOGS_DIR})")
        elif message["event"] == "done":
            counts["finished"] += 1
            _save_result(out_dir, {**message["result"], "workers": parallel}, results)
            echo(f"[{counts['finished'] + counts['failed']}/{len(pending)}] {describe_run(message['result'])}")

    def on_tick() -> None:
        now = time.monotonic()
        if now - last_status[0] >= STATUS_INTERVAL_S:
            last_status[0] = now
            echo(f"... {(now - start) / 60:.1f} min: {counts['finished']} finished, {counts['failed']} failed, "
                 f"{len(pending) - counts['finished'] - counts['failed']} to go")

    pool = WorkerPool(parallel, out_dir / LOGS_DIR)
    deadline = None if budget_s is None else start + budget_s
    unfinished = pool.process([{"kind": "run", "spec": spec} for spec in pending], on_event, deadline, on_tick)
    wall_s = time.monotonic() - start
    if unfinished:
        echo(f"stopped at the budget of {budget_s / 60:.1f} min: {len(unfinished)} runs left; run again to continue")
    rate = counts["finished"] / (wall_s / 60) if wall_s > 0 else 0.0
    if pending:
        echo(f"{counts['finished']} runs finished in {wall_s / 60:.2f} min with {parallel} workers: "
             f"{rate:.2f} runs per device-minute")
    return {**counts, "skipped": skipped, "unfinished": len(unfinished), "wall_s": wall_s, "runs_per_minute": rate}


def _config_key(spec: dict) -> str:
    """What a probe's timing depends on: the spec without lr, seed and run id."""
    return json.dumps({k: v for k, v in spec.items() if k not in ("lr", "seed", "run_id")}, sort_keys=True)


def plan_grid(
    specs: list[dict],
    out_dir: str | Path,
    parallel: int = 1,
    probe_steps: int = 50,
    budget_s: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Estimate the grid's device time from a timing probe, and how many runs fit a budget.

    The probe times `probe_steps` training steps and one evaluation of each distinct configuration
    (cell, model, width) of the pending runs. Probes run in waves of `parallel` (copies of the
    configurations fill the last wave), and the probes of a wave start timing together, after
    every one has built its data and model: step times include the sharing of the device as the
    grid would share it. A run's estimate is the worst case, its whole step budget: early stopping
    only shortens it.

    Args:
        specs: the grid.
        out_dir: the sweep folder (finished runs are not counted; the report goes to plan.json).
        parallel: workers sharing the device, as the grid would run.
        probe_steps: timed steps per configuration.
        budget_s: the device time to plan for, or None.
        echo: prints the report (default: print).

    Returns:
        {"runs", "pending", "parallel", "configs" (per configuration: cell, model, d_model, params,
        step_s, eval_s, setup_s, max_steps, evals, run_s, runs_per_minute, steps_per_minute),
        "total_s" (the pending runs' worst-case device time with `parallel` workers), "budget_s",
        "fit" (pending runs that fit the budget in the worst case, or None)}.
    """
    echo = echo or functools.partial(print, flush=True)
    out_dir = Path(out_dir)
    done = finished_results(out_dir)
    pending = [spec for spec in specs if spec["run_id"] not in done]
    configs: dict[str, dict] = {}
    for spec in pending:
        configs.setdefault(_config_key(spec), spec)
    keys = list(configs)
    waves = math.ceil(len(keys) / parallel)
    keys = (keys * parallel)[: waves * parallel]
    probes: dict[str, list[dict]] = {key: [] for key in configs}

    def on_event(job: dict, message: dict | None) -> None:
        if message is None or message["event"] == "error":
            why = "the worker died" if message is None else message["message"]
            echo(f"[probe failed] {job['spec']['run_id']}: {why} (see {out_dir / LOGS_DIR})")
        elif message["event"] == "done":
            probes[_config_key(job["spec"])].append(message["result"])

    echo(f"probing {len(configs)} configurations in {waves} waves of {parallel}, {probe_steps} steps each ...")
    with tempfile.TemporaryDirectory(prefix="linmix-probe-") as barriers:
        for wave in range(waves):
            barrier = {"dir": str(Path(barriers) / f"wave-{wave}"), "count": parallel}
            jobs = [{"kind": "probe", "spec": configs[key], "steps": probe_steps, "barrier": barrier}
                    for key in keys[wave * parallel: (wave + 1) * parallel]]
            WorkerPool(parallel, out_dir / LOGS_DIR).process(jobs, on_event)
    rows = []
    for key, spec in configs.items():
        if not probes[key]:
            continue
        mean = {field: statistics.fmean(p[field] for p in probes[key]) for field in ("step_s", "eval_s", "setup_s")}
        first = probes[key][0]
        run_s = mean["setup_s"] + first["max_steps"] * mean["step_s"] + first["evals"] * mean["eval_s"]
        rows.append({
            "key": key, "cell": spec["cell"], "model": spec["model_label"], "d_model": spec["d_model"],
            "params": first["params"], **mean, "max_steps": first["max_steps"], "evals": first["evals"],
            "run_s": run_s, "runs_per_minute": parallel * 60.0 / run_s,
            "steps_per_minute": parallel * 60.0 / mean["step_s"], "device_name": first["device_name"],
        })
    run_s = {row.pop("key"): row["run_s"] for row in rows}
    estimates = [run_s[_config_key(spec)] for spec in pending if _config_key(spec) in run_s]
    fit = None
    if budget_s is not None:
        fit, used = 0, 0.0
        while fit < len(estimates) and used + estimates[fit] / parallel <= budget_s:
            used += estimates[fit] / parallel
            fit += 1
    report = {"runs": len(specs), "pending": len(pending), "parallel": parallel, "configs": rows,
              "total_s": sum(estimates) / parallel, "budget_s": budget_s, "fit": fit}
    _echo_plan(report, echo)
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(out_dir / "plan.json", lambda f: f.write(text.encode()))
    return report


def _echo_plan(report: dict, echo: Callable[[str], None]) -> None:
    parallel = report["parallel"]
    echo(f"| cell | model | d_model | params | ms/step ({parallel} sharing) | steps/device-min | eval s | "
         f"max steps | worst-case run min | runs/device-min (worst case) |")
    echo("|---|---|---|---|---|---|---|---|---|---|")
    for row in report["configs"]:
        echo(f"| {row['cell']} | {row['model']} | {row['d_model']} | {row['params']:,} | {row['step_s'] * 1e3:.1f} | "
             f"{row['steps_per_minute']:,.0f} | {row['eval_s']:.2f} | {row['max_steps']} | {row['run_s'] / 60:.2f} | "
             f"{row['runs_per_minute']:.2f} |")
    echo(f"{report['runs']} runs in the grid, {report['pending']} not finished; worst case (no early stop) "
         f"{report['total_s'] / 60:.1f} device-min with {parallel} workers")
    if report["fit"] is not None:
        echo(f"a budget of {report['budget_s'] / 60:.1f} min fits {report['fit']} of the {report['pending']} "
             f"pending runs in the worst case (early stopping fits more)")
