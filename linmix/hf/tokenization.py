"""A transformers tokenizer that wraps a linmix tokenizer (characters or SentencePiece pieces).

The folder holds the linmix tokenizer's `to_meta()` dict as one JSON file; encoding and decoding
are the linmix tokenizer's, so ids equal those the model was trained on.
"""

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizer

from linmix.data.tokenizers import CharTokenizer, tokenizer_from_meta

TOKENIZER_FILE = "linmix_tokenizer.json"


class LinmixTokenizer(PreTrainedTokenizer):
    """A linmix tokenizer behind transformers' tokenizer interface. It adds no special tokens.

    Tokens are the linmix tokenizer's units: characters, or SentencePiece pieces.

    Args:
        meta_file: a JSON file holding a linmix tokenizer's `to_meta()` dict (what from_pretrained passes).
        meta: the dict itself, or a checkpoint's meta holding one (instead of `meta_file`).
        kwargs: transformers' tokenizer options.
    """

    vocab_files_names = {"meta_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, meta_file: str | None = None, meta: dict | None = None, **kwargs):
        if (meta_file is None) == (meta is None):
            raise ValueError("LinmixTokenizer takes one of meta_file and meta")
        if meta is None:
            meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
        self.linmix_tokenizer = tokenizer_from_meta(meta)
        self._tokens = _token_strings(self.linmix_tokenizer)  # id -> token
        self._ids = {token: i for i, token in enumerate(self._tokens)}
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self.linmix_tokenizer.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Token -> id."""
        return dict(self._ids)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._tokens[i] for i in self.linmix_tokenizer.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text of `tokens`, decoded by the linmix tokenizer."""
        return self.linmix_tokenizer.decode([self._ids[token] for token in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the linmix tokenizer's meta as JSON.

        Args:
            save_directory: an existing folder.
            filename_prefix: put before the file name with a dash.

        Returns:
            The path of the file written.
        """
        name = f"{filename_prefix}-{TOKENIZER_FILE}" if filename_prefix else TOKENIZER_FILE
        path = os.path.join(save_directory, name)
        Path(path).write_text(json.dumps(self.linmix_tokenizer.to_meta()), encoding="utf-8")
        return (path,)


def _token_strings(tokenizer) -> list[str]:
    """The token string of every id: its character, or its SentencePiece piece."""
    if isinstance(tokenizer, CharTokenizer):
        return list(tokenizer.vocab)
    return [tokenizer.processor.id_to_piece(int(piece_id)) for piece_id in tokenizer.order]
