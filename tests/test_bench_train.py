"""`linmix bench train` on the CPU with tiny models and a few steps: the report, the ratio to the
baseline, the run order and the usage errors. Throughput values are never asserted, only that they
were measured."""

import json

import pytest

from linmix.bench.train import measure_training, plan_train
from linmix.cli import main

TINY = ["--set", "d_model=16", "--set", "rank=4", "--set", "n_k2=1"]  # fields every K-Stack preset has
CPU_RUN = ["--context-length", "16", "--batch-sizes", "2,3", "--steps", "2", "--warmup", "1", "--device", "cpu",
           "--no-progress", *TINY]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON report of kops-ts-linear-long against kops-ts-v2 at T = 16, batches 2 and 3."""
    path = tmp_path_factory.mktemp("train") / "train.json"
    assert main(["bench", "train", "--presets", "kops-ts-linear-long", "--baseline", "kops-ts-v2", *CPU_RUN,
                 "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_report_has_a_row_per_model_and_batch(report):
    rows = [(row["preset"], row["batch_size"]) for row in report["rows"]]
    assert rows == [("kops-ts-v2", 2), ("kops-ts-linear-long", 2), ("kops-ts-v2", 3), ("kops-ts-linear-long", 3)]
    assert all(row["context_length"] == 16 and row["tokens_per_s"] > 0 for row in report["rows"])
    assert report["settings"]["overrides"] == {"d_model": 16, "rank": 4, "n_k2": 1}


def test_ratios_are_against_the_baseline_at_the_same_batch(report):
    speed = {(row["preset"], row["batch_size"]): row["tokens_per_s"] for row in report["rows"]}
    for row in report["rows"]:
        expected = row["tokens_per_s"] / speed[("kops-ts-v2", row["batch_size"])]
        assert row["x_vs_baseline"] == pytest.approx(expected)
    assert {row["role"] for row in report["rows"] if row["preset"] == "kops-ts-v2"} == {"baseline"}


def test_the_context_length_becomes_the_models_own(report):
    """kops-ts-v2's dense Kbase is [T, T]: at T = 16 it holds 16^2 weights, not 256^2."""
    params = {row["preset"]: row["params"] for row in report["rows"]}
    assert params["kops-ts-v2"] < 16 * 16 + params["kops-ts-linear-long"] + 1000


def test_baseline_runs_first_and_once():
    plan = plan_train(["kops-ts-v2", "kops-ts-linear"], baseline="kops-ts-v2", context_length=8, batch_sizes=[1],
                      device="cpu")
    assert plan.models == ["kops-ts-v2", "kops-ts-linear"]


def test_profiled_steps_add_their_costs_to_each_row(capsys):
    assert main(["bench", "train", "--presets", "kops-ts-linear", "--baseline", "none", "--context-length", "16",
                 "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--no-progress",
                 "--profile-steps", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "GPU ms*" in out and "over 2 more steps under torch.profiler" in out
    plan = plan_train(["kops-ts-linear"], baseline=None, context_length=16, batch_sizes=[2], steps=1, warmup=1,
                      device="cpu", overrides={"d_model": 16, "rank": 4, "n_k2": 1}, profile_steps=2)
    row = measure_training("kops-ts-linear", plan, 2)
    assert row["profiled_steps"] == 2 and row["wall_ms_per_step"] > 0
    assert row["launches_per_step"] == 0 and "gpu_ms_per_step" not in row  # the CPU launches no kernels
    with pytest.raises(ValueError, match="--profile-steps"):
        plan_train(["kops-ts-linear"], context_length=16, batch_sizes=[2], profile_steps=-1)


def test_the_compile_mode_reaches_the_plan():
    plan = plan_train(["kops-ts-linear"], baseline=None, context_length=8, batch_sizes=[1], compile=True,
                      compile_mode="reduce-overhead", device="cpu")
    assert plan.compile and plan.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="--compile-mode must be one of"):
        plan_train(["kops-ts-linear"], context_length=8, batch_sizes=[1], compile=True, compile_mode="fast")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--presets", "nope"], "--presets: unknown preset"),
        (["--baseline", "nope"], "--baseline: unknown preset"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--warmup", "0"], "--warmup must be a positive integer"),
        (["--batch-sizes", "0"], "--batch-sizes must be a positive integer"),
        (["--set", "no_such_field=1"], "--set: "),
        (["--context-length", "0"], "--context-length must be a positive integer"),
    ],
)
def test_usage_errors_exit_2(flags, message, capsys):
    base = {"--context-length": "16", "--batch-sizes": "2"}
    args = [item for key, value in base.items() if key not in flags for item in (key, value)]
    assert main(["bench", "train", "--device", "cpu", "--no-progress", *args, *flags]) == 2
    assert message in capsys.readouterr().err
