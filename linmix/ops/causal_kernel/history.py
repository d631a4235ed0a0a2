"""The state of a causal kernel, shared by every backend: the inputs it still reads.

A backend core maps inputs from position 0 to outputs, in one of two layouts: the dense form's
``(x [B, T, F], kernel [W, W])`` and the Toeplitz form's ``(x [B, T, H, D], kernel [H, L])``.
``with_history`` turns such cores into a backend of ``causal_kernel``: it brings the caller's layout
to the core's, prepends the state (the inputs before ``x``) and drops their outputs, and keeps the
inputs the next call needs as the final state.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from linmix.ops._dispatch import compute_dtype

Core = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _apply(core: Core, x: torch.Tensor, kernel: torch.Tensor, form: str) -> torch.Tensor:
    """``core`` on ``x`` (``[B, T, D]`` or ``[B, T, H, D]``) in the core's layout; the output shaped like ``x``."""
    B, T = x.shape[:2]
    if form == "dense":
        y = core(x.reshape(B, T, -1), kernel)  # [B, T, F], F = all channels
    elif kernel.dim() == 1:
        y = core(x.reshape(B, T, 1, -1), kernel[None])  # one head holding all channels
    else:
        y = core(x, kernel)  # [B, T, H, D]
    return y.reshape(x.shape)


def final_history(inputs: torch.Tensor, kernel: torch.Tensor, form: str) -> torch.Tensor:
    """The state after ``inputs`` (every input from position 0): the last ``L - 1`` (zeros before
    position 0) for the Toeplitz form, all of them for the dense form; in the compute dtype."""
    if form == "toeplitz":
        keep = kernel.shape[-1] - 1
        padded = F.pad(inputs, (0, 0) * (inputs.dim() - 2) + (max(0, keep - inputs.shape[1]), 0))
        inputs = padded[:, padded.shape[1] - keep:]
    return inputs.to(compute_dtype(inputs.dtype))


def with_history(cores: dict[str, Core]) -> Callable:
    """A ``causal_kernel`` backend from its core of each form it supports.

    Args:
        cores: form (``"dense"``, ``"toeplitz"``) -> core map in that form's layout.

    Returns:
        ``backend(x, kernel, form, initial_state, output_final_state) -> (y, final_state)``.
    """

    def backend(x: torch.Tensor, kernel: torch.Tensor, form: str, initial_state: torch.Tensor | None,
                output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        past = 0 if initial_state is None else initial_state.shape[1]
        inputs = x if past == 0 else torch.cat([initial_state.to(x.dtype), x], dim=1)  # [B, P + T, ...]
        y = _apply(cores[form], inputs, kernel, form)[:, past:]
        return y, (final_history(inputs, kernel, form) if output_final_state else None)

    return backend
