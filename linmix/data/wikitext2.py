"""WikiText-2 (tokenized, wikitext-2-v1) with a SentencePiece unigram vocabulary (spec/k_operators.md 4.3)."""

from __future__ import annotations

import os
from pathlib import Path

from linmix.data.char import DATA_DIR_ENV
from linmix.data.download import default_cache_dir
from linmix.data.text import SPLIT_FILE_NAMES, TextCorpus, find_split_files, load_text_folder
from linmix.data.tokenizers import Tokenizer

WIKITEXT2_VOCAB_SIZE = 8192
WIKITEXT2_SUBDIR = "wikitext-2"
WIKITEXT2_ORIGIN = (
    "the tokenized WikiText-2 of pytorch/examples (word_language_model/data/wikitext-2/{train,valid,test}.txt), "
    "the same text as wikitext-2-v1's wiki.{train,valid,test}.tokens"
)


def wikitext2_search_dirs(path: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for the WikiText-2 files, in order.

    Args:
        path: --data: when given, only `path` and `path/wikitext-2` are searched.

    Returns:
        `path`, `path/wikitext-2`; else `$LINMIX_DATA_DIR/wikitext-2` (where set) and the cache's
        `wikitext-2` folder (see `default_cache_dir`).
    """
    if path is not None:
        return [Path(path), Path(path) / WIKITEXT2_SUBDIR]
    data_dir = os.environ.get(DATA_DIR_ENV)
    env_dirs = [Path(data_dir) / WIKITEXT2_SUBDIR] if data_dir else []
    return [*env_dirs, default_cache_dir() / WIKITEXT2_SUBDIR]


def resolve_wikitext2_dir(path: str | os.PathLike | None = None, need_train: bool = True) -> Path:
    """The first searched folder holding WikiText-2's valid split, and its train split when needed.

    Args:
        path: --data (see `wikitext2_search_dirs`).
        need_train: whether the train split must be there too.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: no searched folder holds the files; the message names the files (both
            accepted names), the folders searched and where the files come from. There is no download.
    """
    needed = ("train", "valid") if need_train else ("valid",)
    searched = wikitext2_search_dirs(path)
    for folder in searched:
        if all(split in find_split_files(folder) for split in needed):
            return folder
    files = " and ".join(f"{SPLIT_FILE_NAMES[s][0]} (or {SPLIT_FILE_NAMES[s][1]})" for s in needed)
    env_hint = "" if path is not None or os.environ.get(DATA_DIR_ENV) else f" (${DATA_DIR_ENV} is not set)"
    partial = [f"{folder} holds only {', '.join(p.name for p in files_of.values())}"
               for folder in searched if (files_of := find_split_files(folder))]
    raise FileNotFoundError(
        f"WikiText-2 needs {files} in one folder; searched {', '.join(map(str, searched))}{env_hint}"
        f"{''.join(f'; {line}' for line in partial)}. "
        f"They are {WIKITEXT2_ORIGIN}; linmix cannot download them: put them in DIR and pass --data DIR, "
        f"or put them in {default_cache_dir() / WIKITEXT2_SUBDIR} or ${DATA_DIR_ENV}/{WIKITEXT2_SUBDIR}"
    )


def load_wikitext2(
    path: str | os.PathLike | None = None,
    vocab_size: int = WIKITEXT2_VOCAB_SIZE,
    tokenizer: Tokenizer | None = None,
) -> TextCorpus:
    """Load WikiText-2 as SentencePiece pieces, training (once, cached) the tokenizer on train only.

    Args:
        path: --data: a folder holding the files or a `wikitext-2` folder (see `wikitext2_search_dirs`).
        vocab_size: pieces asked of the tokenizer (8192 in the paper).
        tokenizer: a tokenizer to encode valid (and test) with, e.g. a checkpoint's; then train is not
            read and no tokenizer is trained.

    Returns:
        The corpus, named "wikitext2-sp<vocab_size>"; `token_counts` holds each split's pieces.

    Raises:
        FileNotFoundError: the files are missing (see `resolve_wikitext2_dir`).
    """
    folder = resolve_wikitext2_dir(path, need_train=tokenizer is None)
    return load_text_folder(folder, tokenizer or "sentencepiece", vocab_size,
                            name=f"wikitext2-sp{vocab_size}", need_train=tokenizer is None)
