"""Seed sweeps: run `linmix train` once per seed as subprocesses, then summarise the runs.

A sweep folder holds one run folder per seed, `seed-S/`, each with the run's train.log. Runs
start with `--resume`, so a sweep that was killed (or cut into slices with `--stop-after`) is
continued by running the same command again; runs whose summary says they finished are skipped.
The summary (summary.json and summary.md in the sweep folder) gives the best validation
perplexity of every seed and its mean, sample std, min and max over the finished runs, per the unit
the runs state ("char", "piece"); runs written before units were recorded are reported without one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RUN_LOG = "train.log"
RUN_SUMMARY = "summary.json"
SWEEP_INFO = "sweep.json"
SWEEP_SUMMARY_JSON = "summary.json"
SWEEP_SUMMARY_MD = "summary.md"
LOG_TAIL_LINES = 20
POLL_INTERVAL_S = 0.2
PROTOCOL_NAMES = {"full": "full-pass", "random": "random-batch"}


class PassThroughFlag(argparse.Action):
    """Collects a flag and its value, as typed, into a list of arguments for every run."""

    def __call__(self, parser, namespace, values, option_string=None):
        collected = list(getattr(namespace, self.dest) or [])
        collected.append(option_string)
        if values is not None and self.nargs != 0:
            collected.append(values)
        setattr(namespace, self.dest, collected)


def run_folder(sweep_dir: str | os.PathLike, seed: int) -> Path:
    """The folder of one seed's run.

    Args:
        sweep_dir: the sweep folder.
        seed: the run's seed.

    Returns:
        `sweep_dir/seed-<seed>`.
    """
    return Path(sweep_dir) / f"seed-{seed}"


def read_run_summary(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The summary.json that `linmix train` wrote into a run folder, or None if there is none.

    Args:
        folder: a run folder.

    Returns:
        The parsed summary, or None.
    """
    path = Path(folder) / RUN_SUMMARY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_finished(folder: str | os.PathLike) -> bool:
    """Whether a run folder holds a run that trained to its last step.

    Args:
        folder: a run folder.

    Returns:
        True when its summary.json says `"finished": true`.
    """
    summary = read_run_summary(folder)
    return bool(summary and summary.get("finished"))


def train_command(preset: str, seed: int, folder: Path, train_flags: Sequence[str]) -> list[str]:
    """The `linmix train` command line of one run.

    Args:
        preset: the preset name.
        seed: the run's seed.
        folder: the run folder.
        train_flags: further train flags, passed unchanged.

    Returns:
        The argument list, starting with this Python interpreter.
    """
    return [sys.executable, "-m", "linmix", "train", "--preset", preset, "--seed", str(seed),
            "--out", str(folder), "--resume", "--no-progress", *train_flags]


def child_environment(parallel: int) -> dict[str, str]:
    """This process's environment for a run: the folder holding `linmix` first on PYTHONPATH, and,
    unless OMP_NUM_THREADS is set, the CPU cores split between the parallel runs (CPU runs that
    each use every core slow each other down many times over)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, _usable_cores() // parallel))
    return env


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def ppl_name(unit: str | None) -> str:
    """How reports name a perplexity: "PPL per piece", or plain "PPL" when the unit is unknown.

    Args:
        unit: what one token is ("char", "piece"), or None for runs that did not record it.

    Returns:
        The name.
    """
    return f"PPL per {unit}" if unit else "PPL"


def _describe_result(folder: Path) -> str:
    summary = read_run_summary(folder)
    if summary is None:
        return "no summary written"
    scores = ", ".join(f"{protocol} {best['ppl']:.4f} (step {best['step']})"
                       for protocol, best in summary["best"].items())
    state = "finished" if summary.get("finished") else f"unfinished at step {summary['step']}/{summary['max_steps']}"
    return f"best val {ppl_name(summary.get('ppl_unit'))} {scores}; {state}"


def _record_sweep(sweep_dir: Path, preset: str, seeds: Sequence[int], train_flags: Sequence[str]) -> None:
    """Write sweep.json (the preset and flags); refuse a folder that holds another preset's sweep."""
    path = sweep_dir / SWEEP_INFO
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier.get("preset") != preset:
            raise ValueError(f"{sweep_dir} holds a sweep of preset {earlier.get('preset')!r}, not {preset!r}")
    info = {"preset": preset, "seeds": list(seeds), "train_flags": list(train_flags)}
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def run_sweep(
    preset: str,
    seeds: Sequence[int],
    sweep_dir: str | os.PathLike,
    train_flags: Sequence[str] = (),
    parallel: int = 1,
    echo: Callable[[str], None] | None = None,
) -> list[int]:
    """Train `preset` once per seed, at most `parallel` runs at a time, skipping finished runs.

    Each run is `linmix train ... --resume` in its own subprocess, appending its output to
    `seed-S/train.log`; parallel runs split the CPU cores unless OMP_NUM_THREADS is set.
    If the sweep is interrupted (Ctrl-C or SIGTERM) it stops its runs; run it again to continue.

    Args:
        preset: the preset name.
        seeds: one run per seed.
        sweep_dir: the sweep folder (created if needed).
        train_flags: train flags given unchanged to every run (not --seed, --out or --resume).
        parallel: the most runs at a time.
        echo: prints one progress line (default: print to stdout at once).

    Returns:
        The seeds whose run exited with a non-zero code.

    Raises:
        ValueError: `parallel` < 1, or the folder holds a sweep of another preset.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    echo = echo or functools.partial(print, flush=True)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _record_sweep(sweep_dir, preset, seeds, train_flags)
    pending = []
    for seed in dict.fromkeys(seeds):
        if is_finished(run_folder(sweep_dir, seed)):
            echo(f"seed {seed}: skipped, already finished ({_describe_result(run_folder(sweep_dir, seed))})")
        else:
            pending.append(seed)
    failed: list[int] = []
    running: dict[int, subprocess.Popen] = {}
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, exit_on_sigterm) if on_main_thread else None
    try:
        while pending or running:
            while pending and len(running) < parallel:
                seed = pending.pop(0)
                running[seed] = _start_run(preset, seed, sweep_dir, train_flags, parallel, echo)
            time.sleep(POLL_INTERVAL_S)
            for seed, process in list(running.items()):
                if process.poll() is not None:
                    del running[seed]
                    if not _report_end(seed, process.returncode, run_folder(sweep_dir, seed), echo):
                        failed.append(seed)
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.wait()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return failed


def exit_on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: exit with 128 + the signal's number, so `finally` blocks (ending child
    processes, finishing atomic writes) still run."""
    raise SystemExit(128 + signum)


def _start_run(preset: str, seed: int, sweep_dir: Path, train_flags: Sequence[str], parallel: int,
               echo: Callable[[str], None]) -> subprocess.Popen:
    folder = run_folder(sweep_dir, seed)
    folder.mkdir(parents=True, exist_ok=True)
    command = train_command(preset, seed, folder, train_flags)
    with open(folder / RUN_LOG, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(parallel))
    echo(f"seed {seed}: started, log {folder / RUN_LOG}")
    return process


def _report_end(seed: int, code: int, folder: Path, echo: Callable[[str], None]) -> bool:
    if code == 0:
        echo(f"seed {seed}: exit 0, {_describe_result(folder)}")
        return True
    tail = _log_tail(folder / RUN_LOG)
    echo(f"seed {seed}: FAILED with exit code {code}; last lines of {folder / RUN_LOG}:\n{tail}")
    return False


def _seed_of(folder: Path) -> int | None:
    number = folder.name.removeprefix("seed-")
    return int(number) if number.isdigit() else None


def _run_row(folder: Path) -> dict[str, Any]:
    """One run's line of the sweep summary (values are None where the run wrote no summary)."""
    summary = read_run_summary(folder) or {}
    protocols = summary.get("best", {})
    final = {
        protocol: {"loss": summary.get(f"final_val_loss_{protocol}"), "ppl": summary.get(f"final_val_ppl_{protocol}")}
        for protocol in protocols
    }
    return {
        "run": folder.name,
        "seed": _seed_of(folder),
        "finished": bool(summary.get("finished")),
        "step": summary.get("step"),
        "max_steps": summary.get("max_steps"),
        "params": summary.get("params"),
        "ppl_unit": summary.get("ppl_unit"),
        "best": protocols,
        "final_step": summary.get("final_eval_step"),
        "final": final,
        "tokens_per_s": summary.get("tokens_per_s_steady") or summary.get("tokens_per_s_mean"),
        "train_time_s": summary.get("train_time_s"),
        "wall_time_s": summary.get("wall_time_s"),
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Statistics of the best validation perplexity per protocol over the finished runs.

    Args:
        rows: per-run rows as in `summarize_sweep`'s "runs".

    Returns:
        protocol -> {"n", "ppl_mean", "ppl_std" (sample std, ddof 1; None for n = 1), "ppl_min",
        "ppl_max", "loss_mean", "final_ppl_mean", "final_ppl_std"}; protocols no finished run
        evaluated are absent.
    """
    finished = [row for row in rows if row["finished"]]
    protocols = sorted({protocol for row in finished for protocol in row["best"]})
    result = {}
    for protocol in protocols:
        scored = [row for row in finished if protocol in row["best"]]
        best = _spread([row["best"][protocol]["ppl"] for row in scored])
        final = _spread([row["final"][protocol]["ppl"] for row in scored])
        result[protocol] = {
            "n": len(scored),
            **{f"ppl_{key}": value for key, value in best.items()},
            "loss_mean": statistics.fmean(row["best"][protocol]["loss"] for row in scored),
            "final_ppl_mean": final["mean"],
            "final_ppl_std": final["std"],
        }
    return result


def common_unit(rows: Sequence[dict[str, Any]]) -> str | None:
    """The unit of the runs' perplexities, which every run that reports one must share.

    Runs without a perplexity (no summary, or none evaluated yet) are not looked at; a run that
    does not state its unit (written by an older version) does not share a stated one.

    Args:
        rows: per-run rows as in `summarize_sweep`'s "runs".

    Returns:
        The unit ("char", "piece"), or None when no run states one.

    Raises:
        ValueError: the runs' units differ; the message names each unit's runs.
    """
    by_unit: dict[str | None, list[str]] = {}
    for row in rows:
        if row["best"]:
            by_unit.setdefault(row["ppl_unit"], []).append(row["run"])
    if len(by_unit) > 1:
        groups = "; ".join(f"{unit or 'no unit stated'}: {', '.join(runs)}" for unit, runs in by_unit.items())
        raise ValueError(f"the runs report perplexity per different units, which are not aggregated ({groups}); "
                         f"keep one corpus's runs per sweep folder")
    return next(iter(by_unit), None)


def summarize_sweep(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Summarise every `seed-*` run of a sweep folder and write summary.json and summary.md there.

    Args:
        sweep_dir: the sweep folder.

    Returns:
        {"name", "preset", "params", "ppl_unit" (see `common_unit`), "runs" (one row per run, by
        seed), "unfinished" (run folder names), "aggregate" (see `aggregate`)}.

    Raises:
        FileNotFoundError: the folder holds no `seed-*` run folder.
        ValueError: the runs report perplexity per different units (see `common_unit`).
    """
    sweep_dir = Path(sweep_dir)
    folders = [path for path in sweep_dir.glob("seed-*") if path.is_dir() and _seed_of(path) is not None]
    if not folders:
        raise FileNotFoundError(f"{sweep_dir} holds no seed-* run folder")
    rows = [_run_row(folder) for folder in sorted(folders, key=_seed_of)]
    unit = common_unit(rows)
    info_path = sweep_dir / SWEEP_INFO
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    params = next((row["params"] for row in rows if row["finished"]), None)
    summary = {
        "name": sweep_dir.resolve().name,
        "preset": info.get("preset"),
        "train_flags": info.get("train_flags"),
        "params": params,
        "ppl_unit": unit,
        "runs": rows,
        "unfinished": [row["run"] for row in rows if not row["finished"]],
        "aggregate": aggregate(rows),
    }
    (sweep_dir / SWEEP_SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (sweep_dir / SWEEP_SUMMARY_MD).write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def aggregate_lines(summary: dict[str, Any]) -> list[str]:
    """One line per protocol, e.g. `kops-ts-v2 (810,189 params): full-pass best val PPL per char 4.41
    ± 0.01 (n=5, min 4.40, max 4.43)`; "per <unit>" is left out when the runs did not state one.

    Args:
        summary: as returned by `summarize_sweep`.

    Returns:
        The lines; empty when no run finished.
    """
    name = summary["preset"] or summary["name"]
    params = f" ({_count(summary['params'])} params)" if summary["params"] is not None else ""
    ppl = ppl_name(summary.get("ppl_unit"))
    lines = []
    for protocol, stats in summary["aggregate"].items():
        spread = f" ± {stats['ppl_std']:.2f}" if stats["ppl_std"] is not None else ""
        lines.append(
            f"{name}{params}: {PROTOCOL_NAMES.get(protocol, protocol)} best val {ppl} {stats['ppl_mean']:.2f}{spread} "
            f"(n={stats['n']}, min {stats['ppl_min']:.2f}, max {stats['ppl_max']:.2f})"
        )
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    """The sweep summary as Markdown: a table of runs, the aggregate lines and the unfinished runs.

    Args:
        summary: as returned by `summarize_sweep`.

    Returns:
        The Markdown text.
    """
    protocols = sorted({protocol for row in summary["runs"] for protocol in row["best"]})
    ppl = ppl_name(summary.get("ppl_unit"))
    header = ["seed", "finished", "step"]
    header += [f"best {p} {ppl} (step)" for p in protocols] + [f"final {p} {ppl}" for p in protocols]
    header += ["params", "tokens/s", "wall time (s)"]
    lines = [f"# Sweep {summary['name']}", ""]
    if summary["preset"]:
        flags = " ".join(summary["train_flags"] or [])
        lines += [f"Preset `{summary['preset']}`" + (f", train flags `{flags}`" if flags else ""), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["runs"]:
        cells = [row["run"].removeprefix("seed-"), "yes" if row["finished"] else "no",
                 f"{row['step'] if row['step'] is not None else '-'}/{row['max_steps'] or '-'}"]
        for protocol in protocols:
            best = row["best"].get(protocol)
            cells.append(f"{best['ppl']:.4f} ({best['step']})" if best else "-")
        cells += [_number(row["final"].get(protocol, {}).get("ppl")) for protocol in protocols]
        cells += [_count(row["params"]), _count(row["tokens_per_s"]), _number(row["wall_time_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    for line in aggregate_lines(summary) or ["No run has finished yet."]:
        lines += ["", line]
    if summary["unfinished"]:
        lines += ["", "Unfinished, excluded from the aggregate: " + ", ".join(summary["unfinished"])]
    return "\n".join(lines) + "\n"
