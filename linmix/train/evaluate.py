"""Validation protocols: the full non-overlapping pass and nanoGPT's random-batch estimate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from linmix.data.batches import RandomWindowSampler, count_eval_windows, iter_eval_windows

# Called once per evaluated batch, with the batches done and the batches in all.
BatchCallback = Callable[[int, int], None]


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision used for training and evaluation on a device.

    Args:
        device: where the model runs.

    Returns:
        bf16 autocast on CUDA; a no-op context (float32) elsewhere.
    """
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_full(
    model: torch.nn.Module,
    val_tokens: torch.Tensor,
    context_length: int,
    batch_size: int,
    device: torch.device | str | None = None,
    *,
    windows: int | None = None,
    on_batch: BatchCallback | None = None,
) -> dict[str, float]:
    """Mean NLL over every predicted token of the non-overlapping validation windows.

    Each window of W tokens starts with no context; a trailing partial window is dropped (see
    `iter_eval_windows`). Since all windows have the same length, a batch's summed NLL is its mean
    loss times its token count; sums are kept in float64.

    Args:
        model: returns `(logits, loss)` from `model(idx, targets)`, loss the mean cross-entropy.
        val_tokens: validation stream, `[N]` integer tensor.
        context_length: window length, W.
        batch_size: windows per forward pass.
        device: where batches go; None uses the model's device.
        windows: read only this many windows, spread evenly over the split (None: all of them).
        on_batch: called after each batch with (batches done, batches in all), e.g. for progress.

    Returns:
        `{"loss": summed NLL / tokens, "ppl": exp(loss), "tokens": number of predicted tokens}`.
        The model is in eval mode meanwhile and gets its previous mode back.
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    num_windows = windows or count_eval_windows(len(val_tokens), context_length)
    num_batches = math.ceil(num_windows / batch_size)
    try:
        batches = iter_eval_windows(val_tokens, context_length, batch_size, windows)
        for done, (x, y) in enumerate(batches, start=1):
            x, y = x.to(device), y.to(device)  # [b, W]
            with autocast_for(device):
                _, loss = model(x, y)
            total_nll += loss.item() * y.numel()
            total_tokens += y.numel()
            if on_batch is not None:
                on_batch(done, num_batches)
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {"loss": mean_nll, "ppl": math.exp(mean_nll), "tokens": total_tokens}


@torch.no_grad()
def evaluate_random(
    model: torch.nn.Module,
    val_tokens: torch.Tensor,
    context_length: int,
    batch_size: int,
    iters: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    *,
    on_batch: BatchCallback | None = None,
) -> dict[str, float]:
    """nanoGPT's estimate: the mean of `iters` batch-mean losses over random validation windows.

    Args:
        model: returns `(logits, loss)` from `model(idx, targets)`.
        val_tokens: validation stream, `[N]` integer tensor (CPU).
        context_length: window length, W.
        batch_size: windows per batch.
        iters: number of batches.
        generator: picks the windows; pass a freshly seeded one so that every evaluation of a run
            sees the same windows.
        device: where batches go; None uses the model's device.
        on_batch: called after each batch with (batches done, `iters`), e.g. for progress.

    Returns:
        `{"loss": mean batch loss, "ppl": exp(loss)}`. The model is in eval mode meanwhile and gets
        its previous mode back.
    """
    device = torch.device(device) if device is not None else model_device(model)
    sampler = RandomWindowSampler(val_tokens, batch_size, context_length, generator)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for done in range(1, iters + 1):
            x, y = sampler.sample()  # [B, W]
            with autocast_for(device):
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
            if on_batch is not None:
                on_batch(done, iters)
    finally:
        model.train(was_training)
    mean_loss = total / iters
    return {"loss": mean_loss, "ppl": math.exp(mean_loss)}


@dataclass(frozen=True)
class EvalPlan:
    """What each evaluation of a run reads: windows of the full protocol, batches of the random one.

    Attributes:
        context_length: window length, W.
        evaluations: evaluations in the whole run (step 0, every `eval_interval` steps, the last step).
        full_windows: windows the full protocol reads per evaluation (0: the protocol is not run).
        full_available: the validation split's non-overlapping windows.
        random_batches: batches the random protocol reads per evaluation (0: not run).
        random_batch_size: windows per batch of the random protocol.
        wanted_windows: windows all evaluations of the run would read under the whole protocols.
        budget_windows: the run's evaluation budget in windows, None for no budget.
    """

    context_length: int
    evaluations: int
    full_windows: int
    full_available: int
    random_batches: int
    random_batch_size: int
    wanted_windows: int
    budget_windows: int | None

    def windows(self, protocol: str) -> int:
        """Windows one evaluation reads under `protocol` ("full" or "random")."""
        return self.full_windows if protocol == "full" else self.random_batches * self.random_batch_size

    @property
    def capped(self) -> bool:
        """Whether the budget made the protocols read less than they would."""
        return self.budget_windows is not None and self.wanted_windows > self.budget_windows

    def describe(self) -> str:
        """One line: each protocol's reads per evaluation, in windows and tokens, and the budget."""
        W = self.context_length
        parts = []
        if self.full_windows:
            parts.append(f"full {self.full_windows:,} of {self.full_available:,} windows "
                         f"({self.full_windows * W:,} tokens)")
        if self.random_batches:
            parts.append(f"random {self.random_batches:,} x {self.random_batch_size} windows "
                         f"({self.windows('random') * W:,} tokens)")
        line = f"evaluation x{self.evaluations}: " + ", ".join(parts) + " each"
        if self.capped:
            line += (f"; cut to the run's eval_budget of {self.budget_windows * W:,} tokens "
                     "(--eval-budget none reads the whole protocols)")
        return line


def count_evaluations(max_steps: int, eval_interval: int) -> int:
    """Evaluations of a run: at step 0, at every multiple of `eval_interval`, and at `max_steps`."""
    return 1 + max_steps // eval_interval + (max_steps % eval_interval != 0)


def plan_evaluation(config, val_tokens: int, context_length: int) -> EvalPlan:
    """Size each evaluation of a run so that all of them read at most `eval_budget` times the
    windows the run trains on.

    Without a budget (`eval_budget=None`), or when the protocols fit in it, every evaluation reads
    the whole protocols: all non-overlapping windows (full) and `eval_random_iters` batches of
    `eval_batch_size` windows (random). Otherwise both shrink by the same factor, to at least one
    window each: the full protocol reads windows spread evenly over the split, the random one fewer
    batches (one smaller batch below a whole one).

    Args:
        config: the run's TrainConfig.
        val_tokens: length of the validation stream.
        context_length: window length, W.

    Returns:
        The plan; the evaluation records and the log say what it cut.
    """
    evaluations = count_evaluations(config.max_steps, config.eval_interval)
    full_available = count_eval_windows(val_tokens, context_length)
    full = full_available if "full" in config.eval_protocols else 0
    random = config.eval_random_iters * config.eval_batch_size if "random" in config.eval_protocols else 0
    wanted = evaluations * (full + random)
    budget = None if config.eval_budget is None else max(1, int(config.eval_budget * config.max_steps
                                                              * config.batch_size))
    scale = 1.0 if budget is None or wanted <= budget else budget / wanted
    full = max(1, int(full * scale)) if full else 0
    random_windows = max(1, int(random * scale)) if random else 0
    batch_size = min(config.eval_batch_size, random_windows) if random else config.eval_batch_size
    return EvalPlan(context_length=context_length, evaluations=evaluations, full_windows=full,
                    full_available=full_available, random_batches=random_windows // batch_size if random else 0,
                    random_batch_size=batch_size, wanted_windows=wanted, budget_windows=budget)
