"""Loading run folders (metrics.jsonl, best.pt) and sweep folders (seed-*/) for plotting."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linmix.train.metrics import read_metrics

METRICS_FILE = "metrics.jsonl"
BEST_CHECKPOINT = "best.pt"


@dataclass
class Run:
    """One training run: its folder and the records of its metrics log."""

    name: str
    folder: Path
    records: list[dict[str, Any]] = field(repr=False)

    @property
    def evals(self) -> list[dict[str, Any]]:
        """The evaluation records, in step order."""
        return [record for record in self.records if record.get("kind") == "eval"]

    @property
    def best_checkpoint(self) -> Path | None:
        """The run's best.pt, or None if it has none."""
        path = self.folder / BEST_CHECKPOINT
        return path if path.is_file() else None

    def has(self, key: str) -> bool:
        """Whether some evaluation record holds a value (not None) for `key`."""
        return any(record.get(key) is not None for record in self.evals)

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """Steps and values of `key` over the evaluation records that hold it.

        Args:
            key: an evaluation record field, e.g. "val_ppl_full" or "gamma".

        Returns:
            (steps, values), skipping records where the value is absent or None.
        """
        pairs = [(record["step"], record[key]) for record in self.evals if record.get(key) is not None]
        return [step for step, _ in pairs], [value for _, value in pairs]


@dataclass
class RunGroup:
    """Runs drawn together (the seeds of one sweep, or a single run), under one label."""

    label: str
    runs: list[Run]

    def has(self, key: str) -> bool:
        """Whether some run of the group logged `key`."""
        return any(run.has(key) for run in self.runs)

    def run_label(self, run: Run) -> str:
        """The group's label, followed by the run's name in brackets when the group holds several runs."""
        return self.label if len(self.runs) == 1 else f"{self.label} ({run.name})"


def _seed_order(folder: Path) -> tuple[float, str]:
    number = folder.name.removeprefix("seed-")
    return (int(number) if number.isdigit() else math.inf, folder.name)


def load_run(folder: str | os.PathLike) -> Run:
    """Read one run folder.

    Args:
        folder: a folder holding metrics.jsonl.

    Returns:
        The run, named after its folder.
    """
    folder = Path(folder)
    return Run(folder.name, folder, read_metrics(folder / METRICS_FILE))


def load_group(folder: str | os.PathLike) -> RunGroup:
    """Read a run folder (metrics.jsonl) or a sweep folder (seed-*/metrics.jsonl) as a group.

    Args:
        folder: the run or sweep folder.

    Returns:
        The group, labelled with the folder's name; a sweep's runs are ordered by seed.

    Raises:
        FileNotFoundError: the folder holds neither layout.
    """
    folder = Path(folder)
    label = folder.resolve().name
    if (folder / METRICS_FILE).is_file():
        return RunGroup(label, [load_run(folder)])
    runs = sorted((path.parent for path in folder.glob(f"seed-*/{METRICS_FILE}")), key=_seed_order)
    if not runs:
        raise FileNotFoundError(f"{folder} holds neither {METRICS_FILE} nor seed-*/{METRICS_FILE}")
    return RunGroup(label, [load_run(run) for run in runs])
