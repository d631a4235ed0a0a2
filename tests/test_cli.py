"""The `linmix` command end to end on a tiny model: train, resume, eval, sample, presets, errors."""

import json

import pytest

from _paths import SHARED_DATA_DIR
from linmix.cli import _compile_fields, _parse_overrides, _train_config, build_parser, main
from linmix.train import load_checkpoint, read_metrics, save_checkpoint

TINY = ["--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4", "--set", "context_length=32"]


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))


def train(out, *extra):
    args = ["train", "--preset", "kops-ts-v2", *TINY, "--batch-size", "8", "--eval-interval", "20",
            "--eval-batch-size", "256", "--eval-random-iters", "2", "--log-interval", "5",
            "--no-progress", "--out", str(out), *extra]
    return main(args)


def test_train_eval_sample_end_to_end(tmp_path, capsys):
    assert train(tmp_path / "run", "--max-steps", "60", "--warmup-steps", "10", "--lr", "1e-2") == 0
    out = capsys.readouterr().out
    assert "best val PPL" in out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the loss falls
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_ppl_full"] < evals[0]["val_ppl_full"]

    assert main(["eval", "--ckpt", str(tmp_path / "run" / "best.pt"), "--batch-size", "256",
                 "--random-iters", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result["val_ppl_full"] == pytest.approx(summary["best"]["full"]["ppl"], rel=1e-6)

    assert main(["sample", "--ckpt", str(tmp_path / "run" / "best.pt"), "--prompt", "ROMEO:", "--tokens", "40"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= 40


def test_cli_resume_matches_uninterrupted(tmp_path):
    common = ["--max-steps", "30", "--warmup-steps", "5", "--eval-interval", "10"]
    assert train(tmp_path / "full", *common) == 0
    assert train(tmp_path / "split", *common, "--stop-after", "13") == 0
    assert train(tmp_path / "split", *common, "--resume") == 0

    def stable(path):
        keep = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "eval_time_s")}
        return [keep(r) for r in read_metrics(path / "metrics.jsonl")]

    assert stable(tmp_path / "split") == stable(tmp_path / "full")


def _flatten_k2_fields(config: dict) -> dict:
    """A KStackConfig dict as the version before `mixer`/`mixer_kwargs` wrote it: K2 fields at the top."""
    flat = {key: value for key, value in config.items() if key not in ("mixer", "mixer_kwargs")}
    return {**flat, **config["mixer_kwargs"]}


def test_resume_a_run_of_the_previous_config_format(tmp_path):
    """A run stopped by the version with K2 fields at the top of the K-Stack config resumes exactly."""
    common = ["--max-steps", "20", "--warmup-steps", "5", "--eval-interval", "10"]
    assert train(tmp_path / "full", *common) == 0
    assert train(tmp_path / "old", *common, "--stop-after", "7") == 0
    last = tmp_path / "old" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["model_config"] = _flatten_k2_fields(checkpoint["model_config"])
    checkpoint["meta"]["model"]["config"] = _flatten_k2_fields(checkpoint["meta"]["model"]["config"])
    assert "rank" in checkpoint["model_config"] and "mixer_kwargs" not in checkpoint["model_config"]
    save_checkpoint(checkpoint, last)
    assert train(tmp_path / "old", *common, "--resume") == 0
    final = [r["loss"] for r in read_metrics(tmp_path / "old" / "metrics.jsonl") if r.get("kind") == "train"]
    expected = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r.get("kind") == "train"]
    assert final == expected


def test_presets_lists_counts(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["name"]: r["params"] for r in json.loads(capsys.readouterr().out)}
    assert rows["kops-ts-v2"] == 810_189 and rows["nanogpt-ts"] == 10_745_088


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "kops-ts-v9"], "unknown preset"),
    (["train", "--preset", "kops-ts-v2", "--set", "rank"], "KEY=VALUE"),
    (["train", "--preset", "kops-ts-v2", "--set", "colour=red"], "no model fields"),
    (["train", "--preset", "kops-ts-v2", "--batch-size", "0"], "batch_size"),
    (["train", "--preset", "kops-wt2-v2"], "wikitext2"),
    (["sample", "--ckpt", "/nonexistent/best.pt"], "does not exist"),
])
def test_usage_errors_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "train" else [])]) == 2
    assert message in capsys.readouterr().err


def test_set_reaches_mixer_fields(tmp_path, capsys):
    assert _parse_overrides(["mixer_kwargs.n_heads=4", "rank=4"]) == {"mixer_kwargs.n_heads": 4, "rank": 4}
    out = tmp_path / "gpt"
    assert main(["train", "--preset", "nanogpt-ts", "--set", "d_model=16", "--set", "n_layers=1", "--set",
                 "context_length=32", "--set", "mixer_kwargs.n_heads=4", "--max-steps", "2", "--warmup-steps", "1",
                 "--batch-size", "4", "--eval-interval", "2", "--eval-batch-size", "256", "--eval-random-iters", "1",
                 "--no-progress", "--out", str(out)]) == 0
    spec = load_checkpoint(out / "last.pt", map_location="cpu")["meta"]["model"]
    assert spec["config"]["mixer_kwargs"] == {"n_heads": 4, "bias": False, "dropout": 0.2}


def test_bad_mixer_field_fails_before_training(tmp_path, capsys):
    assert main(["train", "--preset", "kops-ts-v2", "--set", "mixer_kwargs.rank=-4", "--out", str(tmp_path / "r")]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "kops-ts-v2", "--max-stepz", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("flags, fields", [
    ([], dict(compile=False)),
    (["--compile"], dict(compile=True)),
    (["--compile-mode", "reduce-overhead"], dict(compile=True, compile_mode="reduce-overhead")),
])
def test_compile_mode_implies_compile(flags, fields):
    assert _compile_fields(build_parser().parse_args(["train", "--preset", "kops-ts-v2", *flags])) == fields


def test_linear_presets_compile_as_cuda_graphs_unless_told_otherwise(tmp_path):
    """Their recipe names "reduce-overhead": their step is many small kernels, which CUDA graphs replay."""
    from linmix.models import get_preset

    def config(preset, *flags):
        return _train_config(build_parser().parse_args(["train", "--preset", preset, *flags]), get_preset(preset),
                             tmp_path)

    assert config("kops-ts-linear-long", "--compile").compile_mode == "reduce-overhead"
    assert config("kops-ts-linear", "--compile", "--compile-mode", "default").compile_mode == "default"
    assert config("kops-ts-v2", "--compile").compile_mode == "default"


def test_unknown_compile_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "kops-ts-v2", "--compile-mode", "fast"])
    assert exit_info.value.code == 2
    assert "reduce-overhead" in capsys.readouterr().err


def test_existing_run_needs_resume(tmp_path, capsys):
    assert train(tmp_path / "run", "--max-steps", "2", "--warmup-steps", "1") == 0
    assert train(tmp_path / "run", "--max-steps", "2", "--warmup-steps", "1") == 2
    assert "--resume" in capsys.readouterr().err
