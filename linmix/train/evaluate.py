"""Validation protocols: the full non-overlapping pass and nanoGPT's random-batch estimate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from linmix.data.batches import RandomWindowSampler, count_eval_windows, iter_eval_windows
from linmix.train.distributed import gather_from_ranks, process_rank, process_world_size

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
    spread: bool = False,
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
        spread: share the batches out over the ranks of the process group (call it on every
            rank); the result is the same as one process's, to the bit.

    Returns:
        `{"loss": summed NLL / tokens, "ppl": exp(loss), "tokens": number of predicted tokens}`.
        The model is in eval mode meanwhile and gets its previous mode back.
    """
    device = torch.device(device) if device is not None else model_device(model)
    num_windows = windows or count_eval_windows(len(val_tokens), context_length)
    num_batches = math.ceil(num_windows / batch_size)
    batches = iter_eval_windows(val_tokens, context_length, batch_size, windows)
    losses = _batch_losses(model, batches, num_batches, device, on_batch, spread)
    total_nll = 0.0
    total_tokens = 0
    for loss, tokens in losses:
        total_nll += loss * tokens
        total_tokens += tokens
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
    spread: bool = False,
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
        spread: share the batches out over the ranks of the process group (call it on every
            rank, with equally seeded generators); the result is the same as one process's, to
            the bit.

    Returns:
        `{"loss": mean batch loss, "ppl": exp(loss)}`. The model is in eval mode meanwhile and gets
        its previous mode back.
    """
    device = torch.device(device) if device is not None else model_device(model)
    sampler = RandomWindowSampler(val_tokens, batch_size, context_length, generator)
    batches = (sampler.sample() for _ in range(iters))  # each [B, W]
    total = 0.0
    for loss, _ in _batch_losses(model, batches, iters, device, on_batch, spread):
        total += loss
    mean_loss = total / iters
    return {"loss": mean_loss, "ppl": math.exp(mean_loss)}


def _batch_losses(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    device: torch.device,
    on_batch: BatchCallback | None,
    spread: bool,
) -> list[tuple[float, int]]:
    """Each batch's mean loss and predicted-token count, in batch order, in eval mode.

    Spread over N ranks, rank r runs batches r, r + N, r + 2N, ... (every rank still draws every
    batch, so the random protocol's windows stay those of one process); a rank left without a
    batch in the last round runs batch 0 again and drops its loss, so that every rank makes the
    same forward passes (FSDP2 gathers the weights in each). The losses are then gathered from
    every rank.
    """
    rank, world_size = (process_rank(), process_world_size()) if spread else (0, 1)
    rounds = math.ceil(num_batches / world_size)
    was_training = model.training
    model.eval()
    mine: dict[int, tuple[float, int]] = {}
    try:
        for index, (x, y) in enumerate(batches):
            if index == 0:
                first = (x, y)
            if index % world_size != rank:
                continue
            mine[index] = (_mean_loss(model, x, y, device), y.numel())
            if on_batch is not None:
                on_batch(min(index - rank + world_size, num_batches), num_batches)
        if len(mine) < rounds:
            _mean_loss(model, *first, device)
    finally:
        model.train(was_training)
    parts = gather_from_ranks(mine) if spread else [mine]
    losses = {index: value for part in parts for index, value in part.items()}
    return [losses[index] for index in range(num_batches)]


def _mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """The model's mean loss on one batch `x, y` (`[b, W]` each), moved to `device`."""
    with autocast_for(device):
        _, loss = model(x.to(device), y.to(device))
    return loss.item()


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


def plan_evaluation(config, val_tokens: int, context_length: int, world_size: int = 1) -> EvalPlan:
    """Size each evaluation of a run so that all of them read at most `eval_budget` times the
    windows the run trains on (over all ranks: runs of the same global batch get the same plan).

    Without a budget (`eval_budget=None`), or when the protocols fit in it, every evaluation reads
    the whole protocols: all non-overlapping windows (full) and `eval_random_iters` batches of
    `eval_batch_size` windows (random). Otherwise both shrink by the same factor, to at least one
    window each: the full protocol reads windows spread evenly over the split, the random one fewer
    batches (one smaller batch below a whole one).

    Args:
        config: the run's TrainConfig.
        val_tokens: length of the validation stream.
        context_length: window length, W.
        world_size: processes training, each on `config.batch_size` windows per step.

    Returns:
        The plan; the evaluation records and the log say what it cut.
    """
    evaluations = count_evaluations(config.max_steps, config.eval_interval)
    full_available = count_eval_windows(val_tokens, context_length)
    full = full_available if "full" in config.eval_protocols else 0
    random = config.eval_random_iters * config.eval_batch_size if "random" in config.eval_protocols else 0
    wanted = evaluations * (full + random)
    budget = None if config.eval_budget is None else max(1, int(config.eval_budget * config.max_steps
                                                              * config.batch_size * world_size))
    scale = 1.0 if budget is None or wanted <= budget else budget / wanted
    full = max(1, int(full * scale)) if full else 0
    random_windows = max(1, int(random * scale)) if random else 0
    batch_size = min(config.eval_batch_size, random_windows) if random else config.eval_batch_size
    return EvalPlan(context_length=context_length, evaluations=evaluations, full_windows=full,
                    full_available=full_available, random_batches=random_windows // batch_size if random else 0,
                    random_batch_size=batch_size, wanted_windows=wanted, budget_windows=budget)
