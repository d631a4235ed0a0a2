"""`linmix train/eval/sample` on text corpora: the WikiText-2 subword pipeline end to end on a text the
test writes (a tiny SentencePiece model, kops-wt2-v2 shrunk), and the general text folder with a delta-rule preset."""

import json

import pytest
from _text_corpus import write_text_corpus

from linmix.cli import main
from linmix.train import load_checkpoint

# kops-wt2-v2 shrunk: the adaptive head's cutoffs must stay below the tiny tokenizer's pieces.
TINY_WT2 = ["--set", "d_model=16", "--set", "embed_dim=8", "--set", "n_k2=1", "--set", "rank=4",
            "--set", "context_length=32", "--set", "adaptive_cutoffs=[16,64]"]
FEW_STEPS = ["--max-steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--eval-interval", "2",
             "--eval-batch-size", "16", "--eval-random-iters", "1", "--eval-budget", "none", "--no-progress"]
VOCAB = ["--vocab-size", "200"]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LINMIX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def data_dir(tmp_path):
    """A `--data DIR` holding wikitext-2/{train,valid,test}.txt."""
    write_text_corpus(tmp_path / "data" / "wikitext-2")
    return tmp_path / "data"


def test_wikitext2_pipeline_end_to_end(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "kops-wt2-v2", "--data", str(data_dir), *VOCAB, *TINY_WT2, *FEW_STEPS,
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "corpus wikitext2-sp200" in out and "best val PPL per piece" in out
    assert len(list((data_dir / "wikitext-2").glob("sp-unigram-200-*.model"))) == 1  # cached beside the data

    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["ppl_unit"] == "piece"
    assert meta["model"]["config"]["vocab_size"] == len(meta["tokenizer"]["order"]) <= 200
    assert set(meta["corpus"]["tokens"]) == {"train", "valid", "test"}

    (data_dir / "wikitext-2" / "train.txt").unlink()  # evaluation re-encodes valid with the checkpoint's tokenizer
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["ppl_unit"] == "piece" and result["val_tokens"] == meta["corpus"]["tokens"]["valid"]
    assert result["val_ppl_full"] == pytest.approx(summary["best"]["full"]["ppl"], rel=1e-5)
    assert summary["ppl_unit"] == "piece"  # the Trainer's token_unit
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--split", "test", "--protocols", "full",
                 "--no-progress"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["split"] == "test" and test["test_tokens"] == meta["corpus"]["tokens"]["test"]
    assert test["test_ppl_full"] > 1 and "val_ppl_full" not in test

    assert main(["sample", "--ckpt", str(run / "best.pt"), "--prompt", "the kaloren café", "--tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the kaloren  ⁇ ")  # c and é are in no train piece: <unk>, decoded " ⁇ "


def test_cutoffs_beyond_the_tokenizer_are_one_line(data_dir, capsys):
    code = main(["train", "--preset", "kops-wt2-v2", "--data", str(data_dir), *VOCAB, *FEW_STEPS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cutoffs [1024, 4096] must be < the tokenizer's" in err and "--set adaptive_cutoffs" in err


def test_any_preset_trains_on_a_text_folder(tmp_path, capsys):
    folder = write_text_corpus(tmp_path / "text", train_lines=200)
    run = tmp_path / "run"
    tiny = ["--set", "d_model=16", "--set", "n_layers=1", "--set", "n_heads=1", "--set", "context_length=32"]
    assert main(["train", "--preset", "gdn-ts", "--data", str(folder), "--tokenizer", "sentencepiece", *VOCAB,
                 *tiny, *FEW_STEPS, "--out", str(run)]) == 0
    assert "corpus text" in capsys.readouterr().out
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["corpus"]["name"] == "text" and meta["tokenizer"]["kind"] == "sentencepiece"
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--protocols", "full", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl_unit"] == "piece"

    chars = tmp_path / "chars"  # a character preset on a text folder: characters by default
    assert main(["train", "--preset", "gdn-ts", "--data", str(folder), *tiny, *FEW_STEPS, "--out", str(chars)]) == 0
    assert "best val PPL per char" in capsys.readouterr().out
    assert load_checkpoint(chars / "best.pt")["meta"]["vocab"] == sorted(set("".join(
        (folder / name).read_text(encoding="utf-8") for name in ("train.txt", "valid.txt", "test.txt"))))
    assert main(["sample", "--ckpt", str(chars / "best.pt"), "--prompt", "the", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_test_split_of_a_corpus_without_one_is_one_line(tmp_path, capsys, monkeypatch):
    from _paths import SHARED_DATA_DIR

    monkeypatch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))
    run = tmp_path / "run"
    tiny = ["--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4", "--set", "context_length=32"]
    assert main(["train", "--preset", "kops-ts-v2", *tiny, *FEW_STEPS, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--split", "test", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--split test: tinyshakespeare-char" in err and "has no test split" in err
