"""Tests of the tokenizers and the text-corpus layer: SentencePiece settings, determinism, the frequency
remap, meta round trips, WikiText-2 file search and its errors, the tokenizer cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _paths import SHARED_DATA_DIR
from _text_corpus import write_text_corpus

from linmix.data import (
    SENTENCEPIECE_SETTINGS,
    CharTokenizer,
    SentencePieceTokenizer,
    choose_corpus,
    frequency_order,
    load_char_corpus,
    load_corpus,
    load_text_folder,
    load_wikitext2,
    sha256_of_file,
    tokenizer_from_meta,
    train_sentencepiece,
)
from linmix.data import text as text_module

VOCAB = 200


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No LINMIX_DATA_DIR and an empty cache under tmp_path."""
    monkeypatch.delenv("LINMIX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tokenizer(corpus_dir) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus_dir / "train.txt", VOCAB)


# ---- SentencePiece training -----------------------------------------------------------------------


def test_settings_follow_the_spec(tokenizer):
    assert SENTENCEPIECE_SETTINGS == dict(
        model_type="unigram", character_coverage=1.0, split_digits=False, byte_fallback=False,
        hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
    )
    sp = tokenizer.processor
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, -1, -1, -1)
    assert 2 < tokenizer.vocab_size <= VOCAB  # hard_vocab_limit=false: a small text gives fewer pieces
    assert not any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert any(sum(char.isdigit() for char in piece) > 1 for piece in pieces)  # digits are not split
    assert (tokenizer.kind, tokenizer.unit) == ("sentencepiece", "piece")


def test_training_is_deterministic(corpus_dir, tokenizer):
    again = train_sentencepiece(corpus_dir / "train.txt", VOCAB)
    assert again.model_proto == tokenizer.model_proto
    assert again.order.tolist() == tokenizer.order.tolist()


def test_lines_longer_than_sentencepieces_default_limit_are_kept(tmp_path):
    long_line = " ".join(["alpha beta gamma delta"] * 400)  # 9,199 bytes > 4,192
    (tmp_path / "train.txt").write_text(long_line + "\n", encoding="utf-8")
    tokenizer = train_sentencepiece(tmp_path / "train.txt", 40)
    assert tokenizer.decode(tokenizer.encode("gamma alpha")) == "gamma alpha"


def test_ids_are_sorted_by_descending_train_frequency(corpus_dir, tokenizer):
    train_text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    counts = np.bincount(tokenizer.encode_array(train_text), minlength=tokenizer.vocab_size)
    assert (np.diff(counts) <= 0).all()
    sp_ids = tokenizer.order
    for i in range(tokenizer.vocab_size - 1):  # ties keep SentencePiece's order
        if counts[i] == counts[i + 1]:
            assert sp_ids[i] < sp_ids[i + 1]
    assert counts[0] > 0 and counts[-1] >= 0


def test_unk_is_ranked_by_its_train_count(tokenizer):
    """SentencePiece's trainer skips the literal `<unk>` (its unknown piece's spelling), so characters seen
    only there (here `<` and `>`) encode as the unknown piece, which then ranks by its count like any other."""
    unk = int(np.flatnonzero(tokenizer.order == 0)[0])
    assert tokenizer.encode("<unk>").count(unk) == 2
    assert 0 < unk < tokenizer.vocab_size - 1


def test_frequency_order_breaks_ties_by_id():
    assert frequency_order(np.array([3, 1, 3, 1, 2, 0]), 5) == [1, 3, 0, 2, 4]


def test_whole_split_encodes_as_one_string(corpus_dir, tokenizer):
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    whole = tokenizer.processor.encode(text)  # the spec's reading: one string
    assert tokenizer.encode_array(text).tolist() == [int(i) for i in np.argsort(tokenizer.order)[whole]]


def test_encode_decode_round_trip(tokenizer):
    line = "the kaloren was in 1999 @-@ 2001 ."
    ids = tokenizer.encode(line)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == line
    assert tokenizer.decode(torch.tensor(ids)) == line
    unknown = tokenizer.encode("é")  # a character unseen in train becomes <unk>
    assert [int(tokenizer.order[i]) for i in unknown if tokenizer.order[i] == 0]


# ---- meta round trips and errors ------------------------------------------------------------------


def test_meta_round_trip_through_json(tokenizer):
    meta = json.loads(json.dumps({"preset": "p", "tokenizer": tokenizer.to_meta()}))
    for rebuilt in (tokenizer_from_meta(meta), tokenizer_from_meta(meta["tokenizer"])):
        assert isinstance(rebuilt, SentencePieceTokenizer)
        assert rebuilt.order.tolist() == tokenizer.order.tolist()
        assert rebuilt.encode("the sta of kalo") == tokenizer.encode("the sta of kalo")
    chars = CharTokenizer(list("abc\n"))
    assert tokenizer_from_meta(json.loads(json.dumps(chars.to_meta()))).vocab == chars.vocab


def test_legacy_checkpoint_meta_is_a_char_tokenizer():
    rebuilt = tokenizer_from_meta({"preset": "kops-ts-v2", "model": {}, "vocab": ["\n", "a", "b"]})
    assert (rebuilt.kind, rebuilt.unit, rebuilt.vocab_size) == ("char", "char", 3)
    assert rebuilt.decode(rebuilt.encode("ab\nb")) == "ab\nb"


@pytest.mark.parametrize("meta, fragment", [
    ({"preset": "p"}, "no tokenizer"),
    ({"kind": "bpe"}, "'bpe'"),
    ({"kind": "sentencepiece", "model_proto": "not base64!", "order": [0]}, "damaged sentencepiece"),
    ({"kind": "char", "vocab": ["ab"]}, "damaged char"),
])
def test_bad_meta_is_named(meta, fragment):
    with pytest.raises(ValueError, match=fragment):
        tokenizer_from_meta(meta)


def test_errors_name_the_argument(corpus_dir, tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(corpus_dir / "train.txt", 1)
    with pytest.raises(ValueError, match="token id 9999"):
        tokenizer.decode([9999])
    with pytest.raises(ValueError, match="order"):
        SentencePieceTokenizer(tokenizer.model_proto, [0, 0, 1])
    with pytest.raises(ValueError, match="'€'"):
        CharTokenizer(list("ab")).encode("a€")
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        load_text_folder(corpus_dir, "bpe")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("penn-treebank", corpus_dir)


# ---- corpora --------------------------------------------------------------------------------------


def test_tiny_shakespeare_keeps_its_numbers():
    corpus = load_corpus("tinyshakespeare-char", SHARED_DATA_DIR)
    chars = load_char_corpus(SHARED_DATA_DIR)
    assert (len(corpus.train), len(corpus.val), corpus.vocab_size, corpus.unit) == (1_003_854, 111_540, 65, "char")
    assert torch.equal(corpus.train, chars.train) and corpus.tokenizer.vocab == chars.vocab


def test_text_folder_corpus_records_token_counts(corpus_dir, tokenizer):
    corpus = load_text_folder(corpus_dir, "sentencepiece", VOCAB)
    assert corpus.tokenizer.model_proto == tokenizer.model_proto
    assert corpus.token_counts == {"train": len(corpus.train), "valid": len(corpus.val), "test": len(corpus.test)}
    assert corpus.to_meta()["tokens"] == corpus.token_counts and corpus.unit == "piece"
    chars = load_text_folder(corpus_dir, "char")
    assert chars.tokenizer.vocab == sorted(set(chars.tokenizer.vocab)) and "é" in chars.tokenizer.vocab


def test_choose_corpus_routes_text_folders(corpus_dir, tmp_path):
    assert choose_corpus("tinyshakespeare-char", None, None) == ("tinyshakespeare-char", "char")
    assert choose_corpus("tinyshakespeare-char", corpus_dir, None) == ("text", "char")
    assert choose_corpus("tinyshakespeare-char", corpus_dir, "sentencepiece") == ("text", "sentencepiece")
    assert choose_corpus("wikitext2-sp8192", corpus_dir, None) == ("wikitext2-sp8192", "sentencepiece")
    assert choose_corpus("wikitext2-sp8192", corpus_dir, "char") == ("text", "char")
    with pytest.raises(ValueError, match="--data must be a folder holding train.txt"):
        choose_corpus("tinyshakespeare-char", tmp_path, "sentencepiece")


# ---- WikiText-2: search, errors, cache ------------------------------------------------------------


def test_missing_wikitext2_names_the_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_wikitext2()
    message = str(error.value)
    for fragment in ("train.txt (or wiki.train.tokens)", "valid.txt (or wiki.valid.tokens)", "pytorch/examples",
                     str(tmp_path / "cache" / "linmix" / "wikitext-2"), "--data DIR", "$LINMIX_DATA_DIR is not set"):
        assert fragment in message


def test_missing_train_split_is_named(tmp_path):
    (tmp_path / "wt2").mkdir()
    (tmp_path / "wt2" / "valid.txt").write_text(" a b c .\n")
    with pytest.raises(FileNotFoundError, match=r"wt2 holds only valid.txt") as error:
        load_wikitext2(tmp_path / "wt2")
    assert "train.txt (or wiki.train.tokens)" in str(error.value)


def test_wikitext2_search_order_and_file_names(tmp_path, monkeypatch):
    names = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
    write_text_corpus(tmp_path / "data" / "wikitext-2", train_lines=80, names=names)
    assert load_wikitext2(tmp_path / "data", VOCAB).source == tmp_path / "data" / "wikitext-2"  # --data DIR
    monkeypatch.setenv("LINMIX_DATA_DIR", str(tmp_path / "data"))
    assert load_wikitext2(vocab_size=VOCAB).source == tmp_path / "data" / "wikitext-2"  # $LINMIX_DATA_DIR
    monkeypatch.delenv("LINMIX_DATA_DIR")
    cached = write_text_corpus(tmp_path / "cache" / "linmix" / "wikitext-2", train_lines=80)
    corpus = load_wikitext2(vocab_size=VOCAB)  # the cache
    assert (corpus.source, corpus.name) == (cached, f"wikitext2-sp{VOCAB}")


def test_tokenizer_is_cached_beside_the_data_and_reused(tmp_path, monkeypatch):
    folder = write_text_corpus(tmp_path / "wt2", train_lines=80)
    first = load_wikitext2(folder, VOCAB)
    stem = f"sp-unigram-{VOCAB}-{sha256_of_file(folder / 'train.txt')[:12]}"
    assert first.tokenizer_file == folder / f"{stem}.model"
    assert (folder / f"{stem}.order.json").is_file()

    def no_training(*args):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(text_module, "train_sentencepiece", no_training)
    second = load_wikitext2(folder, VOCAB)
    assert torch.equal(second.train, first.train) and torch.equal(second.val, first.val)


def test_read_only_data_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    folder = write_text_corpus(tmp_path / "wt2", train_lines=80)
    write_atomic = text_module._write_atomic

    def read_only_data(path, data):  # chmod does not stop root, so the folder refuses writes here
        if path.parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        write_atomic(path, data)

    monkeypatch.setattr(text_module, "_write_atomic", read_only_data)
    corpus = load_wikitext2(folder, VOCAB)
    assert corpus.tokenizer_file.parent == tmp_path / "cache" / "linmix" / "tokenizers"
    assert not list(folder.glob("sp-unigram-*"))
    monkeypatch.setattr(text_module, "train_sentencepiece", None)  # found in the cache: not trained again
    assert load_wikitext2(folder, VOCAB).tokenizer_file == corpus.tokenizer_file


def test_evaluation_reencodes_with_a_given_tokenizer_without_train(tmp_path, tokenizer):
    folder = write_text_corpus(tmp_path / "wt2", train_lines=80)
    (folder / "train.txt").unlink()
    corpus = load_wikitext2(folder, tokenizer=tokenizer)
    assert corpus.train is None and corpus.tokenizer is tokenizer
    assert corpus.val.tolist() == tokenizer.encode((folder / "valid.txt").read_text(encoding="utf-8"))
