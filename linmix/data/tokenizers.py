"""Tokenizers: characters, or SentencePiece unigram pieces with ids sorted by train frequency.

Both kinds share one interface (`kind`, `unit`, `vocab_size`, `encode`, `decode`, `to_meta`), and
`tokenizer_from_meta` rebuilds either from its `to_meta()` dict or from a checkpoint's meta.

A SentencePiece tokenizer maps linmix id i to SentencePiece id `order[i]`, where `order` lists the
pieces by descending count in the training text, ties by SentencePiece id (spec/k_operators.md 3.9),
so that an adaptive softmax's shortlist holds the most frequent pieces. The unknown piece `<unk>`
(SentencePiece id 0) is placed by its train count like any other piece. That count need not be 0 even at
character_coverage 1.0: the trainer skips the literal text `<unk>` (its unknown piece's spelling, which
WikiText-2 holds as a marker), so characters seen only inside it encode as `<unk>`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

# spec/k_operators.md 4.3; bos/eos/pad -1 disables them.
SENTENCEPIECE_SETTINGS = dict(
    model_type="unigram", character_coverage=1.0, split_digits=False, byte_fallback=False,
    hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
)
# A fixed thread count keeps training deterministic across machines (each thread sums its slice of
# the sentences, so the float sums depend on the number of slices).
SENTENCEPIECE_THREADS = 8
# SentencePiece's default longest sentence, in bytes; longer lines raise the limit instead of being dropped.
_DEFAULT_MAX_SENTENCE_BYTES = 4192
# Lines encoded per SentencePiece call when encoding a whole split.
_LINES_PER_CHUNK = 4096


class CharTokenizer:
    """One token per character, id i standing for `vocab[i]`.

    Args:
        vocab: the distinct characters, in id order.
    """

    kind = "char"
    unit = "char"

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        self._index_of = {char: i for i, char in enumerate(self.vocab)}
        if len(self._index_of) != len(self.vocab) or any(len(char) != 1 for char in self.vocab):
            raise ValueError("vocab must be distinct single characters")

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`.

        Args:
            text: a string made of vocabulary characters.

        Returns:
            One id per character.

        Raises:
            ValueError: `text` holds characters outside the vocabulary (they are named).
        """
        unknown = sorted(set(text) - self._index_of.keys())
        if unknown:
            raise ValueError("characters not in the vocabulary: " + ", ".join(repr(char) for char in unknown))
        return [self._index_of[char] for char in text]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The text that token ids stand for.

        Args:
            ids: token ids (ints, or a 1-D integer tensor).

        Returns:
            The decoded string.

        Raises:
            ValueError: an id is outside `[0, vocab_size)`.
        """
        return "".join(self.vocab[i] for i in _checked_ids(ids, self.vocab_size))

    def to_meta(self) -> dict:
        """A JSON-ready description that `tokenizer_from_meta` rebuilds this tokenizer from."""
        return {"kind": self.kind, "unit": self.unit, "vocab": list(self.vocab)}


class SentencePieceTokenizer:
    """SentencePiece pieces, linmix id i standing for SentencePiece id `order[i]`.

    Args:
        model_proto: the serialized SentencePiece model (the bytes of a `.model` file).
        order: a permutation of the SentencePiece ids, most frequent piece first.
    """

    kind = "sentencepiece"
    unit = "piece"

    def __init__(self, model_proto: bytes, order: Sequence[int]):
        import sentencepiece

        self.model_proto = bytes(model_proto)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        self.order = np.asarray(order, dtype=np.int64)  # [V]: linmix id -> SentencePiece id
        size = self.processor.get_piece_size()
        if sorted(self.order.tolist()) != list(range(size)):
            raise ValueError(f"order must be a permutation of the model's {size} SentencePiece ids")
        self._linmix_id_of = np.empty(size, dtype=np.int64)  # [V]: SentencePiece id -> linmix id
        self._linmix_id_of[self.order] = np.arange(size)

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return len(self.order)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a character the model has not seen becomes `<unk>`.

        Args:
            text: any string.

        Returns:
            One id per piece.
        """
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array, for whole corpus splits.

        The text is encoded a few thousand lines at a time, which gives the ids of the whole text
        as one string (no piece holds whitespace, so none crosses a line break) at bounded memory.

        Args:
            text: any string.

        Returns:
            `[N]` int64 ids.
        """
        lines = text.split("\n")
        chunks = ["\n".join(lines[i:i + _LINES_PER_CHUNK]) for i in range(0, len(lines), _LINES_PER_CHUNK)]
        piece_ids = [np.asarray(ids, dtype=np.int64) for ids in self.processor.encode(chunks)]
        return self._linmix_id_of[np.concatenate(piece_ids)] if piece_ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The text that token ids stand for (`<unk>` decodes to " ⁇ ").

        Args:
            ids: token ids (ints, or a 1-D integer tensor).

        Returns:
            The decoded string.

        Raises:
            ValueError: an id is outside `[0, vocab_size)`.
        """
        return self.processor.decode([int(self.order[i]) for i in _checked_ids(ids, self.vocab_size)])

    def to_meta(self) -> dict:
        """A JSON-ready description (the model as base64 text, the order as ints) that
        `tokenizer_from_meta` rebuilds this tokenizer from."""
        return {"kind": self.kind, "unit": self.unit,
                "model_proto": base64.b64encode(self.model_proto).decode("ascii"), "order": self.order.tolist()}


Tokenizer = CharTokenizer | SentencePieceTokenizer


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild a tokenizer.

    Args:
        meta: a tokenizer's `to_meta()` dict, or a checkpoint's meta holding one under "tokenizer",
            or a checkpoint meta of an earlier version holding only its characters under "vocab".

    Returns:
        The tokenizer.

    Raises:
        ValueError: `meta` describes no tokenizer, or a damaged one.
    """
    if isinstance(meta.get("tokenizer"), dict):
        meta = meta["tokenizer"]
    kind = meta.get("kind", "char" if "vocab" in meta else None)
    try:
        if kind == "char":
            return CharTokenizer(meta["vocab"])
        if kind == "sentencepiece":
            return SentencePieceTokenizer(base64.b64decode(meta["model_proto"], validate=True), meta["order"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"meta describes a damaged {kind} tokenizer ({error})") from None
    raise ValueError(f"meta describes no tokenizer (kind {kind!r}; expected char or sentencepiece)")


def train_sentencepiece(train_text_path: str | Path, vocab_size: int) -> SentencePieceTokenizer:
    """Train a SentencePiece unigram model on one text file and sort its ids by frequency there.

    Settings of spec/k_operators.md 4.3 (`SENTENCEPIECE_SETTINGS`): character coverage 1.0, no digit
    splitting, no byte fallback, `hard_vocab_limit=false` (a small text may give fewer pieces than
    `vocab_size`), `<unk>` at id 0, no BOS/EOS/PAD. Every non-blank line is one training sentence, all
    of them used (input_sentence_size 0), and the longest-sentence limit is raised to the longest
    line, so that no line of a large file is dropped. Training runs on `SENTENCEPIECE_THREADS`
    threads and is deterministic.

    Args:
        train_text_path: the training text (UTF-8).
        vocab_size: the pieces asked for, >= 2.

    Returns:
        The tokenizer; its `order` sorts the pieces by their count in the whole file encoded as
        one string, descending, ties by SentencePiece id.

    Raises:
        ValueError: `vocab_size` is below 2, or the file holds no text.
    """
    import sentencepiece

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    text = Path(train_text_path).read_text(encoding="utf-8")
    sentences = [line for line in text.split("\n") if line.strip()]
    if not sentences:
        raise ValueError(f"{train_text_path} holds no text to train a tokenizer on")
    longest = max(len(line.encode("utf-8")) for line in sentences)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, **SENTENCEPIECE_SETTINGS,
        input_sentence_size=0, max_sentence_length=max(_DEFAULT_MAX_SENTENCE_BYTES, longest + 1),
        num_threads=SENTENCEPIECE_THREADS, minloglevel=2,
    )
    model_proto = model.getvalue()
    unsorted = SentencePieceTokenizer(model_proto, range(_piece_count(model_proto)))
    order = frequency_order(unsorted.encode_array(text), unsorted.vocab_size)
    return SentencePieceTokenizer(model_proto, order)


def frequency_order(ids: np.ndarray, vocab_size: int) -> list[int]:
    """Ids sorted by descending count in `ids`, ties by id.

    Args:
        ids: `[N]` token ids in `[0, vocab_size)`.
        vocab_size: number of ids.

    Returns:
        A permutation of `range(vocab_size)`, the most frequent id first.
    """
    counts = np.bincount(ids, minlength=vocab_size)  # [V]
    return np.lexsort((np.arange(vocab_size), -counts)).tolist()


def _piece_count(model_proto: bytes) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=model_proto).get_piece_size()


def _checked_ids(ids: Iterable[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """`ids` as ints, each checked to lie in `[0, vocab_size)`."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = [int(token) for token in ids]
    for token in ids:
        if not 0 <= token < vocab_size:
            raise ValueError(f"token id {token} is outside [0, {vocab_size})")
    return ids
