"""Tests of linmix.train.checkpoint: the versioned, checksummed file format and how damaged files
are refused."""

import hashlib
import io
import json
import random
import re

import pytest
import torch

from linmix.errors import CheckpointError, LinmixError
from linmix.train import load_checkpoint, remove_stale_temporaries, save_checkpoint
from linmix.train.checkpoint import FORMAT_VERSION, MAGIC


def make_checkpoint(**model_overrides) -> dict:
    """A last.pt-like dict whose weights fill most of its ~70 KB."""
    torch.manual_seed(0)
    model = {"embed.weight": torch.randn(65, 128), "head.bias": torch.zeros(65)}
    model.update(model_overrides)
    return {"kind": "last", "model": model, "step": 7, "config": {"lr": 0.01}, "meta": {}}


def envelope(payload: bytes, **header_overrides) -> bytes:
    """A format-2 file around `payload`, its header fields replaceable."""
    header = {
        "version": FORMAT_VERSION,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    header.update(header_overrides)
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def header_end(data: bytes) -> int:
    return data.index(b"\n", len(MAGIC)) + 1


def overwrite_middle(data: bytes, size: int = 4096) -> bytes:
    middle = len(data) // 2
    noise = random.Random(0).randbytes(size)
    return data[:middle] + noise + data[middle + size :]


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


class Unsafe:
    """Not a type torch.load(weights_only=True) may build."""


NAN_BIAS = {"head.bias": torch.full((65,), torch.nan)}
VALID = envelope(torch_saved(make_checkpoint()))
LEGACY = torch_saved({**make_checkpoint(), "format_version": 1})  # as linmix wrote before

# name -> (the file's bytes made from a valid format-2 file, a phrase the message must hold)
DAMAGED = {
    "empty": (lambda d: b"", "is empty"),
    "cut in the magic line": (lambda d: d[:5], "cut short"),
    "cut in the header": (lambda d: d[: len(MAGIC) + 20], "cut short"),
    "cut after the header": (lambda d: d[: header_end(d)], "cut short"),
    "cut in the payload": (lambda d: d[: len(d) // 2], "cut short"),
    "cut by one byte": (lambda d: d[:-1], "cut short"),
    "random bytes": (lambda d: random.Random(1).randbytes(len(d)), "not a linmix checkpoint"),
    "text": (lambda d: b"hello, world\n", "not a linmix checkpoint"),
    "4 KB overwritten in the middle": (overwrite_middle, "corrupted"),
    "one byte flipped in the middle": (flip_middle_byte, "corrupted"),
    "bytes after the payload": (lambda d: d + b"\0" * 10, "damaged"),
    "header not JSON": (lambda d: MAGIC + b"{version: 2\n" + d[header_end(d) :], "damaged header"),
    "header checksum missing": (
        lambda d: envelope(d[header_end(d) :], sha256=None),
        "damaged header",
    ),
    "newer format version": (
        lambda d: envelope(d[header_end(d) :], version=FORMAT_VERSION + 1),
        "newer linmix",
    ),
    "non-finite weights": (
        lambda d: envelope(torch_saved(make_checkpoint(**NAN_BIAS))),
        "non-finite weights: model['head.bias']",
    ),
    "a key missing": (
        lambda d: envelope(torch_saved({"model": {}, "step": 1})),
        "lacks the key(s) config",
    ),
    "not a dict": (lambda d: envelope(torch_saved([1, 2, 3])), "not a checkpoint dict"),
    "an object that is not weights": (
        lambda d: envelope(torch_saved({**make_checkpoint(), "meta": Unsafe()})),
        "which linmix does not unpickle (Unsupported global: GLOBAL test_checkpoint.Unsafe",
    ),
    "legacy, cut short": (lambda d: LEGACY[: len(LEGACY) // 2], "cut short or damaged"),
    "legacy, cut to two bytes": (lambda d: LEGACY[:2], "cut short"),
    "legacy, 4 KB overwritten in the middle": (lambda d: overwrite_middle(LEGACY), "corrupted"),
    "legacy, one byte flipped in the middle": (lambda d: flip_middle_byte(LEGACY), "corrupted"),
    "legacy, non-finite weights": (
        lambda d: torch_saved(make_checkpoint(**{"embed.weight": torch.full((2, 2), torch.inf)})),
        "non-finite weights",
    ),
    "legacy, a key missing": (lambda d: torch_saved({"model": {}, "config": {}}), "lacks"),
}


def assert_refused(path, phrase: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and phrase in message
    assert "\n" not in message
    return caught.value


def test_a_checkpoint_round_trips_in_its_envelope(tmp_path):
    checkpoint = make_checkpoint()
    path = tmp_path / "last.pt"
    save_checkpoint(checkpoint, path)
    data = path.read_bytes()
    header = json.loads(data[len(MAGIC) : header_end(data)])
    payload = data[header_end(data) :]
    assert data.startswith(MAGIC) and header["version"] == FORMAT_VERSION == 2
    assert header["payload_bytes"] == len(payload)
    assert header["sha256"] == hashlib.sha256(payload).hexdigest()
    loaded = load_checkpoint(path)
    assert loaded.keys() == checkpoint.keys()
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["config"] == checkpoint["config"] and loaded["step"] == 7


def test_a_format_1_checkpoint_still_loads(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(LEGACY)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == 1
    assert torch.equal(loaded["model"]["embed.weight"], make_checkpoint()["model"]["embed.weight"])


@pytest.mark.parametrize("damage", DAMAGED, ids=str)
def test_a_damaged_file_is_refused_with_one_line_naming_it(tmp_path, damage):
    make_bytes, phrase = DAMAGED[damage]
    path = tmp_path / "last.pt"
    path.write_bytes(make_bytes(VALID))
    error = assert_refused(path, phrase)
    assert isinstance(error, LinmixError) and isinstance(error, ValueError)


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    assert_refused(tmp_path / "absent.pt", "does not exist")
    (tmp_path / "folder.pt").mkdir()
    assert_refused(tmp_path / "folder.pt", "is a folder")


@pytest.mark.parametrize(
    "checkpoint, phrase",
    [
        (make_checkpoint(**NAN_BIAS), "holds non-finite weights"),
        ({"model": {}, "step": 1}, "lacks the key(s) config"),
    ],
    ids=["non-finite weights", "a key missing"],
)
def test_saving_an_unusable_checkpoint_is_refused_and_keeps_the_old_file(
    tmp_path, checkpoint, phrase
):
    path = tmp_path / "last.pt"
    save_checkpoint(make_checkpoint(), path)
    before = path.read_bytes()
    expected = f"refusing to write checkpoint .*last.pt: it {re.escape(phrase)}"
    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint(checkpoint, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temporaries_of_named_files_are_removed(tmp_path):
    names = [".last.pt.x1y2.tmp", ".best.pt.abc.tmp", ".other.pt.abc.tmp", "last.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_stale_temporaries(tmp_path, ["last.pt", "best.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "last.pt"]
