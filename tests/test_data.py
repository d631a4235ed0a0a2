"""Tests of linmix.data: Tiny Shakespeare loading, file resolution, downloads, batch samplers."""

import hashlib
from pathlib import Path

import pytest
import torch
from _paths import SHARED_DATA_DIR, TINY_SHAKESPEARE

from linmix.data import (
    TINY_SHAKESPEARE_SHA256,
    ChecksumError,
    RandomWindowSampler,
    count_eval_windows,
    default_cache_dir,
    download_file,
    iter_eval_windows,
    load_char_corpus,
    resolve_char_corpus_path,
    sha256_of_file,
)
from linmix.data import char as char_module


@pytest.fixture(scope="module")
def corpus():
    return load_char_corpus(SHARED_DATA_DIR)


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No LINMIX_DATA_DIR, an empty cache under tmp_path, and downloads that cannot succeed."""
    monkeypatch.delenv("LINMIX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(char_module, "TINY_SHAKESPEARE_URL", (tmp_path / "absent.txt").as_uri())
    return tmp_path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- Tiny Shakespeare ---------------------------------------------------------------------------


def test_tiny_shakespeare_vocab_and_nanogpt_split(corpus):
    assert corpus.vocab_size == 65
    assert corpus.vocab == sorted(set(TINY_SHAKESPEARE.read_text(encoding="utf-8")))
    assert len(corpus.train) == 1_003_854
    assert len(corpus.val) == 111_540
    assert corpus.train.dtype == torch.long and corpus.val.dtype == torch.long
    assert corpus.source == TINY_SHAKESPEARE
    assert corpus.decode(corpus.train[:14].tolist()) == "First Citizen:"


def test_encode_decode_round_trip_covers_the_whole_file(corpus):
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    assert corpus.decode(corpus.train) + corpus.decode(corpus.val) == text
    prompt = "ROMEO:\nO, she doth teach the torches to burn bright!"
    assert corpus.decode(corpus.encode(prompt)) == prompt
    assert corpus.encode("\n !")[0] == 0  # newline sorts first


def test_encode_unknown_characters_names_them(corpus):
    with pytest.raises(ValueError, match=r"'é'.*'€'"):
        corpus.encode("café costs 5€")


def test_decode_rejects_ids_outside_the_vocabulary(corpus):
    with pytest.raises(ValueError, match="65"):
        corpus.decode([0, 65])


def test_val_has_435_eval_windows_of_256(corpus):
    batches = list(iter_eval_windows(corpus.val, context_length=256, batch_size=64))
    assert [len(x) for x, _ in batches] == [64] * 6 + [51]
    assert count_eval_windows(len(corpus.val), 256) == 435
    assert sum(y.numel() for _, y in batches) == 111_360
    x_last, y_last = batches[-1]
    start = 434 * 256
    assert torch.equal(x_last[-1], corpus.val[start : start + 256])
    assert torch.equal(y_last[-1], corpus.val[start + 1 : start + 257])


# ---- file resolution ----------------------------------------------------------------------------


def test_explicit_path_beats_env_and_cache(isolated_env, monkeypatch):
    explicit = _write_text(isolated_env / "explicit" / "input.txt", "explicit")
    env_file = _write_text(isolated_env / "env" / "tinyshakespeare" / "input.txt", "env")
    cache_file = _write_text(
        isolated_env / "cache" / "linmix" / "tinyshakespeare" / "input.txt", "cached"
    )
    monkeypatch.setenv("LINMIX_DATA_DIR", str(isolated_env / "env"))

    assert resolve_char_corpus_path(explicit) == explicit
    assert resolve_char_corpus_path(str(explicit.parent)) == explicit
    assert resolve_char_corpus_path() == env_file
    monkeypatch.delenv("LINMIX_DATA_DIR")
    assert resolve_char_corpus_path() == cache_file
    assert load_char_corpus().vocab == sorted(set("cached"))


def test_folder_with_a_tinyshakespeare_subfolder(isolated_env):
    nested = _write_text(isolated_env / "data" / "tinyshakespeare" / "input.txt", "nested")
    assert resolve_char_corpus_path(isolated_env / "data") == nested


def test_env_dir_prefers_the_tinyshakespeare_subfolder(isolated_env, monkeypatch):
    flat = _write_text(isolated_env / "env" / "input.txt", "flat")
    monkeypatch.setenv("LINMIX_DATA_DIR", str(isolated_env / "env"))
    assert resolve_char_corpus_path() == flat
    nested = _write_text(isolated_env / "env" / "tinyshakespeare" / "input.txt", "nested")
    assert resolve_char_corpus_path() == nested


def test_env_dir_without_the_file_falls_back_to_the_cache(isolated_env, monkeypatch):
    cache_file = _write_text(
        isolated_env / "cache" / "linmix" / "tinyshakespeare" / "input.txt", "c"
    )
    monkeypatch.setenv("LINMIX_DATA_DIR", str(isolated_env / "empty"))
    assert resolve_char_corpus_path() == cache_file


def test_missing_explicit_path_is_named(isolated_env):
    missing = isolated_env / "nowhere" / "input.txt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_char_corpus(missing)
    (isolated_env / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        load_char_corpus(isolated_env / "empty_dir")


def test_offline_without_a_file_says_where_to_put_it(isolated_env, monkeypatch):
    monkeypatch.setenv("LINMIX_DATA_DIR", str(isolated_env / "env"))
    with pytest.raises(FileNotFoundError) as error:
        load_char_corpus()
    message = str(error.value)
    assert "LINMIX_DATA_DIR" in message and "--data" in message
    assert str(isolated_env / "env" / "tinyshakespeare" / "input.txt") in message
    assert str(isolated_env / "cache" / "linmix" / "tinyshakespeare" / "input.txt") in message
    assert not list((isolated_env / "cache").rglob("*.part"))


def test_download_into_the_cache_when_nothing_is_found(isolated_env, monkeypatch):
    monkeypatch.setattr(char_module, "TINY_SHAKESPEARE_URL", TINY_SHAKESPEARE.as_uri())
    loaded = load_char_corpus()
    cached = isolated_env / "cache" / "linmix" / "tinyshakespeare" / "input.txt"
    assert loaded.source == cached
    assert sha256_of_file(cached) == TINY_SHAKESPEARE_SHA256
    assert (len(loaded.train), len(loaded.val), loaded.vocab_size) == (1_003_854, 111_540, 65)


def test_cache_dir_defaults_to_home_dot_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "linmix"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "linmix"


# ---- download -----------------------------------------------------------------------------------


def test_download_file_checks_sha256(tmp_path):
    source = _write_text(tmp_path / "source.txt", "some bytes\n" * 1000)
    right = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "copy.txt"
    assert download_file(source.as_uri(), dest, right) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.txt"]


def test_download_file_with_a_wrong_sha256_keeps_nothing(tmp_path):
    source = _write_text(tmp_path / "source.txt", "some bytes\n")
    dest = tmp_path / "out" / "copy.txt"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_file(source.as_uri(), dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_download_file_leaves_an_existing_file_alone_on_failure(tmp_path):
    source = _write_text(tmp_path / "source.txt", "new")
    dest = _write_text(tmp_path / "copy.txt", "old")
    with pytest.raises(ChecksumError):
        download_file(source.as_uri(), dest, "0" * 64)
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "source.txt"]


# ---- batches ------------------------------------------------------------------------------------


def test_random_windows_are_shifted_slices_of_the_stream():
    tokens = torch.arange(50)
    sampler = RandomWindowSampler(
        tokens, batch_size=8, context_length=6, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(20):
        x, y = sampler.sample()
        assert x.shape == y.shape == (8, 6) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # the stream is arange: targets are the next tokens
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
        assert x.min() >= 0 and y.max() <= 49


def test_random_offsets_reach_both_ends_of_the_stream():
    tokens = torch.arange(9)  # context 6: offsets 0, 1, 2
    sampler = RandomWindowSampler(
        tokens, batch_size=64, context_length=6, generator=torch.Generator().manual_seed(1)
    )
    x, _ = sampler.sample()
    assert set(x[:, 0].tolist()) == {0, 1, 2}


def test_sampler_state_restores_the_same_batches(corpus):
    sampler = RandomWindowSampler(corpus.train, 4, 32, torch.Generator().manual_seed(7))
    sampler.sample()
    state = sampler.state_dict()
    first = [sampler.sample() for _ in range(3)]
    sampler.load_state_dict(state)
    again = [sampler.sample() for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = RandomWindowSampler(corpus.train, 4, 32, torch.Generator().manual_seed(8))
    assert not torch.equal(other.sample()[0], first[0][0])


def test_sampler_keeps_its_stream_on_the_requested_device(corpus):
    """Moving the stream (here to an int64 copy on the CPU) changes no batch; the offsets stay on the generator."""
    plain = RandomWindowSampler(corpus.train.int(), 4, 32, torch.Generator().manual_seed(3))
    placed = RandomWindowSampler(corpus.train.int(), 4, 32, torch.Generator().manual_seed(3), device="cpu")
    assert placed.tokens.dtype == torch.long
    for _ in range(3):
        (x1, y1), (x2, y2) = plain.sample(), placed.sample()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sampler_cuts_the_same_windows_on_the_device(corpus):
    on_cpu = RandomWindowSampler(corpus.train, 8, 64, torch.Generator().manual_seed(5))
    on_gpu = RandomWindowSampler(corpus.train, 8, 64, torch.Generator().manual_seed(5), device="cuda")
    for _ in range(3):
        (x1, y1), (x2, y2) = on_cpu.sample(), on_gpu.sample()
        assert x2.is_cuda and y2.is_cuda
        assert torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())


def test_sampler_rejects_bad_streams():
    with pytest.raises(ValueError, match="context_length"):
        RandomWindowSampler(torch.arange(6), 2, 6, torch.Generator())
    with pytest.raises(TypeError, match="dtype"):
        RandomWindowSampler(torch.rand(100), 2, 6, torch.Generator())
    with pytest.raises(ValueError, match="1-D"):
        RandomWindowSampler(torch.zeros(4, 25, dtype=torch.long), 2, 6, torch.Generator())


def test_eval_windows_cover_the_stream_without_overlap():
    batches = list(iter_eval_windows(torch.arange(10), context_length=3, batch_size=2))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [2, 1]
    assert xs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert ys.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert count_eval_windows(9, 3) == 2  # window 2 would need target 9
