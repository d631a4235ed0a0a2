"""Synthetic tasks: the generators' invariants (zoology's MQAR among them), the protocols' cells,
the task model, one run, the report, and `linmix synth` end to end on a tiny MQAR grid."""

import json
import math

import pytest
import torch

from linmix.tasks import report, runner
from linmix.tasks.__main__ import main as synth
from linmix.tasks.generators import (
    IGNORE,
    S5_PERMUTATIONS,
    copy_task,
    mqar,
    multihop,
    parity,
    s5,
)
from linmix.tasks.model import TaskModel, TaskModelConfig
from linmix.tasks.protocols import expand_cells, get_protocol
from linmix.tasks.train import train_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    """Workers inherit one thread each: the machine's few cores are shared."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- MQAR ---------------------------------------------------------------------------------------


def test_mqar_layout_matches_zoology():
    seq_len, kv, vocab = 64, 8, 512
    batch = mqar(300, seq_len, kv, vocab_size=vocab, random_non_queries=False, seed=3)
    inputs, targets, mask = batch.inputs, batch.targets, batch.mask
    assert inputs.shape == targets.shape == mask.shape == (300, seq_len)
    assert inputs.dtype == targets.dtype == torch.long and mask.dtype == torch.bool
    keys, values = inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < vocab // 2)).all()  # key and value ranges are disjoint halves
    assert ((values >= vocab // 2) & (values < vocab)).all()
    queries = inputs[:, 2 * kv :]
    for row in range(300):
        assert len(set(keys[row].tolist())) == kv and len(set(values[row].tolist())) == kv
        asked = queries[row][queries[row] != 0]
        assert sorted(asked.tolist()) == sorted(keys[row].tolist())  # each key queried exactly once
        positions = mask[row].nonzero().flatten()
        assert len(positions) == kv
        assert (positions >= 2 * kv).all() and (positions % 2 == 0).all()  # in the query region, at even offsets
        answers = dict(zip(keys[row].tolist(), values[row].tolist()))
        for position in positions.tolist():
            assert targets[row, position] == answers[inputs[row, position].item()]  # label at the query: its value
    assert (targets[~mask] == IGNORE).all()
    assert (mask == (inputs != 0) & (torch.arange(seq_len) >= 2 * kv)).all()  # labelled only where a query is


def test_mqar_random_non_queries_fill_only_the_gaps():
    plain = mqar(50, 128, 16, vocab_size=1024, random_non_queries=False, seed=5)
    noisy = mqar(50, 128, 16, vocab_size=1024, random_non_queries=True, seed=5)
    kept = plain.inputs != 0
    assert (noisy.inputs[kept] == plain.inputs[kept]).all()
    assert (noisy.targets == plain.targets).all() and (noisy.mask == plain.mask).all()
    filled = noisy.inputs[~kept]
    assert filled.min() >= 0 and filled.max() < 1024 and filled.float().std() > 100


def test_mqar_queries_follow_the_power_law():
    """The first key's query gap is the first weighted draw, distributed as zoology's p itself."""
    seq_len, kv, n, power_a = 128, 4, 20_000, 0.01
    batch = mqar(n, seq_len, kv, vocab_size=1024, power_a=power_a, random_non_queries=False, seed=11)
    first_key = batch.inputs[:, 0:1]
    position = (batch.inputs[:, 2 * kv :] == first_key).float().argmax(dim=1)
    gaps = position // 2
    space = (seq_len - 2 * kv) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    p /= p.sum()
    observed = torch.bincount(gaps, minlength=space).double() / n
    assert 0.5 * (observed - p).abs().sum() < 0.04  # total variation
    sigma = math.sqrt(p[0] * (1 - p[0]) / n)
    assert abs(observed[0] - p[0]) < 5 * sigma
    uniform = torch.full_like(p, 1 / space)
    assert 0.5 * (observed - uniform).abs().sum() > 0.2  # queries do cluster early


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seq_len=63, num_kv_pairs=4), "seq_len must be even"),
    (dict(seq_len=64, num_kv_pairs=4, vocab_size=64), "vocab_size must be an int > seq_len"),
    (dict(seq_len=64, num_kv_pairs=17), "seq_len must be >= 2 * num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=8, num_passes=4), "seq_len must be >= 2 * num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=0), "num_kv_pairs must be an int >= 1"),
    (dict(seq_len=64, num_kv_pairs=4, power_a=0.0), "power_a must be > 0"),
])
def test_mqar_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("*", r"\*")):
        mqar(4, **kwargs)


def test_mqar_passes_repeat_the_pairs():
    batch = mqar(10, 64, 4, vocab_size=256, num_passes=2, random_non_queries=False, seed=1)
    assert (batch.inputs[:, :8] == batch.inputs[:, 8:16]).all()
    assert batch.mask[:, :16].sum() == 0 and (batch.mask.sum(dim=1) == 4).all()


# --- copy, multi-hop, parity, S5 ----------------------------------------------------------------


def test_copy_scores_the_second_copy():
    batch = copy_task(20, 16, num_symbols=8, seed=2)
    assert batch.inputs.shape == (20, 34) and batch.vocab_size == 10
    string = batch.inputs[:, 1:17]
    assert (batch.inputs[:, 0] == 8).all() and (batch.inputs[:, 17] == 9).all()
    assert (batch.inputs[:, 18:] == string).all()
    assert (batch.targets[batch.mask].view(20, 16) == string).all()  # positions SEP .. predict the copy
    assert (batch.mask.nonzero()[:, 1].view(20, 16) == torch.arange(17, 33)).all()


def test_multihop_answer_follows_the_chain():
    hops, chains, entities = 3, 5, 32
    batch = multihop(200, hops, seq_len=64, num_entities=entities, num_chains=chains, seed=4)
    assert batch.vocab_size == entities + 3 and batch.inputs.shape == (200, 64)
    assert (batch.mask.sum(dim=1) == 1).all() and batch.mask[:, -1].all()
    for row in batch.inputs.tolist():
        assert row[-2] == entities + 1  # "?"
        content = [t for t in row[:-2] if t != entities + 2]
        links = [content[i : i + 3] for i in range(0, len(content), 3)]
        assert len(links) == chains * hops and all(link[2] == entities for link in links)
        successor = {a: b for a, b, _ in links}
        assert len(successor) == chains * hops  # every entity has at most one successor
    for row, target in zip(batch.inputs.tolist(), batch.targets[:, -1].tolist()):
        content = [t for t in row[:-2] if t != entities + 2]
        successor = {content[i]: content[i + 1] for i in range(0, len(content), 3)}
        entity = row[-1]
        for _ in range(hops):
            entity = successor[entity]
        assert entity == target and entity not in successor  # the answer is the chain's tail


def test_parity_and_s5_targets():
    bits = parity(10, 40, seed=1)
    assert bits.mask.all() and bits.vocab_size == 2
    assert (bits.targets == bits.inputs.cumsum(dim=1) % 2).all()
    perms = s5(5, 12, seed=2)
    assert perms.mask.all() and perms.vocab_size == 120 and len(set(S5_PERMUTATIONS)) == 120
    for row, target in zip(perms.inputs.tolist(), perms.targets.tolist()):
        state = tuple(range(5))
        for token, label in zip(row, target):
            step = S5_PERMUTATIONS[token]
            state = tuple(step[state[i]] for i in range(5))  # the new permutation after the running product
            assert S5_PERMUTATIONS[label] == state


@pytest.mark.parametrize("make, needle", [
    (lambda: copy_task(4, 0), "length must be an int >= 1"),
    (lambda: multihop(4, 8, num_entities=64, num_chains=8), "num_entities must be an int >= 72"),
    (lambda: multihop(4, 2, seq_len=40, num_chains=8), "seq_len must be an int >= 50"),
    (lambda: parity(0, 8), "num_examples must be an int >= 1"),
    (lambda: s5(4, 8, seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
])
def test_generators_reject_bad_arguments(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


@pytest.mark.parametrize("make", [
    lambda seed: mqar(8, 64, 4, vocab_size=256, seed=seed), lambda seed: copy_task(8, 8, seed=seed),
    lambda seed: multihop(8, 2, seed=seed), lambda seed: parity(8, 16, seed=seed), lambda seed: s5(8, 8, seed=seed),
])
def test_generators_are_seeded(make):
    first, again, other = make(7), make(7), make(8)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)


# --- protocols, model, one run ------------------------------------------------------------------


def test_protocol_cells():
    mqar_protocol = get_protocol("mqar")
    cell, small = expand_cells(mqar_protocol, ["256:16", "64:4"])
    assert cell.train[0].args == {"seq_len": 256, "num_kv_pairs": 16} and cell.train[0].examples == 20_000
    assert small.train[0].examples == 100_000 and cell.test[0].examples == 1_000
    (whole,) = expand_cells(mqar_protocol, ["zoology"])
    assert [s.args["num_kv_pairs"] for s in whole.train] == [4, 8, 16, 32, 64]
    assert [(s.args["seq_len"], s.args["num_kv_pairs"]) for s in whole.test][-2:] == [(512, 128), (1024, 256)]
    assert [c.label for c in expand_cells(mqar_protocol, ["figure2", "64:4"])] == ["64:4", "128:8", "256:16"]
    with pytest.raises(ValueError, match="T:kv"):
        expand_cells(mqar_protocol, ["256"])
    (parity_cell,) = expand_cells(get_protocol("parity"), ["64"])
    assert [(s.args["seq_len"], s.primary) for s in parity_cell.test] == [(64, True), (128, False), (256, False)]
    assert parity_cell.train[0].examples is None  # fresh samples every step
    with pytest.raises(ValueError, match="unknown task"):
        get_protocol("sudoku")


@pytest.mark.parametrize("mixer, kwargs", [("attention", {"n_heads": 2}), ("k2", {"rank": 4})])
def test_task_model_is_causal(mixer, kwargs):
    torch.manual_seed(0)
    config = TaskModelConfig(vocab_size=20, mixer=mixer, d_model=16, n_layers=2, context_length=24,
                             mixer_kwargs=kwargs, mlp_ratio=0, short_conv=3)
    model = TaskModel(config).eval()
    assert not any("mlp" in name for name, _ in model.named_parameters())
    idx = torch.randint(20, (2, 24))
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 20
    with torch.no_grad():
        hidden, hidden_changed = model(idx), model(changed)
    assert torch.allclose(hidden[:, :15], hidden_changed[:, :15], atol=1e-6)
    assert not torch.allclose(hidden[:, 15:], hidden_changed[:, 15:])
    assert model.logits(hidden).shape == (2, 24, 20)
    with_mlp = TaskModel(TaskModelConfig(vocab_size=20, mixer=mixer, d_model=16, context_length=24,
                                         mixer_kwargs=kwargs, mlp_ratio=2, position_embedding=True))
    assert with_mlp.num_parameters() > model.num_parameters()


def _tiny_specs(task, cells, mixers=("attention",), lrs=(3e-3,), seeds=(0,), **settings):
    protocol = get_protocol(task)
    base = dict(batch_size=16, test_batch_size=64, epochs=protocol.epochs, max_steps=8, eval_interval=4,
                warmup_steps=2, weight_decay=0.1, grad_clip=1.0, target=0.99, device="cpu", data_seed=0)
    return runner.build_specs(protocol, expand_cells(protocol, cells), list(mixers), [16], list(lrs), list(seeds),
                              runner.default_recipe(protocol), {**base, **settings}, dict(protocol.fixed))


def test_train_run_records_the_run():
    (spec,) = _tiny_specs("parity", ["8"])
    evals = []
    result = train_run(spec, report=evals.append)
    assert [e["step"] for e in evals] == [4, 8] and result["steps"] == 8 and result["stopped"] == "max_steps"
    assert result["accuracy"] == max(e["accuracy"] for e in evals)
    assert result["params"] > 0 and result["lr"] == 3e-3 and result["wall_s"] > 0
    assert [(s["label"], s["primary"]) for s in result["test"]] == [("T=8", True), ("T=16", False), ("T=32", False)]
    assert json.loads(json.dumps(result)) == result  # JSON-ready


# --- the report ---------------------------------------------------------------------------------


def _fake_result(lr, seed, accuracy, d_model=64, model="attention L2 conv3"):
    return {
        "run_id": f"r-{model}-{d_model}-{lr}-{seed}", "task": "mqar", "cell": "256:16", "model": model,
        "d_model": d_model, "lr": lr, "seed": seed, "accuracy": accuracy, "params": 1000, "steps": 100,
        "stopped": "target" if accuracy >= 0.99 else "max_steps", "wall_s": 1.0,
        "test": [{"label": "T=256 kv=16", "axes": {"T": 256, "kv": 16}, "primary": True, "accuracy": accuracy}],
    }


def test_report_takes_the_best_lr_and_the_seeds_spread(tmp_path):
    results = [_fake_result(1e-3, 0, 0.5), _fake_result(1e-3, 1, 0.7),
               _fake_result(1e-2, 0, 0.99), _fake_result(1e-2, 1, 0.95),
               _fake_result(1e-2, 0, 0.3, d_model=128)]
    rows = report.summarize(results)["rows"]
    assert [(row["d_model"], row["lr"]) for row in rows] == [(64, 1e-2), (128, 1e-2)]
    accuracy = rows[0]["accuracy"]
    assert accuracy["n"] == 2 and accuracy["mean"] == pytest.approx(0.97)
    assert accuracy["std"] == pytest.approx(math.sqrt(2) * 0.02) and accuracy["min"] == 0.95
    assert rows[0]["solved"] == 1 and rows[0]["lrs"] == [1e-3, 1e-2]
    for result in results:
        path = tmp_path / runner.RUNS_DIR / f"{result['run_id']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result))
    written = report.write_report(tmp_path)
    assert {p.name for p in written} >= {"summary.md", "summary.json", "mqar_acc_vs_d_model.png", "mqar_acc_vs_T.png"}
    row = "| mqar | 256:16 | attention L2 conv3 | 64 | 1,000 | 0.01 (2) | 2 | 0.9700 ± 0.0283"
    assert row in (tmp_path / "summary.md").read_text()


# --- linmix synth -------------------------------------------------------------------------------

SMOKE = ["--task", "mqar", "--mixers", "attention,k2", "--mixer-kwargs", "k2:rank=4", "--d-model", "32",
         "--lr", "1e-2", "--seeds", "0", "--cells", "64:4", "--task-arg", "vocab_size=256", "--batch-size", "64",
         "--max-steps", "200", "--eval-interval", "50", "--target", "0.95", "--device", "cpu"]


def test_synth_smoke_grid_end_to_end(tmp_path, capsys):
    """Attention learns MQAR (T = 64, kv = 4) within 200 steps; k2 runs; a second call reruns nothing."""
    out = tmp_path / "sweep"
    assert synth([*SMOKE, "--parallel", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs: 0 already finished, 2 to run" in printed and "runs per device-minute" in printed
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_mixer = {r["mixer"]: r for r in results}
    assert sorted(by_mixer) == ["attention", "k2"]
    assert by_mixer["attention"]["accuracy"] > 0.9  # chance is 1/128
    for result in results:
        assert result["params"] > 0 and result["steps"] <= 200 and result["wall_s"] > 0 and result["lr"] == 1e-2
        assert result["test"][0]["axes"] == {"T": 64, "kv": 4} and result["workers"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert {row["model"] for row in summary["rows"]} == {"attention L2 conv3", "k2[rank=4] L2 conv3"}
    assert "| mqar | 64:4 | attention L2 conv3 | 32 |" in (out / "summary.md").read_text()
    for name in ("mqar_acc_vs_d_model.png", "mqar_acc_vs_T.png", "mqar_acc_vs_kv.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert synth([*SMOKE, "--parallel", "2", "--out", str(out)]) == 0
    assert "2 runs: 2 already finished, 0 to run" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_synth_plan_and_budget(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ["--mixers", "attention", "--d-model", "16", "--lr", "1e-2", "--cells", "128:8",
            "--task-arg", "vocab_size=256", "--batch-size", "16", "--device", "cpu", "--out", str(out)]
    assert synth([*grid, "--plan", "--probe-steps", "2", "--budget-minutes", "30"]) == 0
    printed = capsys.readouterr().out
    assert "worst-case run min" in printed and "fits 1 of the 1 pending runs" in printed
    plan = json.loads((out / "plan.json").read_text())
    (config,) = plan["configs"]
    assert plan["pending"] == 1 and config["max_steps"] == 32 * 20_000 // 16 and config["step_s"] > 0
    assert synth([*grid, "--max-steps", "100000", "--epochs", "100000", "--budget-minutes", "0.01"]) == 0
    assert "stopped at the budget of 0.0 min: 1 runs left" in capsys.readouterr().out
    assert not (out / runner.RUNS_DIR).exists()


def test_failed_run_is_reported_and_not_recorded(tmp_path):
    (spec,) = _tiny_specs("parity", ["8"])
    spec["mixer_kwargs"] = {"no_such_field": 1}  # fails in the worker
    lines = []
    outcome = runner.run_grid([spec], tmp_path, echo=lines.append)
    assert outcome["failed"] == 1 and outcome["finished"] == 0
    assert any(line.startswith("[failed]") and "no_such_field" in line for line in lines)
    assert not (tmp_path / runner.RUNS_DIR).exists()
    assert "no_such_field" in (tmp_path / runner.LOGS_DIR / "worker-0.log").read_text()


@pytest.mark.parametrize("flags, needle", [
    (["--cells", "256"], "is not of the form T:kv"),
    (["--cells", "65:4"], "cell 65:4: seq_len must be even"),
    (["--mixers", "nosuch"], "unknown mixer 'nosuch'"),
    (["--task-arg", "vocab=3"], "--task-arg ['vocab']: task mqar takes"),
    (["--parallel", "0"], "--parallel must be >= 1"),
    (["--mixer-kwargs", "k2:rank=4"], "--mixer-kwargs names ['k2']"),
    (["--mixer-kwargs", "attention:n_heads=3", "--d-model", "64"], "multiple of n_heads=3"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--target", "2"], "--"),
])
def test_synth_usage_errors(tmp_path, capsys, flags, needle):
    assert synth(["--mixers", "attention", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linmix synth: error: ") and needle in err and err.count("\n") == 1
