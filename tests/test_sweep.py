"""`linmix sweep` end to end on a tiny model: parallel runs, the summary, skipping finished runs,
resuming a run cut short by --stop-after, and reporting a failing run; the perplexity unit in the
summary on hand-written run summaries (unit stated, runs from before units, mixed units)."""

import json
import shutil

import numpy as np
import pytest

from _paths import SHARED_DATA_DIR
from linmix.cli import main
from linmix.sweep import aggregate_lines, summarize_sweep
from linmix.train import read_metrics

TINY = ["--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4", "--set", "context_length=32",
        "--batch-size", "8", "--max-steps", "12", "--warmup-steps", "2", "--eval-interval", "6",
        "--eval-batch-size", "256", "--eval-random-iters", "2"]
TIMING_FIELDS = ("tokens_per_s", "elapsed_s", "eval_s")


@pytest.fixture(autouse=True)
def run_environment(monkeypatch):
    """Inherited by the runs: the shared data, and one thread each, so that runs made alone and
    runs made in parallel sum floating-point numbers in the same order."""
    monkeypatch.setenv("LINMIX_DATA_DIR", str(SHARED_DATA_DIR))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(out, seeds, *extra):
    return main(["sweep", "--preset", "kops-ts-v2", "--seeds", seeds, "--out", str(out), *TINY, *extra])


def stable_records(run_dir):
    """The metrics log without the fields that measure time."""
    def keep(record):
        return {k: v for k, v in record.items() if k not in TIMING_FIELDS and not k.endswith("_time_s")}

    return [keep(record) for record in read_metrics(run_dir / "metrics.jsonl")]


def read_summary(sweep_dir):
    return json.loads((sweep_dir / "summary.json").read_text())


def fake_run(sweep_dir, seed, ppl, unit=None):
    """A finished run's summary.json as `linmix train` writes it; `unit=None` leaves out "ppl_unit",
    as versions before units did."""
    folder = sweep_dir / f"seed-{seed}"
    folder.mkdir(parents=True)
    summary = {"finished": True, "step": 12, "max_steps": 12, "params": 1000, "final_eval_step": 12,
               "best": {"full": {"loss": float(np.log(ppl)), "ppl": ppl, "step": 12}}, "final_val_ppl_full": ppl}
    if unit is not None:
        summary["ppl_unit"] = unit
    (folder / "summary.json").write_text(json.dumps(summary))


def test_sweep_summary_skip_and_resume(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert sweep(straight, "1,2", "--parallel", "2") == 0
    out = capsys.readouterr().out
    assert "seed 1: exit 0, best val PPL per char full" in out and "seed 2: exit 0" in out
    assert (straight / "seed-1" / "train.log").read_text().count("best val PPL") == 1
    summary = read_summary(straight)
    md = (straight / "summary.md").read_text()
    assert [row["seed"] for row in summary["runs"]] == [1, 2] and summary["unfinished"] == []
    assert summary["ppl_unit"] == "char" and [row["ppl_unit"] for row in summary["runs"]] == ["char", "char"]
    assert summary["params"] == summary["runs"][0]["params"] > 0
    for protocol in ("full", "random"):
        ppl = np.array([row["best"][protocol]["ppl"] for row in summary["runs"]])
        loss = np.array([row["best"][protocol]["loss"] for row in summary["runs"]])
        stats = summary["aggregate"][protocol]
        assert stats["n"] == 2
        assert stats["ppl_mean"] == pytest.approx(ppl.mean())
        assert stats["ppl_std"] == pytest.approx(ppl.std(ddof=1))
        assert (stats["ppl_min"], stats["ppl_max"]) == (ppl.min(), ppl.max())
        assert stats["loss_mean"] == pytest.approx(loss.mean())
    assert f"full-pass best val PPL per char {summary['aggregate']['full']['ppl_mean']:.2f} ±" in md
    assert "| best full PPL per char (step) |" in md and "| final random PPL per char |" in md
    assert f"({summary['params']:,} params)" in md

    logged = (straight / "seed-1" / "metrics.jsonl").read_text()
    assert sweep(straight, "1,2", "--parallel", "2") == 0
    out = capsys.readouterr().out
    assert "seed 1: skipped" in out and "seed 2: skipped" in out
    assert (straight / "seed-1" / "metrics.jsonl").read_text() == logged

    sliced = tmp_path / "sliced"
    assert sweep(sliced, "1", "--stop-after", "6") == 0
    assert "unfinished at step 6/12" in capsys.readouterr().out
    shutil.copytree(straight / "seed-2", sliced / "seed-2")
    assert main(["sweep", "--summarize-only", "--out", str(sliced)]) == 0
    summary = read_summary(sliced)
    assert summary["unfinished"] == ["seed-1"]
    assert summary["aggregate"]["full"]["n"] == 1 and summary["aggregate"]["full"]["ppl_std"] is None
    assert "Unfinished, excluded from the aggregate: seed-1" in (sliced / "summary.md").read_text()

    assert sweep(sliced, "1") == 0
    assert stable_records(sliced / "seed-1") == stable_records(straight / "seed-1")
    assert read_summary(sliced)["unfinished"] == []


def test_summary_names_the_unit(tmp_path):
    fake_run(tmp_path, 1, 20.0, "piece")
    fake_run(tmp_path, 2, 21.0, "piece")
    summary = summarize_sweep(tmp_path)
    assert summary["ppl_unit"] == "piece" and read_summary(tmp_path)["ppl_unit"] == "piece"
    assert aggregate_lines(summary) == [
        f"{tmp_path.name} (1,000 params): full-pass best val PPL per piece 20.50 ± 0.71 (n=2, min 20.00, max 21.00)"]
    md = (tmp_path / "summary.md").read_text()
    assert "| seed | finished | step | best full PPL per piece (step) | final full PPL per piece | params |" in md


def test_summary_of_runs_without_unit_is_worded_as_before(tmp_path):
    fake_run(tmp_path, 1, 20.0)
    fake_run(tmp_path, 2, 21.0)
    summary = summarize_sweep(tmp_path)
    assert summary["ppl_unit"] is None
    assert aggregate_lines(summary) == [
        f"{tmp_path.name} (1,000 params): full-pass best val PPL 20.50 ± 0.71 (n=2, min 20.00, max 21.00)"]
    md = (tmp_path / "summary.md").read_text()
    assert "| seed | finished | step | best full PPL (step) | final full PPL | params |" in md


@pytest.mark.parametrize("other", ["piece", None])
def test_runs_of_different_units_are_not_aggregated(tmp_path, other):
    fake_run(tmp_path, 1, 4.4, "char")
    fake_run(tmp_path, 2, 20.0, other)
    (tmp_path / "seed-3").mkdir()  # no summary yet: no unit to compare
    with pytest.raises(ValueError, match=f"different units.*char: seed-1; {other or 'no unit stated'}: seed-2"):
        summarize_sweep(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_failing_run_is_reported(tmp_path, capsys):
    code = sweep(tmp_path / "bad", "1,2", "--parallel", "2", "--context-length", "64")
    captured = capsys.readouterr()
    assert code == 1
    assert "seed 1: FAILED with exit code 2" in captured.out and "seed 2: FAILED" in captured.out
    assert "context_length 64 exceeds" in captured.out  # the log tail
    assert read_summary(tmp_path / "bad")["unfinished"] == ["seed-1", "seed-2"]


def test_sweep_usage_errors(tmp_path, capsys):
    assert main(["sweep", "--preset", "no-such-preset", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "--preset", "kops-ts-v2", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "--summarize-only", "--out", str(tmp_path / "empty")]) == 2
    assert "unknown preset" in capsys.readouterr().err
