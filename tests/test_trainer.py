"""Tests of linmix.train: schedule, config, evaluation protocols, checkpoints, the Trainer."""

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _crash_run import PoisonedLM
from _crash_run import build_trainer as build_crash_run
from _paths import SHARED_DATA_DIR
from _toy_model import ToyCausalLM, ToyConfig, toy_param_groups

import linmix.train.checkpoint as checkpoint_module
from linmix.data import load_char_corpus
from linmix.errors import CheckpointError, LinmixError
from linmix.train import (
    MetricsLog,
    NonFiniteTrainingError,
    RunOutputError,
    TrainConfig,
    Trainer,
    atomic_write,
    evaluate_full,
    evaluate_random,
    load_checkpoint,
    lr_multiplier,
    read_metrics,
    step_if_finite,
    truncate_metrics,
)

TIMING_FIELDS = ("tokens_per_s", "elapsed_s", "eval_s")
RUN_FILES = ["best.pt", "last.pt", "metrics.jsonl", "summary.json"]
VAL_SLICE = 16_384  # keeps the many evaluations of the resume tests cheap


@pytest.fixture(scope="module")
def corpus():
    return load_char_corpus(SHARED_DATA_DIR)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The toy model's ops are tiny: a second thread only adds stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(out_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        lr=1e-2,
        lr_floor=1e-3,
        warmup_steps=5,
        max_steps=30,
        batch_size=16,
        context_length=32,
        eval_interval=10,
        eval_random_iters=3,
        eval_budget=None,  # the whole protocols: these tests check what they compute
        log_interval=5,
        out_dir=str(out_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def make_model(seed: int = 0, **config_overrides) -> ToyCausalLM:
    torch.manual_seed(seed)
    return ToyCausalLM(ToyConfig(**config_overrides))


def make_trainer(corpus, config: TrainConfig, model=None, val_tokens=None, **kwargs) -> Trainer:
    """A Trainer of the toy model; validation is the first VAL_SLICE tokens unless given."""
    return Trainer(
        model if model is not None else make_model(),
        corpus.train,
        corpus.val[:VAL_SLICE] if val_tokens is None else val_tokens,
        config,
        param_groups_fn=toy_param_groups,
        checkpoint_meta={"preset": "toy", "vocab": corpus.vocab},
        progress=False,
        **kwargs,
    )


def without_timing(records):
    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in records]


# ---- schedule -----------------------------------------------------------------------------------


def test_warmup_is_linear_from_one_step():
    values = [lr_multiplier(step, 10, 100, 0.1) for step in range(10)]
    assert values == [0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_cosine_runs_from_one_at_warmup_end_to_the_floor_at_max_steps():
    warmup, max_steps, floor = 2000, 3500, 3.5e-4 / 1e-2
    assert lr_multiplier(warmup, warmup, max_steps, floor) == 1.0
    assert lr_multiplier(max_steps, warmup, max_steps, floor) == pytest.approx(floor, abs=1e-15)
    assert lr_multiplier(max_steps + 50, warmup, max_steps, floor) == pytest.approx(
        floor, abs=1e-15
    )
    assert lr_multiplier(2750, warmup, max_steps, floor) == pytest.approx((1 + floor) / 2)
    decay = [lr_multiplier(step, warmup, max_steps, floor) for step in range(warmup, max_steps + 1)]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:], strict=False))


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, 0, 10, 0.0) == 1.0
    assert lr_multiplier(10, 0, 10, 0.0) == pytest.approx(0.0, abs=1e-15)


# ---- config -------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = TrainConfig(
        betas=(0.9, 0.99), eval_protocols=("random",), max_steps=100, warmup_steps=10
    )
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.checkpoint_every == again.eval_interval == 250
    assert again.selection_protocol == "random"


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", "1e-3"),
        ("lr_floor", -1e-4),
        ("lr_floor", 1.0),
        ("max_steps", 0),
        ("warmup_steps", 10_000),
        ("warmup_steps", 2.5),
        ("batch_size", 0),
        ("context_length", 0),
        ("weight_decay", -0.1),
        ("betas", (0.9, 1.0)),
        ("eps", 0.0),
        ("grad_clip", float("nan")),
        ("optimizer_mode", "adam"),
        ("eval_interval", 0),
        ("eval_protocols", ("full", "bogus")),
        ("eval_protocols", ()),
        ("eval_batch_size", 0),
        ("eval_random_iters", 0),
        ("seed", True),
        ("log_interval", 0),
        ("checkpoint_interval", 0),
        ("compile_mode", "fast"),
        ("max_nonfinite_steps", 0),
    ],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# ---- evaluation ---------------------------------------------------------------------------------


def test_evaluate_full_is_the_summed_nll_over_windows(corpus):
    model = make_model()
    stream = corpus.val[:1000]
    window = 32
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(stream) // window):  # (1000 - 1) // 32 == 1000 // 32 == 31 windows
            x = stream[i * window : (i + 1) * window]
            y = stream[i * window + 1 : (i + 1) * window + 1]
            logits, _ = model(x[None])
            total_nll += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            total_tokens += window
    model.train()

    result = evaluate_full(
        model, stream, window, batch_size=4, device="cpu"
    )  # batches 4, ..., 4, 3
    assert result["tokens"] == total_tokens == 31 * 32
    assert result["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-6)
    assert result["ppl"] == math.exp(result["loss"])
    assert model.training


def test_evaluate_random_repeats_with_the_same_generator_seed(corpus):
    model = make_model()
    runs = [
        evaluate_random(
            model, corpus.val, 32, 8, iters=4, generator=torch.Generator().manual_seed(seed)
        )
        for seed in (5, 5, 6)
    ]
    assert runs[0] == runs[1] != runs[2]
    assert runs[0]["ppl"] == pytest.approx(math.exp(runs[0]["loss"]))
    assert model.training


# ---- checkpoint files ---------------------------------------------------------------------------


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def failing_writer(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.pt"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.pt"]


def test_metrics_log_drops_a_cut_line_and_truncates_to_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, fresh=True) as log:
        for step in (0, 5, 10, 15):
            log.write({"step": step, "loss": torch.tensor(1.0 / (step + 1))})
    with open(path, "a") as f:
        f.write('{"step": 20, "lo')  # a write cut short by a crash
    assert [r["step"] for r in read_metrics(path)] == [0, 5, 10, 15]
    assert read_metrics(path)[1]["loss"] == pytest.approx(1 / 6)
    truncate_metrics(path, 10)
    assert [r["step"] for r in read_metrics(path)] == [0, 5, 10]
    with MetricsLog(path, fresh=False) as log:
        log.write({"step": 11})
    assert [r["step"] for r in read_metrics(path)] == [0, 5, 10, 11]


# ---- trainer ------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_its_files(corpus, tmp_path):
    config = make_config(
        tmp_path / "run", max_steps=60, warmup_steps=10, batch_size=32, eval_interval=30
    )
    summary = make_trainer(corpus, config, val_tokens=corpus.val).fit()

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert evals[-1]["val_loss_full"] < evals[0]["val_loss_full"] - 1.0
    assert evals[-1]["val_loss_full"] < 3.0
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert all(isinstance(r["toy_head_weight_norm"], float) for r in evals)
    assert evals[0]["val_tokens_full"] == (len(corpus.val) - 1) // 32 * 32
    assert train[-1]["lr"] == pytest.approx(1e-2 * lr_multiplier(59, 10, 60, 0.1))

    best = min(evals, key=lambda r: r["val_loss_full"])
    assert summary["finished"] and summary["step"] == 60
    assert summary["best_step"] == best["step"]
    assert summary["best_val_ppl"] == best["val_ppl_full"] == evals[-1]["best_val_ppl"]
    assert summary["best"]["random"]["loss"] == min(r["val_loss_random"] for r in evals)
    assert summary["final_val_ppl_full"] == evals[-1]["val_ppl_full"]
    assert summary["params"] == make_model().num_parameters()
    assert summary["tokens_seen"] == 60 * 32 * 32
    assert summary["tokens_per_s_mean"] > 0 and summary["tokens_per_s_steady"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert sorted(os.listdir(tmp_path / "run")) == RUN_FILES


def test_checkpoints_load_and_rebuild_the_best_model(corpus, tmp_path):
    config = make_config(tmp_path)
    make_trainer(corpus, config).fit()

    best = load_checkpoint(tmp_path / "best.pt")
    assert best["model_config"] == dataclasses.asdict(ToyConfig())
    assert best["meta"] == {"preset": "toy", "vocab": corpus.vocab}
    assert TrainConfig.from_dict(best["config"]) == config
    assert best["metric"]["protocol"] == "full"
    rebuilt = ToyCausalLM(ToyConfig(**best["model_config"]))
    rebuilt.load_state_dict(best["model"])
    again = evaluate_full(rebuilt, corpus.val[:VAL_SLICE], 32, config.eval_batch_size, "cpu")
    assert again["loss"] == best["metric"]["loss"]

    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 30
    assert {"optimizer", "sampler", "rng", "progress"} <= set(last)
    assert last["progress"]["best"]["full"]["step"] == best["step"]


def test_parameter_groups_get_their_lr_scale(corpus, tmp_path):
    trainer = make_trainer(
        corpus, make_config(tmp_path, max_steps=3, warmup_steps=2, log_interval=1)
    )
    trainer.fit()
    matrices, vectors = trainer.optimizer.param_groups
    assert (matrices["name"], vectors["name"]) == ("matrices", "vectors")
    assert matrices["lr"] == pytest.approx(1e-2 * lr_multiplier(2, 2, 3, 0.1))
    assert vectors["lr"] == pytest.approx(0.5 * matrices["lr"])
    assert (matrices["weight_decay"], vectors["weight_decay"]) == (0.02, 0.0)


def test_parameter_groups_must_cover_each_parameter_once(corpus, tmp_path):
    config = make_config(tmp_path)

    def missing(model, mode, weight_decay):
        return toy_param_groups(model, mode, weight_decay)[:1]

    def twice(model, mode, weight_decay):
        groups = toy_param_groups(model, mode, weight_decay)
        return groups + [dict(groups[1], name="again")]

    with pytest.raises(ValueError, match="no parameter group: .*bias"):
        Trainer(make_model(), corpus.train, corpus.val, config, param_groups_fn=missing)
    with pytest.raises(ValueError, match="two parameter groups"):
        Trainer(make_model(), corpus.train, corpus.val, config, param_groups_fn=twice)


def test_model_and_token_mismatches_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's context_length 64"):
        make_trainer(corpus, make_config(tmp_path, context_length=128))
    with pytest.raises(ValueError, match="vocabulary"):
        make_trainer(corpus, make_config(tmp_path), model=make_model(vocab_size=60))


def test_token_unit_names_the_perplexity_and_one_process_is_the_whole_global_batch(
    corpus, tmp_path, capsys
):
    config = make_config(tmp_path, max_steps=2, warmup_steps=1, eval_interval=2, log_interval=1)
    trainer = Trainer(
        make_model(), corpus.train, corpus.val[:VAL_SLICE], config,
        param_groups_fn=toy_param_groups, token_unit="piece",
    )
    assert (trainer.world_size, trainer.global_batch_size, trainer.tokens_per_step) == (1, 16, 16 * 32)
    summary = trainer.fit()

    assert "step 2: val full ppl per piece " in capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["ppl_unit"] for r in records if r["kind"] == "eval"] == ["piece", "piece"]
    assert not any(key.endswith("_per_gpu") for record in records for key in record)
    assert summary["ppl_unit"] == "piece"
    assert (summary["world_size"], summary["global_batch_size"], summary["tokens_per_step"]) == (1, 16, 512)
    assert not any(key.endswith("_per_gpu") for key in summary)
    assert load_checkpoint(tmp_path / "last.pt")["parallel"] == {"world_size": 1, "fsdp": False}


def test_resume_after_stop_after_reproduces_the_uninterrupted_run(corpus, tmp_path):
    full = make_trainer(corpus, make_config(tmp_path / "full")).fit()

    sliced_config = make_config(tmp_path / "sliced")
    first = make_trainer(corpus, sliced_config, stop_after=17).fit()
    assert not first["finished"] and first["step"] == 17
    assert load_checkpoint(tmp_path / "sliced" / "last.pt")["step"] == 17
    resumed = make_trainer(corpus, sliced_config, model=make_model(seed=123), resume=True).fit()

    expected = without_timing(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert without_timing(read_metrics(tmp_path / "sliced" / "metrics.jsonl")) == expected
    for key in ("best", "best_val_ppl", "best_step", "final_val_ppl_full", "final_val_ppl_random"):
        assert resumed[key] == full[key]
    assert sorted(os.listdir(tmp_path / "sliced")) == RUN_FILES


def test_resume_after_a_crash_drops_records_past_the_checkpoint(corpus, tmp_path):
    expected = make_trainer(corpus, make_config(tmp_path / "full")).fit()

    class Crash(Exception):
        pass

    def crash_at_step_15(record):
        if record["step"] == 15:
            raise Crash

    config = make_config(tmp_path / "crashed")
    with pytest.raises(Crash):
        make_trainer(corpus, config, callbacks=[crash_at_step_15]).fit()
    written = read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert written[-1]["step"] == 15  # past last.pt, which holds step 10

    seen = []
    summary = make_trainer(corpus, config, resume=True, callbacks=[seen.append]).fit()
    assert seen[0]["step"] == 15  # steps 11..30 ran again
    assert without_timing(read_metrics(tmp_path / "crashed" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )
    assert summary["best"] == expected["best"]


def test_resume_refuses_a_changed_run(corpus, tmp_path):
    config = make_config(tmp_path)
    make_trainer(corpus, config, stop_after=5).fit()

    with pytest.raises(ValueError, match="lr: 0.01 -> 0.02"):
        make_trainer(corpus, dataclasses.replace(config, lr=2e-2), resume=True)
    with pytest.raises(ValueError, match="dropout"):
        make_trainer(corpus, config, model=make_model(dropout=0.2), resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        make_trainer(corpus, config)
    relaxed = dataclasses.replace(config, log_interval=3, checkpoint_interval=7)
    assert make_trainer(corpus, relaxed, resume=True).step == 5


# ---- non-finite steps ---------------------------------------------------------------------------


def poisoned_trainer(corpus, config, nan_loss_steps=(), inf_grad_steps=(), **kwargs) -> Trainer:
    """A toy-model Trainer whose chosen steps get a NaN loss or infinite gradients."""
    model = PoisonedLM(make_model(), nan_loss_steps, inf_grad_steps)
    trainer = make_trainer(corpus, config, model=model, **kwargs)
    model.follow(trainer)
    return trainer


def parameters_and_state(model, optimizer) -> list[torch.Tensor]:
    """Clones of every parameter and every optimizer-state tensor."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [t.clone() for t in state.values() if isinstance(t, torch.Tensor)]
    return tensors


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_untouched(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused or None)

    def step(loss_scale: float, nonfinite: list[bool]) -> None:
        model.zero_grad()
        (model(torch.randn(3, 8)).square().sum() * loss_scale).backward()
        step_if_finite(optimizer, torch.tensor(nonfinite))

    step(1.0, [False, False])
    before = parameters_and_state(model, optimizer)
    step(float("nan"), [True, True])
    step(1.0, [False, True])
    after = parameters_and_state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    step(1.0, [False, False])
    assert not torch.equal(model.weight, before[0])


def test_nonfinite_steps_are_skipped_logged_and_counted(corpus, tmp_path):
    config = make_config(tmp_path, max_steps=20, log_interval=1)
    trainer = poisoned_trainer(corpus, config, nan_loss_steps=[7], inf_grad_steps=[12])
    weights = {}  # step -> parameters and optimizer state once its records are written

    def snapshot(record):
        weights.setdefault(record["step"], parameters_and_state(trainer.model, trainer.optimizer))

    trainer.callbacks.append(snapshot)
    summary = trainer.fit()

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r for r in records if r["kind"] == "skip"] == [
        {"step": 7, "kind": "skip", "nonfinite": ["loss", "gradients"], "consecutive": 1},
        {"step": 12, "kind": "skip", "nonfinite": ["gradients"], "consecutive": 1},
    ]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == [step for step in range(1, 21) if step not in (7, 12)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train.values())
    assert train[8]["lr"] == pytest.approx(1e-2 * lr_multiplier(7, 5, 20, 0.1))  # schedule ran on
    for skipped in (7, 12):
        unchanged = zip(weights[skipped - 1], weights[skipped], strict=True)
        assert all(torch.equal(a, b) for a, b in unchanged)
    assert summary["finished"] and summary["skipped_steps"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_and_keep_last_pt(corpus, tmp_path):
    config = make_config(tmp_path, checkpoint_interval=5, max_nonfinite_steps=4)
    trainer = poisoned_trainer(corpus, config, nan_loss_steps=range(13, 31))
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.fit()

    message = str(caught.value)
    assert message == (
        "training stopped at step 16: 4 steps in a row (13-16) had a non-finite loss or gradients "
        f"(max_nonfinite_steps 4); {tmp_path / 'last.pt'} keeps step 15"
    )
    assert isinstance(caught.value, LinmixError) and isinstance(caught.value, FloatingPointError)
    skips = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "skip"]
    assert [(r["step"], r["consecutive"]) for r in skips] == [(13, 1), (14, 2), (15, 3), (16, 4)]
    last = load_checkpoint(tmp_path / "last.pt")  # checks that its weights are finite
    assert last["step"] == 15 and last["progress"]["nonfinite_streak"] == 3
    for name, tensor in trainer.model.state_dict().items():  # no update since step 12
        assert torch.equal(last["model"][name], tensor)


# ---- run folder and checkpoint failures ---------------------------------------------------------


def file_in_the_way(tmp_path, monkeypatch) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "run"


def write_permission_denied(tmp_path, monkeypatch) -> Path:
    """Running as root, permissions stop nothing: the probe's refusal is simulated."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return tmp_path / "run"


def disk_almost_full(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=50_000))
    return tmp_path / "run"


@pytest.mark.parametrize(
    "make_out_dir, message",
    [
        (file_in_the_way, "run cannot be created: Not a directory"),
        (write_permission_denied, "run is not writable: Permission denied"),
        (
            disk_almost_full,
            "run has 0.0 MiB of free disk space; best.pt and last.pt need about 0.1 MiB",
        ),
    ],
    ids=["not creatable", "not writable", "disk full"],
)
def test_an_out_dir_that_cannot_take_the_run_is_refused_before_training(
    corpus, tmp_path, monkeypatch, make_out_dir, message
):
    out_dir = make_out_dir(tmp_path, monkeypatch)
    seen = []
    trainer = make_trainer(corpus, make_config(out_dir), callbacks=[seen.append])
    with pytest.raises(RunOutputError) as caught:
        trainer.fit()
    assert str(caught.value) == f"out_dir {out_dir} {message.removeprefix('run ')}"
    assert isinstance(caught.value, LinmixError) and seen == []


def test_a_checkpoint_write_that_fails_mid_run_keeps_the_previous_last_pt(
    corpus, tmp_path, monkeypatch
):
    real_atomic_write = checkpoint_module.atomic_write

    def disk_full_at_step_20(path, write):
        def write_part_then_fail(f):
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        failing = Path(path).name == "last.pt" and trainer.step == 20
        real_atomic_write(path, write_part_then_fail if failing else write)

    monkeypatch.setattr(checkpoint_module, "atomic_write", disk_full_at_step_20)
    trainer = make_trainer(corpus, make_config(tmp_path))
    with pytest.raises(RunOutputError) as caught:
        trainer.fit()
    last = tmp_path / "last.pt"
    assert str(caught.value) == (
        f"cannot write {last} at step 20: No space left on device; {last} keeps step 10"
    )
    assert load_checkpoint(last)["step"] == 10
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_resuming_a_damaged_last_pt_is_refused_naming_it(corpus, tmp_path):
    config = make_config(tmp_path)
    make_trainer(corpus, config, stop_after=5).fit()
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(last))} is cut short"):
        make_trainer(corpus, config, resume=True)


def test_a_last_pt_of_format_1_resumes_exactly(corpus, tmp_path):
    make_trainer(corpus, make_config(tmp_path / "full")).fit()
    config = make_config(tmp_path / "old")
    make_trainer(corpus, config, stop_after=17).fit()
    last = tmp_path / "old" / "last.pt"
    checkpoint = load_checkpoint(last)
    del checkpoint["config"]["max_nonfinite_steps"]
    for key in ("nonfinite_streak", "skipped_steps"):
        del checkpoint["progress"][key]
    torch.save({**checkpoint, "format_version": 1}, last)  # as linmix wrote it before format 2

    make_trainer(corpus, config, resume=True).fit()
    assert without_timing(read_metrics(tmp_path / "old" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


# ---- runs killed with SIGKILL -------------------------------------------------------------------

CRASH_RUN = Path(__file__).with_name("_crash_run.py")
KILLS = [  # (the moment the run SIGKILLs itself, the step last.pt holds afterwards)
    ("eval:10", 5),  # during an evaluation
    ("saved:best.pt:10", 5),  # between best.pt and last.pt: a second kill before last.pt moves on
    ("writing:last.pt:15", 10),  # halfway through writing last.pt
]
UNCOMPARED = {*TIMING_FIELDS, "out_dir", "train_time_s", "wall_time_s"}


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts, lists and tuples as {"/key/0/...": leaf}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}/{key}"))
    return flat


def assert_same_state(checkpoint: dict, expected: dict) -> None:
    """Equal leaves, tensors bitwise, apart from paths and timings."""
    flat, flat_expected = flatten(checkpoint), flatten(expected)
    assert flat.keys() == flat_expected.keys()
    for key, value in flat.items():
        if not UNCOMPARED.isdisjoint(key.split("/")):
            continue
        expected_value = flat_expected[key]
        if torch.is_tensor(value):
            assert torch.equal(value, expected_value), key
        else:
            assert value == expected_value, key


def run_crash_script(out_dir: Path, *moment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CRASH_RUN), str(out_dir), *moment],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_runs_killed_at_any_moment_resume_to_the_uninterrupted_run(tmp_path):
    """Real SIGKILLs, three in one run, two of them before last.pt moves on; the run's steps 4-6
    and 12 are non-finite, so a streak of skips spans a checkpoint."""
    build_crash_run(tmp_path / "whole").fit()
    killed = tmp_path / "killed"
    for moment, saved_step in KILLS:
        child = run_crash_script(killed, moment)
        assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
        assert load_checkpoint(killed / "last.pt")["step"] == saved_step
        if moment.startswith("writing:"):
            assert list(killed.glob(".last.pt.*.tmp"))  # the cut write's temporary file
    child = run_crash_script(killed)
    assert child.returncode == 0, child.stderr[-3000:]

    whole = tmp_path / "whole"
    records = read_metrics(killed / "metrics.jsonl")
    assert without_timing(records) == without_timing(read_metrics(whole / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "skip"] == [4, 5, 6, 12]
    for name in ("best.pt", "last.pt"):
        assert_same_state(load_checkpoint(killed / name), load_checkpoint(whole / name))
    assert sorted(os.listdir(killed)) == RUN_FILES


# ---- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_graph_training_follows_the_eager_run(corpus, tmp_path):
    """kops-ts-linear on the Triton decay path, trained as CUDA graphs (compile_mode "reduce-overhead"),
    takes the same steps as without compile: the graphs replay the custom ops and the batches cut on the GPU."""
    from linmix.models import build_model, get_preset

    no_dropout = {name: 0.0 for name in ("dropout_emb", "dropout_mlp", "dropout_resid", "dropout_head")}
    model_config = get_preset("kops-ts-linear").model_config(d_model=64, n_k2=2, decay_backend="triton", **no_dropout)
    losses = {}
    for mode in ("eager", "reduce-overhead"):
        torch.manual_seed(0)
        config = make_config(tmp_path / mode, device="cuda", max_steps=8, log_interval=1, eval_interval=8,
                             context_length=128, compile=mode != "eager",
                             compile_mode="default" if mode == "eager" else mode)
        Trainer(build_model("kstack", model_config), corpus.train, corpus.val[:VAL_SLICE], config,
                progress=False).fit()
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses["eager"]) == 8 and losses["eager"][-1] < losses["eager"][0]
    torch.testing.assert_close(torch.tensor(losses["reduce-overhead"]), torch.tensor(losses["eager"]),
                               rtol=2e-2, atol=0)
