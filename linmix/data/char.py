"""Character-level Tiny Shakespeare with nanoGPT's vocabulary and 90/10 split."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from linmix.data.download import default_cache_dir, download_file
from linmix.data.tokenizers import CharTokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_DIR_ENV = "LINMIX_DATA_DIR"
TRAIN_FRACTION = 0.9

_FILE_NAME = "input.txt"
_SUBDIR = "tinyshakespeare"


@dataclass(eq=False)
class CharCorpus:
    """A character-level corpus, split into train and validation token streams.

    Attributes:
        train: token ids of the first 90% of the characters, `[N_train]` torch.long.
        val: token ids of the remaining characters, `[N_val]` torch.long.
        vocab: the sorted characters; token id i stands for `vocab[i]`.
        source: the text file the corpus was read from.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab: list[str]
    source: Path
    tokenizer: CharTokenizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tokenizer = CharTokenizer(self.vocab)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (see `CharTokenizer.encode`; unknown characters raise ValueError)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text that token ids stand for (see `CharTokenizer.decode`)."""
        return self.tokenizer.decode(ids)


def resolve_char_corpus_path(path: str | os.PathLike | None = None) -> Path:
    """Find Tiny Shakespeare's `input.txt`, downloading it into the cache as a last resort.

    Search order:
      1. `path`: the file itself, or a folder holding `input.txt` or `tinyshakespeare/input.txt`;
      2. `$LINMIX_DATA_DIR/tinyshakespeare/input.txt`, then `$LINMIX_DATA_DIR/input.txt`;
      3. the cache, `<cache>/tinyshakespeare/input.txt` (see `default_cache_dir`);
      4. a download into the cache, checked against its sha256.

    Args:
        path: an explicit file or folder; when given, nothing else is searched.

    Returns:
        The path of the text file.

    Raises:
        FileNotFoundError: `path` does not exist or holds no `input.txt`, or the file is nowhere
            and could not be downloaded (the message lists the places searched).
    """
    if path is not None:
        return _resolve_explicit_path(Path(path))

    searched = []
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        for candidate in (Path(data_dir) / _SUBDIR / _FILE_NAME, Path(data_dir) / _FILE_NAME):
            if candidate.is_file():
                return candidate
            searched.append(candidate)
    else:
        searched.append(f"${DATA_DIR_ENV} (not set)")

    cached = default_cache_dir() / _SUBDIR / _FILE_NAME
    if cached.is_file():
        return cached
    searched.append(cached)

    try:
        return download_file(TINY_SHAKESPEARE_URL, cached, TINY_SHAKESPEARE_SHA256)
    except OSError as error:
        places = "; ".join(str(place) for place in searched)
        raise FileNotFoundError(
            f"Tiny Shakespeare input.txt was not found (searched {places}) and could not be downloaded "
            f"from {TINY_SHAKESPEARE_URL} ({error}); put the file at DIR/{_SUBDIR}/{_FILE_NAME} and pass "
            f"--data DIR (or the file itself), or set {DATA_DIR_ENV}=DIR"
        ) from error


def load_char_corpus(path: str | os.PathLike | None = None) -> CharCorpus:
    """Load Tiny Shakespeare as characters with nanoGPT's vocabulary and split.

    The vocabulary is the sorted set of all characters in the file (65 for Tiny Shakespeare); the
    first `int(0.9 * n)` characters are the training stream, the rest the validation stream.

    Args:
        path: an explicit file or folder (see `resolve_char_corpus_path` for the search order).

    Returns:
        The corpus, with `train`/`val` as torch.long tensors.

    Raises:
        FileNotFoundError: no file was found or downloaded (see `resolve_char_corpus_path`).
    """
    source = resolve_char_corpus_path(path)
    text = source.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    tokens = torch.from_numpy(_encode_text_fast(text, vocab))  # [n]
    n_train = int(len(tokens) * TRAIN_FRACTION)
    return CharCorpus(train=tokens[:n_train], val=tokens[n_train:], vocab=vocab, source=source)


def _resolve_explicit_path(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data path does not exist: {path}")
    if path.is_file():
        return path
    for candidate in (path / _FILE_NAME, path / _SUBDIR / _FILE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"data folder {path} holds neither {_FILE_NAME} nor {_SUBDIR}/{_FILE_NAME}"
    )


def _encode_text_fast(text: str, vocab: list[str]) -> np.ndarray:
    """Ids of every character of `text`, where `vocab` is sorted and holds all of them."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [n]
    vocab_code_points = np.array([ord(char) for char in vocab], dtype=np.uint32)  # [V], sorted
    return np.searchsorted(vocab_code_points, code_points).astype(np.int64)
