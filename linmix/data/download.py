"""Download a file once, check its sha256, and keep it in the user's cache."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class ChecksumError(RuntimeError):
    """A downloaded file's sha256 is not the expected one."""


def default_cache_dir() -> Path:
    """The folder linmix caches downloads in.

    Returns:
        `$XDG_CACHE_HOME/linmix` when that variable is set, else `~/.cache/linmix`.
    """
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
    return base / "linmix"


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file's bytes.

    Args:
        path: the file to hash.

    Returns:
        The 64-character lower-case hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download `url` to `dest` atomically, checking its sha256.

    The bytes go to a temporary file beside `dest`, which replaces `dest` only once the whole file
    has arrived and its checksum matches, so `dest` is never left half-written.

    Args:
        url: any URL urllib opens (`https://...`, `file://...`).
        dest: where the file goes; missing parent folders are created.
        sha256: expected hex digest, or None to skip the check.

    Returns:
        `dest` as a Path.

    Raises:
        ChecksumError: the downloaded bytes do not have the expected sha256 (nothing is kept).
        urllib.error.URLError, OSError: the download itself failed (nothing is kept).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp_path = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response,
        ):
            for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest.hexdigest()}; "
                f"the download was discarded"
            )
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return dest
