"""Crash-safe checkpoint files (temporary file beside the target, fsync, rename) and the global
RNG states a checkpoint carries."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that readers see either the old file or the whole new one.

    Args:
        path: the file to create or replace.
        write: called with a binary file open on a temporary file in the same folder; once it
            returns, the data is flushed, fsynced and renamed over `path`. If it raises, the
            temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Save a checkpoint dict with torch.save, atomically.

    Args:
        checkpoint: tensors, numbers, strings, lists, tuples and dicts of them (what
            `torch.load(weights_only=True)` reads back).
        path: the .pt file to write.
    """
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, without unpickling arbitrary objects.

    Args:
        path: the .pt file.
        map_location: where tensors are loaded.

    Returns:
        The checkpoint dict.
    """
    return torch.load(path, map_location=map_location, weights_only=True)


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch: CPU and every CUDA device).

    Args:
        seed: a seed in `[0, 2**32)`.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """The global generators' states, in types `torch.load(weights_only=True)` reads back.

    Args:
        device: the training device; its CUDA generator is saved when it is a CUDA device.

    Returns:
        `{"torch_cpu", "python", "numpy"[, "torch_cuda"]}`.
    """
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": keys.tolist(),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
    }
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Put back the generator states `capture_rng_states` saved.

    Args:
        states: what `capture_rng_states` returned.
        device: the training device; a saved CUDA state is restored only onto a CUDA device.
    """
    torch.set_rng_state(states["torch_cpu"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if device.type == "cuda" and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX only; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
