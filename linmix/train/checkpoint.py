"""Checkpoint files: a versioned, checksummed envelope around torch.save's bytes, written
crash-safely (temporary file beside the target, fsync, rename), and the global RNG states a
checkpoint carries.

A checkpoint file (format version 2) is three parts, back to back:

    b"linmix-checkpoint\\n"                                     the magic line
    {"version": 2, "payload_bytes": N, "sha256": "<hex>"}\\n    a one-line JSON header
    <N bytes>                                                   torch.save of the checkpoint dict

`load_checkpoint` checks every part before it unpickles the payload (with
`torch.load(weights_only=True)`, which builds no arbitrary objects). Files of the earlier format,
version 1 (the bare torch.save archive, as linmix wrote before the envelope), still load: their
zip records' CRC-32s stand in for the checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from linmix.errors import CheckpointError

FORMAT_VERSION = 2
MAGIC = b"linmix-checkpoint\n"
REQUIRED_KEYS = ("model", "step", "config")
_MAX_HEADER_BYTES = 1024
_ZIP_MAGIC = b"PK\x03\x04"  # how a torch.save archive (format version 1) begins


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
    """Write a checkpoint file (format version 2, see the module's docstring), atomically.

    Args:
        checkpoint: a dict with at least "model" (a state dict of finite tensors), "step" and
            "config"; tensors, numbers, strings, lists, tuples and dicts of them (what
            `torch.load(weights_only=True)` reads back).
        path: the .pt file to write.

    Raises:
        CheckpointError: the dict lacks a required key or holds non-finite weights; nothing is
            written then.
    """
    problem = _content_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"refusing to write checkpoint {path}: it {problem}")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    payload = buffer.getbuffer()
    header = {
        "version": FORMAT_VERSION,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }

    def write(f: BinaryIO) -> None:
        f.write(MAGIC)
        f.write(json.dumps(header).encode("ascii") + b"\n")
        f.write(payload)

    atomic_write(path, write)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load and verify a checkpoint file, without unpickling arbitrary objects.

    A file of format version 2 must have its whole payload and match its SHA-256; a file of
    version 1 (a bare torch.save archive) must match its zip records' CRC-32s. Either must hold a
    dict with REQUIRED_KEYS whose "model" state dict is finite.

    Args:
        path: the .pt file.
        map_location: where tensors are loaded.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: the file is missing, empty, cut short, not a linmix checkpoint,
            corrupted, of a newer format or holds non-finite weights; the one-line message names
            the file and the problem.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise _unusable(path, "is empty (0 bytes)")
    if data.startswith(MAGIC):
        payload = _verified_payload(path, data)
    elif MAGIC.startswith(data) or _ZIP_MAGIC.startswith(data):
        raise _unusable(path, f"is cut short: it ends after {len(data)} bytes")
    elif data.startswith(_ZIP_MAGIC):
        _verify_archive(path, data)
        payload = data
    else:
        raise _unusable(
            path,
            "is not a linmix checkpoint: it starts with neither linmix's header "
            "nor a torch.save archive",
        )
    checkpoint = _unpickle(path, payload, map_location)
    problem = _content_problem(checkpoint)
    if problem is not None:
        raise _unusable(path, problem)
    return checkpoint


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete the temporary files `atomic_write` leaves behind when a process dies mid-write.

    Args:
        folder: the folder of the files.
        names: the file names whose temporaries (".NAME.*.tmp") are removed.
    """
    for name in names:
        for temporary in Path(folder).glob(f".{name}.*.tmp"):
            temporary.unlink(missing_ok=True)


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


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a file that cannot be read raises CheckpointError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _unusable(path, "does not exist") from None
    except IsADirectoryError:
        raise _unusable(path, "is a folder, not a file") from None
    except OSError as error:
        raise _unusable(path, f"cannot be read: {error.strerror or error}") from error


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The payload of a format-2 file, after its header, length and checksum are checked."""
    header_end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER_BYTES)
    if header_end < 0:
        if len(data) < len(MAGIC) + _MAX_HEADER_BYTES:
            raise _unusable(
                path, f"is cut short: it ends inside its header, after {len(data)} bytes"
            )
        raise _unusable(path, "has a damaged header: no end of line in its first bytes")
    header = _parse_header(path, data[len(MAGIC) : header_end])
    payload = data[header_end + 1 :]
    expected = header["payload_bytes"]
    if len(payload) < expected:
        raise _unusable(
            path, f"is cut short: it holds {len(payload)} of its {expected} payload bytes"
        )
    if len(payload) > expected:
        raise _unusable(path, f"is damaged: {len(payload) - expected} bytes follow its payload")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise _unusable(
            path, "is corrupted: the SHA-256 of its payload differs from the one in its header"
        )
    return payload


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    """The format-2 header line as a dict, its version, size and checksum checked."""
    try:
        header = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    version = header.get("version") if isinstance(header, dict) else None
    if _is_count(version) and version > FORMAT_VERSION:
        raise _unusable(
            path,
            f"was written by a newer linmix: checkpoint format version {version}, "
            f"this linmix reads versions up to {FORMAT_VERSION}",
        )
    checksum = header.get("sha256") if isinstance(header, dict) else None
    if (
        version != FORMAT_VERSION
        or not _is_count(header.get("payload_bytes"))
        or not isinstance(checksum, str)
        or len(checksum) != 64
    ):
        raise _unusable(path, f"has a damaged header: {line[:100]!r}")
    return header


def _verify_archive(path: Path, data: bytes) -> None:
    """Check a format-1 file (a bare torch.save archive) against its zip records' CRC-32s."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad_record = archive.testzip()
    except Exception as error:  # zipfile raises assorted types on a cut or damaged archive
        raise _unusable(
            path,
            "is cut short or damaged: its torch.save archive cannot be read "
            f"({_first_line(error)})",
        ) from error
    if bad_record is not None:
        raise _unusable(path, f"is corrupted: its record {bad_record} fails its CRC-32 check")


def _unpickle(path: Path, payload: bytes, map_location: str | torch.device) -> Any:
    """torch.load of the payload with weights_only=True; a refusal raises CheckpointError."""
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unusable(
            path,
            "holds objects other than tensors and plain values, which linmix does not unpickle "
            f"({_weights_only_refusal(error)})",
        ) from error
    except Exception as error:  # torch.load raises assorted types on bytes it cannot read
        raise _unusable(path, f"cannot be loaded: {_first_line(error)}") from error


def _content_problem(checkpoint: Any) -> str | None:
    """What keeps a dict from being a usable checkpoint (a phrase after "it"), or None."""
    if not isinstance(checkpoint, dict):
        return f"holds a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return f"lacks the key(s) {', '.join(missing)}"
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
        return "holds no state dict of tensors under \"model\""
    for name, tensor in model.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            return f"holds non-finite weights: model[{name!r}] has NaN or infinite values"
    return None


def _unusable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} {problem}")


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters)."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _weights_only_refusal(error: pickle.UnpicklingError) -> str:
    """The sentence of torch's weights-only refusal that names the object, else the first line."""
    for line in str(error).splitlines():
        _, marker, detail = line.partition("WeightsUnpickler error: ")
        if marker:
            return detail.split(". ")[0][:200]
    return _first_line(error)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX only; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_trained_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The model of a checkpoint written by `linmix train` (best.pt or last.pt), on the CPU.

    Args:
        path: the checkpoint file.

    Returns:
        `(model, checkpoint, meta)`: the model with the checkpoint's weights (train mode), the whole
        checkpoint, and its meta (preset, model spec, tokenizer, corpus).

    Raises:
        CheckpointError: the file is missing or damaged (see `load_checkpoint`), its meta describes
            no model or tokenizer (not written by `linmix train`), or its weights do not fit its model.
    """
    from linmix.models.registry import build_from_spec

    checkpoint = load_checkpoint(path, map_location="cpu")
    meta = checkpoint.get("meta", {})
    if "model" not in meta or not ("tokenizer" in meta or "vocab" in meta):
        raise CheckpointError(f"{path} was not written by `linmix train` (no model or tokenizer in its meta)")
    try:
        model = build_from_spec(meta["model"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its weights do not fit its model description ({error})") from None
    return model, checkpoint, meta
