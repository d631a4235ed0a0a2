"""Evaluation in proportion to the run: `plan_evaluation` and the windows it has the protocols read."""

import pytest
import torch

from linmix.data import count_eval_windows, iter_eval_windows
from linmix.models import PRESETS
from linmix.train import TrainConfig
from linmix.train.evaluate import count_evaluations, plan_evaluation

VAL_TOKENS = 111_540  # Tiny Shakespeare's validation split
T = 256


def test_evaluations_are_step_0_every_interval_and_the_last_step():
    assert count_evaluations(3500, 250) == 15
    assert count_evaluations(3, 250) == 2
    assert count_evaluations(500, 250) == 3
    assert count_evaluations(501, 250) == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_presets_own_recipe_evaluates_the_whole_protocols(name):
    """The budget never cuts a preset's full recipe: its published numbers keep their protocols."""
    config = TrainConfig.from_dict(PRESETS[name].train)
    window = PRESETS[name].model_config().context_length
    plan = plan_evaluation(config, VAL_TOKENS, window)
    assert not plan.capped
    assert plan.full_windows == count_eval_windows(VAL_TOKENS, window)
    assert plan.windows("random") == config.eval_random_iters * config.eval_batch_size


def test_a_few_step_run_reads_at_most_its_budget():
    config = TrainConfig(max_steps=3, warmup_steps=3)  # 3 x 64 windows trained
    plan = plan_evaluation(config, VAL_TOKENS, T)
    assert plan.capped and plan.evaluations == 2
    assert plan.evaluations * (plan.windows("full") + plan.windows("random")) <= 3 * 64
    assert plan.full_windows >= 1 and plan.random_batches >= 1
    assert "eval_budget" in plan.describe() and "x2" in plan.describe()


def test_both_protocols_shrink_by_the_same_factor():
    config = TrainConfig(max_steps=100, warmup_steps=10, batch_size=10, eval_interval=50, eval_random_iters=100,
                         eval_batch_size=10, eval_budget=0.5)
    plan = plan_evaluation(config, 10 * T + 1, T)  # 10 full windows, 1000 random ones per evaluation
    wanted = plan.evaluations * (10 + 1000)
    assert plan.budget_windows == 500 and plan.wanted_windows == wanted
    assert plan.full_windows == max(1, int(10 * 500 / wanted))
    assert plan.windows("random") == pytest.approx(1000 * 500 / wanted, abs=plan.random_batch_size)


def test_no_budget_reads_everything():
    plan = plan_evaluation(TrainConfig(max_steps=3, warmup_steps=3, eval_budget=None), VAL_TOKENS, T)
    assert not plan.capped and plan.random_batches == 200 and plan.full_windows == 435


def test_eval_budget_must_be_positive():
    with pytest.raises(ValueError, match="eval_budget"):
        TrainConfig(eval_budget=0)


def test_a_window_subset_is_spread_over_the_stream():
    tokens = torch.arange(101)  # 10 windows of 10
    starts = [int(x[0, 0]) for x, _ in iter_eval_windows(tokens, 10, batch_size=1, windows=4)]
    assert starts == [0, 20, 50, 70]
    assert sum(len(x) for x, _ in iter_eval_windows(tokens, 10, batch_size=3)) == 10
    with pytest.raises(ValueError, match="windows"):
        next(iter_eval_windows(tokens, 10, batch_size=3, windows=11))


def test_the_trainer_reads_what_the_plan_says_and_shows_progress(tmp_path, capsys):
    """A 4-step run under a budget: every eval record names the windows read, timed per protocol, and the
    log's first line is the plan."""
    from _toy_model import ToyCausalLM, ToyConfig

    from linmix.train import Trainer, read_metrics

    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (20_000,))
    config = TrainConfig(max_steps=4, warmup_steps=1, batch_size=4, context_length=32, eval_interval=2,
                         eval_batch_size=8, eval_random_iters=50, out_dir=str(tmp_path))
    model = ToyCausalLM(ToyConfig(vocab_size=16))
    trainer = Trainer(model, tokens[:15_000], tokens[15_000:], config, progress=True)
    trainer.fit()
    plan = trainer.eval_plan
    assert plan.capped and plan.evaluations == 3
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for record in evals:
        assert record["val_windows_full"] == plan.full_windows and record["val_tokens_full"] == plan.full_windows * 32
        assert record["val_windows_random"] == plan.windows("random")
        assert set(record["eval_s"]) == {"full", "random"}
    assert sum(plan.windows(p) for p in ("full", "random")) * 3 <= 4 * 4
    assert plan.describe() in capsys.readouterr().out
