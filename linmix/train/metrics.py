"""Metrics log (one JSON object per line, flushed as written) and the run summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linmix.train.checkpoint import atomic_write


def to_jsonable(value: Any) -> Any:
    """Turn tensors and numpy values into plain Python numbers and lists.

    Args:
        value: a value, or a dict/list/tuple of values, possibly holding tensors.

    Returns:
        The same structure with tensors and numpy values replaced by numbers or lists.
    """
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return value


class MetricsLog:
    """Appends records to a JSON-lines file, one line each, flushed at once.

    Args:
        path: the .jsonl file.
        fresh: True starts the file empty; False appends to what is there.
    """

    def __init__(self, path: str | os.PathLike, fresh: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w" if fresh else "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record.

        Args:
            record: JSON-serialisable after `to_jsonable`.
        """
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics log.

    A last line without its newline (a write cut short by a crash) is ignored.

    Args:
        path: the .jsonl file.

    Returns:
        The records in file order.

    Raises:
        ValueError: a complete line is not valid JSON (its line number is given).
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or cut short
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON record: {error}") from error
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> list[dict[str, Any]]:
    """Keep only the records of steps `<= last_step`, rewriting the file atomically.

    Used on resume: records written after the checkpoint will be written again.

    Args:
        path: the .jsonl file; a missing file is left missing.
        last_step: the step of the checkpoint being resumed.

    Returns:
        The records kept.
    """
    path = Path(path)
    if not path.exists():
        return []
    kept = [record for record in read_metrics(path) if record["step"] <= last_step]
    payload = "".join(json.dumps(record) + "\n" for record in kept).encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))
    return kept


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write the run summary as indented JSON, atomically.

    Args:
        path: the .json file.
        summary: JSON-serialisable after `to_jsonable`.
    """
    payload = (json.dumps(to_jsonable(summary), indent=2) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))
