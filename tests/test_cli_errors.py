"""Every user error of the `linmix` command is one line on stderr and exit code 2, never a traceback.

One table: each case is a command line (with placeholders for a tiny trained run, its checkpoints and
their damaged copies), the exit code and a fragment the one line must hold. A new command adds its
rows here.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from _paths import SHARED_DATA_DIR
from linmix.cli import main

TINY = ["--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4", "--set", "context_length=32",
        "--set", "decay_backend=chunk"]
TRAIN = ["train", "--preset", "kops-ts-v2", *TINY, "--batch-size", "4", "--eval-batch-size", "64",
         "--eval-random-iters", "1", "--no-progress"]


def _damage(good: Path, folder: Path) -> dict[str, Path]:
    """Copies of a good checkpoint, each damaged one way, by name."""
    data = good.read_bytes()
    middle = len(data) // 2
    damaged = {
        "empty": b"",
        "cut_in_half": data[:middle],
        "cut_by_one_byte": data[:-1],
        "random_bytes": os.urandom(len(data)),
        "text": b"these are not the weights you are looking for\n",
        "overwritten_4kb": data[:middle - 2048] + bytes(4096) + data[middle + 2048:],
    }
    paths = {}
    for name, content in damaged.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Placeholders of the table: a finished tiny run, its best.pt, damaged copies, a run to resume."""
    folder = tmp_path_factory.mktemp("cli_errors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))
        assert main([*TRAIN, "--max-steps", "2", "--warmup-steps", "1", "--out", str(folder / "run")]) == 0
    places = {"RUN": folder / "run", "CKPT": folder / "run" / "best.pt", "TMP": folder,
              "A_FILE": folder / "run" / "metrics.jsonl"}
    for name, path in _damage(folder / "run" / "best.pt", folder).items():
        places[name.upper()] = path
        resume = folder / f"resume_{name}"
        shutil.copytree(folder / "run", resume)
        shutil.copy(path, resume / "last.pt")
        places[f"RESUME_{name.upper()}"] = resume
    return {name: str(path) for name, path in places.items()}


def _train(*flags):
    return [*TRAIN, "--max-steps", "2", "--warmup-steps", "1", *flags]


DAMAGE = ["EMPTY", "CUT_IN_HALF", "CUT_BY_ONE_BYTE", "RANDOM_BYTES", "TEXT", "OVERWRITTEN_4KB"]
CASES = [
    # train: names, values and files
    ("unknown_preset", ["train", "--preset", "kops-ts-v9"], "unknown preset"),
    ("set_without_value", _train("--set", "rank"), "KEY=VALUE"),
    ("set_unknown_field", _train("--set", "colour=red"), "colour"),
    ("set_bad_backend", _train("--set", "decay_backend=bogus", "--out", "{TMP}/bogus_backend"), "decay_backend"),
    ("set_negative_rank", _train("--set", "rank=-4", "--out", "{TMP}/negative_rank"), "rank must be >= 1"),
    ("set_mixer_kwargs_rank", _train("--set", "mixer_kwargs.rank=-4", "--out", "{TMP}/r2"), "rank must be >= 1"),
    ("batch_size_zero", _train("--batch-size", "0"), "--batch-size"),
    ("max_steps_negative", _train("--max-steps", "-3"), "--max-steps"),
    ("lr_not_a_number", _train("--lr", "fast"), "--lr"),
    ("eval_budget_zero", _train("--eval-budget", "0"), "--eval-budget"),
    ("bad_protocol", _train("--eval-protocols", "bogus", "--out", "{TMP}/p"), "eval_protocols"),
    ("bad_compile_mode", _train("--compile-mode", "fast", "--out", "{TMP}/c"), "reduce-overhead"),
    ("unknown_flag", _train("--max-stepz", "3"), "unrecognized arguments"),
    ("device_bogus", _train("--device", "bogus", "--out", "{TMP}/d"), "--device"),
    ("data_missing", _train("--data", "/no/such/corpus", "--out", "{TMP}/m"), "/no/such/corpus"),
    ("data_folder_empty", _train("--data", "{TMP}", "--out", "{TMP}/m2"), "input.txt"),
    ("out_is_a_file", _train("--out", "{A_FILE}"), "metrics.jsonl"),
    ("out_not_writable", _train("--out", "/proc/linmix_run"), "/proc/linmix_run"),
    ("run_exists", _train("--out", "{RUN}"), "--resume"),
    ("wikitext_preset", ["train", "--preset", "kops-wt2-v2", "--data", "{TMP}"],
     "WikiText-2 needs train.txt (or wiki.train.tokens) and valid.txt (or wiki.valid.tokens)"),
    ("tokenizer_without_text_folder", _train("--tokenizer", "sentencepiece", "--out", "{TMP}/t"),
     "--data must be a folder holding train.txt"),
    ("vocab_size_with_char", _train("--vocab-size", "64", "--out", "{TMP}/v"), "--vocab-size"),
    ("vocab_size_one", _train("--vocab-size", "1"), "--vocab-size"),
    *[(f"resume_{d.lower()}", _train("--resume", "--out", f"{{RESUME_{d}}}"), "last.pt") for d in DAMAGE],
    # eval
    *[(f"eval_{d.lower()}", ["eval", "--ckpt", f"{{{d}}}"], f"{d.lower()}.pt") for d in DAMAGE],
    ("eval_missing_ckpt", ["eval", "--ckpt", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    ("eval_folder_as_ckpt", ["eval", "--ckpt", "{RUN}"], "{RUN}"),
    ("eval_batch_size_zero", ["eval", "--ckpt", "{CKPT}", "--batch-size", "0"], "--batch-size"),
    ("eval_bad_protocols", ["eval", "--ckpt", "{CKPT}", "--protocols", "bogus"], "--protocols"),
    ("eval_random_iters_zero", ["eval", "--ckpt", "{CKPT}", "--random-iters", "0"], "--random-iters"),
    ("eval_device_bogus", ["eval", "--ckpt", "{CKPT}", "--device", "bogus"], "--device"),
    ("eval_data_missing", ["eval", "--ckpt", "{CKPT}", "--data", "/no/such/corpus"], "/no/such/corpus"),
    # sample
    *[(f"sample_{d.lower()}", ["sample", "--ckpt", f"{{{d}}}"], f"{d.lower()}.pt") for d in DAMAGE],
    ("sample_missing_ckpt", ["sample", "--ckpt", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    ("sample_negative_tokens", ["sample", "--ckpt", "{CKPT}", "--tokens", "-3"], "--tokens"),
    ("sample_negative_temperature", ["sample", "--ckpt", "{CKPT}", "--temperature", "-1"], "--temperature"),
    ("sample_top_k_zero", ["sample", "--ckpt", "{CKPT}", "--top-k", "0"], "--top-k"),
    ("sample_unknown_characters", ["sample", "--ckpt", "{CKPT}", "--prompt", "ROMEO€"], "--prompt"),
    ("sample_device_bogus", ["sample", "--ckpt", "{CKPT}", "--device", "cuda:x"], "--device"),
    # sweep, plot, bench
    ("sweep_parallel_zero", ["sweep", "--preset", "kops-ts-v2", "--seeds", "1", "--out", "{TMP}/s",
                             "--parallel", "0"], "--parallel"),
    ("sweep_without_seeds", ["sweep", "--preset", "kops-ts-v2", "--out", "{TMP}/s"], "--seeds"),
    ("sweep_summary_of_nothing", ["sweep", "--summarize-only", "--out", "{TMP}/nothing"], "nothing"),
    ("plot_missing_runs", ["plot", "--runs", "/no/such/run"], "/no/such/run"),
    ("bench_unknown_op", ["bench", "--op", "bogus", "--device", "cpu"], "bogus"),
    ("bench_without_op", ["bench", "--device", "cpu"], "--op"),
    ("bench_decode_unknown_preset", ["bench", "decode", "--presets", "bogus", "--device", "cpu"], "bogus"),
    ("bench_solver_stride_beyond_seq_len", ["bench", "solver", "--seq-len", "16", "--stride", "32", "--device", "cpu"],
     "--stride"),
    ("bench_solver_ridge_zero", ["bench", "solver", "--ridge", "0", "--device", "cpu"], "--ridge"),
    ("bench_solver_ridge_nan", ["bench", "solver", "--ridge", "nan", "--device", "cpu"], "--ridge"),
    ("bench_solver_iters_zero", ["bench", "solver", "--iters", "0"], "--iters"),
    ("bench_solver_head_dim_text", ["bench", "solver", "--head-dim", "big"], "--head-dim"),
    ("bench_solver_dtype_bf16", ["bench", "solver", "--dtype", "bf16"], "--dtype"),
    ("bench_solver_device_bogus", ["bench", "solver", "--device", "tpu"], "--device"),
    ("synth_unknown_task", ["synth", "--task", "sorting", "--out", "{TMP}/synth"], "sorting"),
    ("synth_unknown_mixer", ["synth", "--task", "mqar", "--mixers", "lstm", "--out", "{TMP}/synth"], "lstm"),
    ("synth_bad_cell", ["synth", "--task", "mqar", "--cells", "64:x", "--out", "{TMP}/synth"], "64:x"),
    ("synth_parallel_zero", ["synth", "--task", "mqar", "--parallel", "0", "--out", "{TMP}/synth"], "--parallel"),
    ("no_command", [], "command"),
]
if not torch.cuda.is_available():
    CASES += [("train_cuda_without_gpu", _train("--device", "cuda", "--out", "{TMP}/g"), "no CUDA device"),
              ("eval_cuda_without_gpu", ["eval", "--ckpt", "{CKPT}", "--device", "cuda"], "no CUDA device"),
              ("sample_cuda_without_gpu", ["sample", "--ckpt", "{CKPT}", "--device", "cuda"], "no CUDA device"),
              ("bench_solver_cuda_without_gpu", ["bench", "solver", "--device", "cuda"], "no CUDA device")]


@pytest.mark.parametrize("argv, fragment", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_user_error_is_one_line_and_exit_2(argv, fragment, files, capsys):
    argv = [arg.format(**files) for arg in argv]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("linmix") and "error:" in lines[0]
    assert fragment.format(**files) in lines[0]


def test_missing_data_without_network_is_one_line(files, monkeypatch, tmp_path, capsys):
    """No --data, no $LINMIX_DATA_DIR, an empty cache and a download that fails: one line naming the way out."""
    monkeypatch.delenv("LINMIX_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("linmix.data.char.TINY_SHAKESPEARE_URL", "file:///no/such/input.txt")
    assert main(_train("--out", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "LINMIX_DATA_DIR" in err and "--data" in err
    assert not (tmp_path / "run").exists()


def test_a_rejected_run_leaves_nothing_behind(files):
    """The bad model field is found before the run folder or its metrics file is created."""
    for name in ("bogus_backend", "negative_rank", "r2", "p", "c", "d", "m", "m2"):
        assert not (Path(files["TMP"]) / name).exists(), name
