"""One entry point for every corpus `linmix train` knows: `load_corpus(name, data_path, ...)`."""

from __future__ import annotations

import os
from pathlib import Path

from linmix.data.char import load_char_corpus
from linmix.data.text import TextCorpus, find_split_files, load_text_folder
from linmix.data.tokenizers import CharTokenizer, Tokenizer
from linmix.data.wikitext2 import WIKITEXT2_VOCAB_SIZE, load_wikitext2

TINY_SHAKESPEARE_CHAR = "tinyshakespeare-char"
WIKITEXT2_SP = "wikitext2-sp8192"
TEXT_FOLDER = "text"
CORPORA = (TINY_SHAKESPEARE_CHAR, WIKITEXT2_SP, TEXT_FOLDER)
DEFAULT_VOCAB_SIZE = WIKITEXT2_VOCAB_SIZE


def is_text_folder(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder holding a train split (train.txt or wiki.train.tokens)."""
    return path is not None and Path(path).is_dir() and "train" in find_split_files(Path(path))


def choose_corpus(
    preset_corpus: str, data_path: str | os.PathLike | None, tokenizer: str | None
) -> tuple[str, str]:
    """The corpus and tokenizer a preset trains with, given --data and --tokenizer.

    The preset's corpus, unless --data is a folder of train/valid text files that is not the
    preset's WikiText-2 (a character preset given such a folder trains on it), or --tokenizer asks
    for another tokenizer than the preset corpus's: then the general text-folder corpus.

    Args:
        preset_corpus: the preset's corpus name.
        data_path: --data, or None.
        tokenizer: --tokenizer ("char" or "sentencepiece"), or None for the preset corpus's own.

    Returns:
        (one of `CORPORA`, "char" or "sentencepiece"): the tokenizer is `tokenizer`, else the preset corpus's.

    Raises:
        ValueError: the text-folder corpus is chosen but `data_path` is no folder of text files.
    """
    own_tokenizer = "char" if preset_corpus == TINY_SHAKESPEARE_CHAR else "sentencepiece"
    tokenizer = tokenizer or own_tokenizer
    if tokenizer == own_tokenizer and not (preset_corpus == TINY_SHAKESPEARE_CHAR and is_text_folder(data_path)):
        return preset_corpus, tokenizer
    if not is_text_folder(data_path):
        raise ValueError(f"--tokenizer {tokenizer} trains on a text corpus: --data must be a folder holding "
                         "train.txt and valid.txt (optionally test.txt)")
    return TEXT_FOLDER, tokenizer


def load_corpus(
    name: str,
    data_path: str | os.PathLike | None = None,
    *,
    tokenizer: str | Tokenizer | None = None,
    vocab_size: int | None = None,
    need_train: bool = True,
) -> TextCorpus:
    """Load a corpus by name.

    Args:
        name: "tinyshakespeare-char" (Karpathy's file, 90/10 split, 65 characters), "wikitext2-sp8192"
            (spec/k_operators.md 4.3) or "text" (a folder of train/valid(/test) text files).
        data_path: --data: a file or folder (None: the corpus's search path; required for "text").
        tokenizer: "char" or "sentencepiece" for "text" (default sentencepiece), or a tokenizer to
            encode with as it is (e.g. a checkpoint's: nothing is trained; characters must match).
        vocab_size: pieces of a new SentencePiece tokenizer (default 8192).
        need_train: False skips the train split where a tokenizer is given (evaluation).

    Returns:
        The corpus.

    Raises:
        FileNotFoundError: the corpus files are missing (the message says which and where).
        ValueError: an unknown name or tokenizer, or a tokenizer that does not fit the corpus.
    """
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
    if name == TINY_SHAKESPEARE_CHAR:
        return _tiny_shakespeare(data_path, tokenizer)
    if name.startswith("wikitext2-sp"):
        if isinstance(tokenizer, str) and tokenizer != "sentencepiece":
            raise ValueError(f"{name} is tokenized by sentencepiece, not {tokenizer!r}")
        given = None if isinstance(tokenizer, str) else tokenizer
        return load_wikitext2(data_path, vocab_size, given)
    if name == TEXT_FOLDER:
        if data_path is None:
            raise ValueError("the text corpus needs --data: a folder holding train.txt and valid.txt")
        return load_text_folder(data_path, tokenizer or "sentencepiece", vocab_size, need_train=need_train)
    raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")


def _tiny_shakespeare(data_path, tokenizer: str | Tokenizer | None) -> TextCorpus:
    """Tiny Shakespeare as a TextCorpus (load_char_corpus's streams); a given tokenizer must have its characters."""
    if tokenizer not in (None, "char") and not isinstance(tokenizer, CharTokenizer):
        kind = getattr(tokenizer, "kind", tokenizer)
        raise ValueError(f"{TINY_SHAKESPEARE_CHAR} is tokenized by characters, not {kind!r}")
    corpus = load_char_corpus(data_path)
    if isinstance(tokenizer, CharTokenizer) and tokenizer.vocab != corpus.vocab:
        raise ValueError(f"the corpus at {corpus.source} has another vocabulary than the tokenizer")
    return TextCorpus(name=TINY_SHAKESPEARE_CHAR, train=corpus.train, val=corpus.val, test=None,
                      tokenizer=corpus.tokenizer, source=corpus.source)
