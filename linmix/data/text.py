"""Text corpora of train/valid(/test) files, tokenized by characters or by a cached SentencePiece model."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from linmix.data.download import default_cache_dir, sha256_of_file
from linmix.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)

# The accepted file names of each split: plain, then wikitext-2-v1's.
SPLIT_FILE_NAMES = {
    "train": ("train.txt", "wiki.train.tokens"),
    "valid": ("valid.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}
TOKENIZERS = ("char", "sentencepiece")
_TOKENIZER_CACHE_SUBDIR = "tokenizers"


@dataclass(eq=False)
class TextCorpus:
    """Token streams of a corpus's splits and the tokenizer that made them.

    Attributes:
        name: the corpus, e.g. "tinyshakespeare-char", "wikitext2-sp8192" or "text".
        train: training ids `[N_train]` torch.long, or None where only evaluation was asked for.
        val: validation ids `[N_val]` torch.long.
        test: test ids `[N_test]` torch.long, or None where the corpus has no test split.
        tokenizer: a CharTokenizer or SentencePieceTokenizer.
        source: the file or folder the text was read from.
        tokenizer_file: the cached SentencePiece model, or None for characters.
    """

    name: str
    train: torch.Tensor | None
    val: torch.Tensor
    test: torch.Tensor | None
    tokenizer: Tokenizer
    source: Path
    tokenizer_file: Path | None = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's number of ids."""
        return self.tokenizer.vocab_size

    @property
    def unit(self) -> str:
        """What one token is ("char" or "piece"): perplexities are per this unit."""
        return self.tokenizer.unit

    @property
    def token_counts(self) -> dict[str, int]:
        """Tokens in each loaded split, e.g. {"train": ..., "valid": ...}."""
        splits = {"train": self.train, "valid": self.val, "test": self.test}
        return {split: len(tokens) for split, tokens in splits.items() if tokens is not None}

    def to_meta(self) -> dict:
        """A JSON-ready description for checkpoints and reports (name, source, token counts, unit)."""
        return {"name": self.name, "source": str(self.source), "unit": self.unit, "tokens": self.token_counts,
                "tokenizer_file": None if self.tokenizer_file is None else str(self.tokenizer_file)}


def find_split_files(folder: Path) -> dict[str, Path]:
    """The split files present in `folder`, under either accepted name (see `SPLIT_FILE_NAMES`).

    Args:
        folder: the folder to look in.

    Returns:
        {split: path} for each split found.
    """
    found = {}
    for split, names in SPLIT_FILE_NAMES.items():
        present = [folder / name for name in names if (folder / name).is_file()]
        if present:
            found[split] = present[0]
    return found


def load_text_folder(
    folder: str | os.PathLike,
    tokenizer: str | Tokenizer = "sentencepiece",
    vocab_size: int = 8192,
    name: str = "text",
    need_train: bool = True,
) -> TextCorpus:
    """Load a folder of `train.txt`, `valid.txt` and optionally `test.txt` (or wiki.*.tokens).

    Args:
        folder: the folder holding the split files.
        tokenizer: "sentencepiece" (a unigram model of `vocab_size` pieces trained on train, cached,
            see `cached_sentencepiece`), "char" (the sorted characters of all splits), or a tokenizer
            to encode with as it is (e.g. a checkpoint's).
        vocab_size: pieces asked of a new SentencePiece model.
        name: the corpus name recorded in the result.
        need_train: False reads no train split (for evaluation with a given tokenizer).

    Returns:
        The corpus.

    Raises:
        FileNotFoundError: a needed split file is missing (the message names the accepted names).
        ValueError: an unknown tokenizer name, or text a char tokenizer cannot encode.
    """
    folder = Path(folder)
    files = find_split_files(folder)
    needed = ("train", "valid") if need_train or isinstance(tokenizer, str) else ("valid",)
    missing = [split for split in needed if split not in files]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {_name_files(missing)}")
    texts = {split: path.read_text(encoding="utf-8") for split, path in files.items()
             if split != "train" or "train" in needed}
    tokenizer_file = None
    if tokenizer == "sentencepiece":
        tokenizer, tokenizer_file = cached_sentencepiece(files["train"], vocab_size)
    elif tokenizer == "char":
        tokenizer = CharTokenizer(sorted(set().union(*texts.values())))
    elif isinstance(tokenizer, str):
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    streams = {split: _encode_split(tokenizer, text) for split, text in texts.items()}
    return TextCorpus(name=name, train=streams.get("train") if need_train else None, val=streams["valid"],
                      test=streams.get("test"), tokenizer=tokenizer, source=folder, tokenizer_file=tokenizer_file)


def cached_sentencepiece(train_path: Path, vocab_size: int) -> tuple[SentencePieceTokenizer, Path]:
    """The SentencePiece tokenizer of a training file, trained once and cached.

    The model goes beside the data as `sp-unigram-<vocab_size>-<first 12 hex of the file's sha256>.model`
    with its frequency order in `<same name>.order.json`; where that folder cannot be written, under
    `<cache>/tokenizers/` instead (see `default_cache_dir`). Both places are searched before training.

    Args:
        train_path: the training text.
        vocab_size: pieces asked for.

    Returns:
        The tokenizer and the path of its `.model` file.
    """
    stem = f"sp-unigram-{vocab_size}-{sha256_of_file(train_path)[:12]}"
    folders = (train_path.parent, default_cache_dir() / _TOKENIZER_CACHE_SUBDIR)
    for folder in folders:
        model_path, order_path = folder / f"{stem}.model", folder / f"{stem}.order.json"
        if model_path.is_file() and order_path.is_file():
            order = json.loads(order_path.read_text())["order"]
            return SentencePieceTokenizer(model_path.read_bytes(), order), model_path
    tokenizer = train_sentencepiece(train_path, vocab_size)
    order_json = json.dumps({"order": tokenizer.order.tolist(), "train_file": train_path.name,
                             "vocab_size_asked": vocab_size, "vocab_size": tokenizer.vocab_size})
    try:
        return tokenizer, _write_tokenizer(folders[0], stem, tokenizer.model_proto, order_json)
    except OSError:
        return tokenizer, _write_tokenizer(folders[1], stem, tokenizer.model_proto, order_json)


def _write_tokenizer(folder: Path, stem: str, model_proto: bytes, order_json: str) -> Path:
    """Write `stem.model` then `stem.order.json` into `folder`, each atomically; the model's path."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / f"{stem}.model"
    _write_atomic(model_path, model_proto)
    _write_atomic(folder / f"{stem}.order.json", order_json.encode("utf-8"))
    return model_path


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _encode_split(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The ids of a whole split as `[N]` torch.long."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return torch.from_numpy(tokenizer.encode_array(text))
    return torch.from_numpy(np.asarray(tokenizer.encode(text), dtype=np.int64))


def _name_files(splits: list[str]) -> str:
    """'train.txt (or wiki.train.tokens) and valid.txt (or ...)'."""
    return " and ".join(f"{SPLIT_FILE_NAMES[s][0]} (or {SPLIT_FILE_NAMES[s][1]})" for s in splits)
