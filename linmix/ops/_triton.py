"""Launch helpers shared by the Triton backends of the ops."""

import contextlib
import os

import torch


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current one while launching (Triton launches on the current device).

    CPU tensors are accepted only under Triton's interpreter (``TRITON_INTERPRET=1``).

    Raises:
        ValueError: ``x`` is not on a CUDA device and the interpreter is off.
    """
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors, got {x.device} (TRITON_INTERPRET=1 runs it on the CPU)")
    return contextlib.nullcontext()
