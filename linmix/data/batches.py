"""Batches of next-token windows cut from a 1-D token stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _check_stream(tokens: torch.Tensor, context_length: int, batch_size: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D tensor, got {shape}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(tokens) < context_length + 1:
        raise ValueError(
            f"tokens has {len(tokens)} ids, fewer than context_length + 1 = {context_length + 1}"
        )
    return tokens.long()


class RandomWindowSampler:
    """Draws batches of windows at uniformly random offsets, with replacement.

    Each window is `T + 1` consecutive tokens: the first `T` are the input, the last `T` the
    targets. All randomness comes from `generator`, whose state `state_dict` saves, so a run can be
    resumed exactly. The offsets are drawn on the generator's device and the windows are cut on
    `device`: a training run keeps its stream on the GPU and cuts every batch there, with no
    host-side gather and no host-to-device copy of the batch.

    Args:
        tokens: the token stream, `[N]` integer tensor.
        batch_size: windows per batch, B.
        context_length: tokens per window, T.
        generator: the torch.Generator that picks offsets (usually a CPU one).
        device: where the stream is kept and the batches are returned; None keeps the tokens' device.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        context_length: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> None:
        tokens = _check_stream(tokens, context_length, batch_size)
        self.tokens = tokens.to(device) if device is not None else tokens  # [N]
        self.batch_size = batch_size
        self.context_length = context_length
        self.generator = generator
        self._windows = self.tokens.unfold(0, context_length + 1, 1)  # [N - T, T + 1], a view

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one batch.

        Returns:
            `(x, y)`, each `[B, T]` long, with `y[:, t] == x[:, t + 1]` for `t < T - 1` and
            `y[:, T - 1]` the token after the window.
        """
        num_offsets = len(self.tokens) - self.context_length  # offsets 0 .. N - T - 1
        offsets = torch.randint(
            num_offsets, (self.batch_size,), generator=self.generator, device=self.generator.device
        )  # [B]
        windows = self._windows[offsets.to(self.tokens.device)]  # [B, T + 1]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """The generator state, for exact resumption.

        Returns:
            `{"generator": ByteTensor}`.
        """
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by `state_dict`.

        Args:
            state: the dict `state_dict` returned.
        """
        self.generator.set_state(state["generator"])


def count_eval_windows(num_tokens: int, context_length: int) -> int:
    """How many full non-overlapping windows `iter_eval_windows` yields from a stream.

    Args:
        num_tokens: length of the token stream.
        context_length: window length, W.

    Returns:
        `(num_tokens - 1) // W`: each window needs W inputs and the one target after them.
    """
    return max(num_tokens - 1, 0) // context_length


def iter_eval_windows(
    tokens: torch.Tensor, context_length: int, batch_size: int, windows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a stream into non-overlapping windows, in order, and batch them.

    Window i is `tokens[i*W : i*W + W]` with targets `tokens[i*W + 1 : i*W + W + 1]`; a trailing
    partial window is dropped. Every token of the stream but the first is predicted at most once.

    Args:
        tokens: the token stream, `[N]` integer tensor.
        context_length: window length, W.
        batch_size: windows per batch (the last batch may hold fewer).
        windows: read only this many of the windows, spread evenly over the stream (window
            `floor(j * n / windows)` for j < windows); None reads all `n` of them.

    Yields:
        `(x, y)`, each `[b, W]` long with `b <= batch_size`.
    """
    tokens = _check_stream(tokens, context_length, batch_size)
    num_windows = count_eval_windows(len(tokens), context_length)
    covered = num_windows * context_length
    inputs = tokens[:covered].view(num_windows, context_length)  # [n, W]
    targets = tokens[1 : covered + 1].view(num_windows, context_length)  # [n, W]
    if windows is not None:
        if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= num_windows:
            raise ValueError(f"windows must be an integer in [1, {num_windows}] or None, got {windows!r}")
        chosen = torch.arange(windows) * num_windows // windows  # [windows], evenly spread
        inputs, targets = inputs[chosen], targets[chosen]
    for start in range(0, len(inputs), batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]
