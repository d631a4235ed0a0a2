"""Tests of data-parallel training on torch.distributed: two CPU processes on the gloo backend.

One spawn of two ranks (the module's `two_rank_runs` fixture) evaluates a model spread over the
ranks and trains a small blocks model several ways: DDP and FSDP2, each uninterrupted and sliced
then resumed. Rank 1 alone sees a NaN loss at step POISONED_STEP. Each rank saves what it saw to
`rank{R}.pt`; the tests compare it with one-process runs.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _crash_run import PoisonedLM
from _paths import SHARED_DATA_DIR
from _toy_model import ToyCausalLM, ToyConfig, toy_param_groups
from torch import nn

from linmix.data import load_char_corpus
from linmix.train import TrainConfig, Trainer, evaluate_full, evaluate_random, load_checkpoint, read_metrics
from linmix.train.distributed import DistributedSetupError, distributed_context, full_model_state

WORLD_SIZE = 2
BATCH_PER_RANK = 4
VAL_TOKENS = 4096
POISONED_STEP = 4  # rank 1's loss is NaN: every rank must skip the step
STOP_AFTER = 8
SPAWN_TIMEOUT_S = 300
TIMING_FIELDS = ("tokens_per_s", "tokens_per_s_per_gpu", "elapsed_s", "eval_s")


class BlocksLM(nn.Module):
    """The toy model with two residual MLP blocks in an nn.ModuleList (FSDP2 shards each), and no
    dropout, so that a data-parallel step is one process's step on the global batch."""

    def __init__(self) -> None:
        super().__init__()
        self.toy = ToyCausalLM(ToyConfig(dropout=0.0))
        self.config = self.toy.config
        d = self.config.d_model
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(2))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        toy = self.toy
        h = toy.mix(nn.functional.pad(toy.embed(idx).transpose(1, 2), (1, 0))).transpose(1, 2)  # [B, T, d]
        for block in self.blocks:
            h = h + block(h)
        logits = toy.head(h)  # [B, T, V]
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def diagnostics(self) -> dict:
        return {"head_weight_norm": self.toy.head.weight.norm()}


class RecordingSampler:
    """Passes a sampler's batches on and keeps them."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(self):
        batch = self.sampler.sample()
        self.batches.append(batch)
        return batch

    def state_dict(self):
        return self.sampler.state_dict()


class ReplaySampler:
    """Hands out given batches in order."""

    def __init__(self, batches) -> None:
        self.batches = iter(batches)

    def sample(self):
        return next(self.batches)

    def state_dict(self):
        return {}


def make_config(out_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        lr=1e-2, lr_floor=1e-3, warmup_steps=3, max_steps=12, batch_size=BATCH_PER_RANK, context_length=32,
        eval_interval=6, eval_batch_size=16, eval_random_iters=3, eval_budget=None, log_interval=1,
        out_dir=str(out_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def make_trainer(corpus, config, rank: int = 0, model_seed: int = 0, poison: bool = False, **kwargs) -> Trainer:
    """A Trainer of BlocksLM (seeded with `model_seed`) that rank 1, or one with `poison`, makes
    see a NaN loss at POISONED_STEP."""
    torch.manual_seed(model_seed)
    model = PoisonedLM(BlocksLM(), nan_loss_steps=(POISONED_STEP,) if rank == 1 or poison else ())
    trainer = Trainer(
        model, corpus.train, corpus.val[:VAL_TOKENS], config, param_groups_fn=toy_param_groups,
        checkpoint_meta={"preset": "blocks"}, progress=False, token_unit="char", **kwargs,
    )
    model.follow(trainer)
    return trainer


def run_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of the spawn: set torchrun's variables, join the group, run every scenario."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    corpus = load_char_corpus(SHARED_DATA_DIR)
    results = {}
    with distributed_context("cpu") as place:
        assert place == (rank, WORLD_SIZE, "cpu")
        torch.manual_seed(0)
        model = BlocksLM()
        val = corpus.val[:VAL_TOKENS]
        results["eval_full"] = evaluate_full(model, val, 32, 16, windows=41, spread=True)
        results["eval_random"] = evaluate_random(
            model, val, 32, 16, 3, torch.Generator().manual_seed(7), spread=True
        )
        with_scalar = ToyCausalLM(ToyConfig())
        with_scalar.scale = nn.Parameter(torch.ones(()))
        try:
            Trainer(with_scalar, corpus.train, val, make_config(out / "scalar"), fsdp=True)
        except ValueError as error:
            results["scalar_refusal"] = str(error)
        for fsdp in (False, True):
            name = "fsdp" if fsdp else "ddp"
            trainer = make_trainer(corpus, make_config(out / f"{name}-full"), rank, fsdp=fsdp)
            trainer.sampler = RecordingSampler(trainer.sampler)
            results[f"{name}_summary"] = trainer.fit()
            results[f"{name}_batches"] = trainer.sampler.batches
            results[f"{name}_model"] = full_model_state(trainer.model, fsdp)
            sliced = make_config(out / f"{name}-sliced")
            make_trainer(corpus, sliced, rank, fsdp=fsdp, stop_after=STOP_AFTER).fit()
            resumed = make_trainer(corpus, sliced, rank, model_seed=123, fsdp=fsdp, resume=True)
            results[f"{name}_resumed_summary"] = resumed.fit()
            results[f"{name}_resumed_model"] = full_model_state(resumed.model, fsdp)
    torch.save(results, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus():
    return load_char_corpus(SHARED_DATA_DIR)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    processes = mp.spawn(run_rank, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {SPAWN_TIMEOUT_S} s (a collective hangs?)")
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    return out, ranks


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_states_close(actual, expected, atol=1e-5):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def test_evaluation_spread_over_ranks_gives_one_process_numbers_to_the_bit(corpus, two_rank_runs):
    _, ranks = two_rank_runs
    torch.manual_seed(0)
    model = BlocksLM()
    val = corpus.val[:VAL_TOKENS]
    full = evaluate_full(model, val, 32, 16, windows=41)  # 3 batches: rank 1 runs one again
    random = evaluate_random(model, val, 32, 16, 3, torch.Generator().manual_seed(7))
    for rank in ranks:
        assert rank["eval_full"] == full
        assert rank["eval_random"] == random


def test_ddp_ranks_stay_in_sync_and_equal_one_process_on_the_global_batch(corpus, two_rank_runs, tmp_path):
    out, (rank0, rank1) = two_rank_runs
    for name, tensor in rank0["ddp_model"].items():
        assert torch.equal(tensor, rank1["ddp_model"][name]), name
    assert rank0["ddp_summary"]["skipped_steps"] == 1
    assert not torch.equal(rank0["ddp_batches"][0][0], rank1["ddp_batches"][0][0])  # each its own windows

    global_batches = [
        (torch.cat([x0, x1]), torch.cat([y0, y1]))
        for (x0, y0), (x1, y1) in zip(rank0["ddp_batches"], rank1["ddp_batches"], strict=True)
    ]
    config = make_config(tmp_path, batch_size=WORLD_SIZE * BATCH_PER_RANK)
    single = make_trainer(corpus, config, poison=True)
    single.sampler = ReplaySampler(global_batches)
    summary = single.fit()

    assert_states_close(rank0["ddp_model"], single.model.state_dict())
    records = read_metrics(out / "ddp-full" / "metrics.jsonl")
    expected = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in records] == [(r["step"], r["kind"]) for r in expected]
    for record, want in zip(records, expected, strict=True):
        for key in ("loss", "grad_norm", "val_loss_full", "val_loss_random"):
            if key in want:
                assert record[key] == pytest.approx(want[key], rel=1e-5), (record["step"], key)
    assert records[-2]["tokens_per_s_per_gpu"] == pytest.approx(records[-2]["tokens_per_s"] / WORLD_SIZE)
    ddp = rank0["ddp_summary"]
    assert (ddp["world_size"], ddp["global_batch_size"]) == (WORLD_SIZE, WORLD_SIZE * BATCH_PER_RANK)
    assert ddp["tokens_per_step"] == summary["tokens_per_step"] == 8 * 32
    assert ddp["ppl_unit"] == "char"


def test_ddp_resume_equals_the_uninterrupted_run(two_rank_runs):
    out, (rank0, rank1) = two_rank_runs
    sliced = without_timing(read_metrics(out / "ddp-sliced" / "metrics.jsonl"))
    assert sliced == without_timing(read_metrics(out / "ddp-full" / "metrics.jsonl"))
    for rank in (rank0, rank1):
        for name, tensor in rank["ddp_model"].items():
            assert torch.equal(rank["ddp_resumed_model"][name], tensor), name
    assert rank0["ddp_resumed_summary"]["best"] == rank0["ddp_summary"]["best"]
    last = load_checkpoint(out / "ddp-sliced" / "last.pt")
    assert last["parallel"] == {"world_size": WORLD_SIZE, "fsdp": False}
    assert len(last["ranks"]) == WORLD_SIZE
    assert sorted(os.listdir(out / "ddp-sliced")) == ["best.pt", "last.pt", "metrics.jsonl", "summary.json"]


def test_fsdp_trains_as_ddp_resumes_exactly_and_writes_a_best_pt_one_process_loads(corpus, two_rank_runs):
    out, (rank0, rank1) = two_rank_runs
    assert rank1["fsdp_model"] == {}  # the full state is gathered on rank 0
    assert_states_close(rank0["fsdp_model"], rank0["ddp_model"])
    fsdp_records = read_metrics(out / "fsdp-full" / "metrics.jsonl")
    ddp_records = read_metrics(out / "ddp-full" / "metrics.jsonl")
    for record, want in zip(fsdp_records, ddp_records, strict=True):
        if "loss" in want:
            assert record["loss"] == pytest.approx(want["loss"], rel=1e-5)

    sliced = without_timing(read_metrics(out / "fsdp-sliced" / "metrics.jsonl"))
    assert sliced == without_timing(fsdp_records)
    for name, tensor in rank0["fsdp_model"].items():
        assert torch.equal(rank0["fsdp_resumed_model"][name], tensor), name

    best = load_checkpoint(out / "fsdp-full" / "best.pt")
    model = PoisonedLM(BlocksLM())
    model.load_state_dict(best["model"])
    again = evaluate_full(model, corpus.val[:VAL_TOKENS], 32, 16)
    assert again["loss"] == best["metric"]["loss"]


def test_fsdp_names_the_0_dim_parameters_it_cannot_shard(two_rank_runs):
    _, ranks = two_rank_runs
    for rank in ranks:
        assert rank["scalar_refusal"] == (
            "FSDP2 cannot shard 0-dim parameters, and the model has 1: scale; train it with DDP (without --fsdp)"
        )


def test_resume_with_another_world_size_or_sharding_is_refused(corpus, two_rank_runs):
    out, _ = two_rank_runs
    with pytest.raises(ValueError, match=r"world size \(processes\): 2 -> 1"):
        make_trainer(corpus, make_config(out / "ddp-full"), resume=True)
    with pytest.raises(ValueError, match=r"world size \(processes\): 2 -> 1; fsdp: True -> False"):
        make_trainer(corpus, make_config(out / "fsdp-full"), resume=True)


def test_fsdp_without_a_process_group_is_refused(corpus, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedSetupError, match="--fsdp .*torchrun --nproc_per_node"):
        with distributed_context("cpu", fsdp=True):
            pass
    with distributed_context("cpu") as place:
        assert place == (0, 1, "cpu")
    with pytest.raises(ValueError, match="process group"):
        make_trainer(corpus, make_config(tmp_path), fsdp=True)


def test_one_process_resume_of_an_older_last_pt_still_counts_as_one_process(corpus, tmp_path):
    config = make_config(tmp_path, max_steps=4, warmup_steps=1, eval_interval=2)
    make_trainer(corpus, config, stop_after=2).fit()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["parallel"] == {"world_size": 1, "fsdp": False} and "ranks" not in last
    del last["parallel"]
    torch.save(last, tmp_path / "last.pt")  # format 1: a bare torch.save archive, as older linmix wrote
    assert make_trainer(corpus, config, resume=True).fit()["step"] == 4


def test_torchrun_trains_a_preset_through_the_command_line(tmp_path):
    """`torchrun --nproc_per_node 2 -m linmix train` on the CPU: rank 0 alone prints and writes the run, whose
    summary counts both processes; `linmix eval` of its best.pt reproduces the run's best loss."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "linmix", "train",
               "--preset", "kops-ts-v2", "--set", "d_model=16", "--set", "n_k2=1", "--set", "rank=4",
               "--set", "context_length=32", "--batch-size", str(BATCH_PER_RANK), "--max-steps", "6",
               "--warmup-steps", "2", "--eval-interval", "3", "--eval-batch-size", "256", "--eval-protocols", "full",
               "--eval-budget", "none", "--no-progress", "--out", str(run)]
    env = {**os.environ, "LINMIX_DATA_DIR": str(SHARED_DATA_DIR), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("best val PPL per char") == 1
    assert f"global batch {WORLD_SIZE * BATCH_PER_RANK} windows = {WORLD_SIZE} process(es)" in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == WORLD_SIZE and summary["global_batch_size"] == WORLD_SIZE * BATCH_PER_RANK
    assert summary["step"] == 6 and summary["ppl_unit"] == "char"
    assert load_checkpoint(run / "last.pt")["parallel"] == {"world_size": WORLD_SIZE, "fsdp": False}
