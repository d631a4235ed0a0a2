"""The machine and software a benchmark report was measured on."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch


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


def machine_line(title: str, machine: dict) -> str:
    """``"<title> on <GPU or CPU>: torch ..., CUDA ..., triton ..., commit ..., <date>"`` of a report's machine."""
    where = machine["gpu"] or machine["cpu"] or machine["device"]
    return (f"{title} on {where}: torch {machine['torch']}, CUDA {machine['cuda']}, triton {machine['triton']}, "
            f"commit {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}, {machine['date']}")
