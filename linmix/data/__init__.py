"""Corpora, downloads and batch samplers."""

from linmix.data.batches import RandomWindowSampler, count_eval_windows, iter_eval_windows
from linmix.data.char import (
    DATA_DIR_ENV,
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_URL,
    CharCorpus,
    load_char_corpus,
    resolve_char_corpus_path,
)
from linmix.data.download import ChecksumError, default_cache_dir, download_file, sha256_of_file

__all__ = [
    "DATA_DIR_ENV",
    "TINY_SHAKESPEARE_SHA256",
    "TINY_SHAKESPEARE_URL",
    "CharCorpus",
    "ChecksumError",
    "RandomWindowSampler",
    "count_eval_windows",
    "default_cache_dir",
    "download_file",
    "iter_eval_windows",
    "load_char_corpus",
    "resolve_char_corpus_path",
    "sha256_of_file",
]
