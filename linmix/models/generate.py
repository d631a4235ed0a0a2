"""Autoregressive sampling with any linmix language model."""

import math

import torch
from torch import nn


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """Draw one token per row from logits [B, V]; temperature 0 means greedy. Returns [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend prompt [B, T0] by `max_new_tokens` sampled tokens. Returns [B, T0 + n].

    Decodes with the model's recurrent state (`prefill` then `step`) while the sequence fits its
    window. Models with a finite window (dense Kbase, learned positions, KV cache) then continue
    with a sliding window: each new token recomputes the last `window` tokens, as in nanoGPT.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got {list(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    window = model.window
    tokens = prompt if prompt.shape[1] <= window else prompt[:, -int(window) :]
    out = [prompt]
    state = model.init_state(prompt.shape[0], prompt.device, next(model.parameters()).dtype)
    logits, state = model.prefill(tokens, state)
    next_logits = logits[:, -1]
    length = tokens.shape[1]
    for _ in range(max_new_tokens):
        token = sample_next(next_logits, temperature, top_k, generator)
        out.append(token[:, None])
        length += 1
        if length <= window:
            next_logits, state = model.step(token, state)
        else:
            context = torch.cat(out, dim=1)[:, -int(window) :]
            next_logits = model(context)[0][:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)
