"""Validation protocols: the full non-overlapping pass and nanoGPT's random-batch estimate."""

from __future__ import annotations

import contextlib
import math

import torch

from linmix.data.batches import RandomWindowSampler, iter_eval_windows


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

    Returns:
        `{"loss": summed NLL / tokens, "ppl": exp(loss), "tokens": number of predicted tokens}`.
        The model is in eval mode meanwhile and gets its previous mode back.
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for x, y in iter_eval_windows(val_tokens, context_length, batch_size):
            x, y = x.to(device), y.to(device)  # [b, W]
            with autocast_for(device):
                _, loss = model(x, y)
            total_nll += loss.item() * y.numel()
            total_tokens += y.numel()
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
        for _ in range(iters):
            x, y = sampler.sample()  # [B, W]
            with autocast_for(device):
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
    finally:
        model.train(was_training)
    mean_loss = total / iters
    return {"loss": mean_loss, "ppl": math.exp(mean_loss)}
