"""What every benchmark shares about its inputs: the dtypes, the seed, leaf copies and their bytes."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUT_SEED = 0  # inputs, output gradients and layer parameters are drawn from this seed


def input_generator(device: torch.device | str, salt: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded from ``INPUT_SEED + salt``: the same inputs in every run."""
    return torch.Generator(device=device).manual_seed(INPUT_SEED + salt)


def leaf_copies(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaves of the inputs' tensors (cast to ``dtype`` if given); plain values unchanged.

    Args:
        inputs: a benchmark's inputs, tensors and plain values by name.
        dtype: the dtype of the copies, or None to keep each tensor's.

    Returns:
        the copies, each requiring grad as its original does.
    """
    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().to(dtype or value.dtype, copy=True).requires_grad_(value.requires_grad)

    return {name: copy(value) for name, value in inputs.items()}


def meta_copies(inputs: dict) -> dict:
    """The inputs with every tensor replaced by an empty one of its shape and dtype on the meta device."""
    return {name: torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()}


def tensor_bytes(value) -> int:
    """Bytes of a tensor, of a module's parameters, or of the tensors and modules in a dict (other values: 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, nn.Module):
        return sum(tensor_bytes(param) for param in value.parameters())
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    return 0
