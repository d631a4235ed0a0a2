"""`linmix plot` on tiny real runs: every figure a run has data for is written as a valid PNG,
and a run without learned-dynamics diagnostics (nanoGPT) only yields the learning curves; the
learning curves' y label names the perplexity unit when every drawn run states the same one."""

import json

import matplotlib.image
import pytest

from _paths import SHARED_DATA_DIR
from linmix.cli import main
from linmix.diagnostics.curves import learning_curves_figure
from linmix.diagnostics.runs import load_group

TINY = ["--set", "d_model=16", "--set", "n_k2=2", "--set", "rank=4", "--set", "context_length=32",
        "--batch-size", "8", "--max-steps", "6", "--warmup-steps", "2", "--eval-interval", "3",
        "--eval-batch-size", "64", "--eval-random-iters", "2", "--eval-protocols", "random",
        "--no-progress", "--data", str(SHARED_DATA_DIR)]
GROUP_FIGURES = ("gamma_spectrum", "gamma_trajectory", "kbase_gate_share", "kbase_structure", "eta_refinement")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep of kops-ts-v1 (per-layer Kbase, refinement), single kops-ts-v2 (shared Kbase) and
    no-Kbase runs, and a nanoGPT-like metrics log without diagnostics."""
    root = tmp_path_factory.mktemp("runs")
    for preset, folder, seed in [("kops-ts-v1", "v1/seed-1", 1), ("kops-ts-v1", "v1/seed-2", 2),
                                 ("kops-ts-v2", "v2", 3), ("kops-ts-v2-nokbase", "nokbase", 4)]:
        assert main(["train", "--preset", preset, *TINY, "--seed", str(seed), "--out", str(root / folder)]) == 0
    nanogpt = root / "nanogpt"
    nanogpt.mkdir()
    records = [{"step": step, "kind": "eval", "val_loss_full": 0.0, "val_ppl_full": ppl}
               for step, ppl in [(0, 65.0), (3, 30.0), (6, 20.0)]]
    (nanogpt / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def plot(capsys, out, *args):
    assert main(["plot", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(path) for path in out.iterdir())
    return {path.split("/")[-1] for path in printed}


def assert_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


def test_every_figure_is_written(runs, tmp_path, capsys):
    names = plot(capsys, tmp_path, "--runs", str(runs / "v1"), str(runs / "v2"), str(runs / "nokbase"),
                 str(runs / "v1" / "seed-1"), "--reference", str(runs / "nanogpt"))
    expected = {"learning_curves.png", "eta_refinement_comparison.png"}
    expected |= {f"{figure}_{group}.png" for figure in GROUP_FIGURES for group in ("v1", "seed-1")}
    expected |= {f"{figure}_v2.png" for figure in GROUP_FIGURES if figure != "eta_refinement"}
    expected |= {"gamma_spectrum_nokbase.png", "gamma_trajectory_nokbase.png"}
    assert names == expected
    for name in names:
        assert_png(tmp_path / name)


def test_run_without_diagnostics_only_has_learning_curves(runs, tmp_path, capsys):
    assert plot(capsys, tmp_path, "--runs", str(runs / "nanogpt")) == {"learning_curves.png"}
    assert_png(tmp_path / "learning_curves.png")


def write_evals(folder, unit):
    """A metrics log of three evaluations, each stating `unit` as its "ppl_unit"."""
    folder.mkdir()
    records = [{"step": step, "kind": "eval", "val_ppl_random": ppl, "ppl_unit": unit}
               for step, ppl in [(0, 900.0), (3, 400.0), (6, 300.0)]]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def y_label(*folders, reference=None):
    groups = [load_group(folder) for folder in folders]
    figure = learning_curves_figure(groups, load_group(reference) if reference else None)
    return figure.axes[0].get_ylabel()


def test_learning_curves_label_names_the_unit(runs, tmp_path):
    write_evals(tmp_path / "wikitext", "piece")
    write_evals(tmp_path / "wikitext-2", "piece")
    assert y_label(tmp_path / "wikitext", tmp_path / "wikitext-2") == "validation perplexity per piece (log scale)"
    assert y_label(runs / "v1", runs / "v2") == "validation perplexity per char (log scale)"
    assert y_label(runs / "v2", tmp_path / "wikitext") == "validation perplexity (log scale)"
    assert y_label(runs / "v2", reference=runs / "nanogpt") == "validation perplexity (log scale)"
    assert y_label(runs / "nanogpt") == "validation perplexity (log scale)"


def test_missing_runs_are_a_usage_error(tmp_path, capsys):
    assert main(["plot", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "figures")]) == 2
    assert "neither metrics.jsonl" in capsys.readouterr().err
