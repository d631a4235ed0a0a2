"""The `linmix` command end to end on a tiny model: train, resume, eval, sample, presets, errors."""

import argparse
import json
import subprocess
import sys

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
    assert train(tmp_path / "run", "--max-steps", "60", "--warmup-steps", "10", "--lr", "1e-2",
                 "--eval-budget", "none") == 0
    out = capsys.readouterr().out
    assert "best val PPL" in out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the loss falls
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_ppl_full"] < evals[0]["val_ppl_full"]

    assert main(["eval", "--ckpt", str(tmp_path / "run" / "best.pt"), "--no-progress"]) == 0
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
        keep = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "eval_s")}
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


def test_set_reaches_mixer_fields(tmp_path, capsys):
    assert _parse_overrides(["mixer_kwargs.n_heads=4", "rank=4"]) == {"mixer_kwargs.n_heads": 4, "rank": 4}
    out = tmp_path / "gpt"
    assert main(["train", "--preset", "nanogpt-ts", "--set", "d_model=16", "--set", "n_layers=1", "--set",
                 "context_length=32", "--set", "mixer_kwargs.n_heads=4", "--max-steps", "2", "--warmup-steps", "1",
                 "--batch-size", "4", "--eval-interval", "2", "--eval-batch-size", "256", "--eval-random-iters", "1",
                 "--no-progress", "--out", str(out)]) == 0
    spec = load_checkpoint(out / "last.pt", map_location="cpu")["meta"]["model"]
    assert spec["config"]["mixer_kwargs"] == {"n_heads": 4, "bias": False, "dropout": 0.2}


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


def test_existing_run_needs_resume(tmp_path, capsys):
    assert train(tmp_path / "run", "--max-steps", "2", "--warmup-steps", "1") == 0
    assert train(tmp_path / "run", "--max-steps", "2", "--warmup-steps", "1") == 2
    assert "--resume" in capsys.readouterr().err


def _every_parser(parser):
    """The parser and its subcommands' parsers, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _every_parser(child)


def test_every_flag_has_help_that_states_its_default():
    """Each flag of each command says what it does and, unless it is a switch or required, its default."""
    missing = [
        f"{parser.prog} {action.option_strings[0]}: {action.help!r}"
        for parser in _every_parser(build_parser()) for action in parser._actions
        if action.option_strings and action.dest != "help"
        and not (action.help and (action.nargs == 0 or action.required or "default" in action.help))
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["sample"], ["sweep"], ["plot"], ["bench"],
                                     ["bench", "decode"], ["bench", "train"], ["presets"], ["synth"]])
def test_help_imports_no_torch(command):
    """`linmix ... --help` answers without importing torch (it takes seconds to import)."""
    code = ("import sys, contextlib, io\nfrom linmix.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: main({[*command, '--help']!r})\n    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_presets_show_their_training_recipes(capsys):
    assert main(["presets"]) == 0
    table = capsys.readouterr().out
    assert "steps" in table and "protocols" in table
    row = next(line for line in table.splitlines() if line.startswith("kops-ts-v2 "))
    assert "3500" in row and "full,random" in row and "810,189" in row


def test_plot_writes_beside_the_first_run_by_default(tmp_path, capsys):
    assert train(tmp_path / "run", "--max-steps", "2", "--warmup-steps", "1") == 0
    assert main(["plot", "--runs", str(tmp_path / "run")]) == 0
    written = capsys.readouterr().out.split()
    assert written and all(path.startswith(str(tmp_path / "run" / "figures")) for path in written[-len(written):]
                           if path.endswith(".png"))
