"""Corpora, tokenizers, downloads and batch samplers."""

from linmix.data.batches import RandomWindowSampler, count_eval_windows, iter_eval_windows
from linmix.data.char import (
    DATA_DIR_ENV,
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_URL,
    CharCorpus,
    load_char_corpus,
    resolve_char_corpus_path,
)
from linmix.data.corpora import CORPORA, DEFAULT_VOCAB_SIZE, choose_corpus, is_text_folder, load_corpus
from linmix.data.download import ChecksumError, default_cache_dir, download_file, sha256_of_file
from linmix.data.text import SPLIT_FILE_NAMES, TextCorpus, cached_sentencepiece, find_split_files, load_text_folder
from linmix.data.tokenizers import (
    SENTENCEPIECE_SETTINGS,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    frequency_order,
    tokenizer_from_meta,
    train_sentencepiece,
)
from linmix.data.wikitext2 import (
    WIKITEXT2_VOCAB_SIZE,
    load_wikitext2,
    resolve_wikitext2_dir,
    wikitext2_search_dirs,
)

__all__ = [
    "CORPORA",
    "DATA_DIR_ENV",
    "DEFAULT_VOCAB_SIZE",
    "SENTENCEPIECE_SETTINGS",
    "SPLIT_FILE_NAMES",
    "TINY_SHAKESPEARE_SHA256",
    "TINY_SHAKESPEARE_URL",
    "WIKITEXT2_VOCAB_SIZE",
    "CharCorpus",
    "CharTokenizer",
    "ChecksumError",
    "RandomWindowSampler",
    "SentencePieceTokenizer",
    "TextCorpus",
    "Tokenizer",
    "cached_sentencepiece",
    "choose_corpus",
    "count_eval_windows",
    "default_cache_dir",
    "download_file",
    "find_split_files",
    "frequency_order",
    "is_text_folder",
    "iter_eval_windows",
    "load_char_corpus",
    "load_corpus",
    "load_text_folder",
    "load_wikitext2",
    "resolve_char_corpus_path",
    "resolve_wikitext2_dir",
    "sha256_of_file",
    "tokenizer_from_meta",
    "train_sentencepiece",
    "wikitext2_search_dirs",
]
