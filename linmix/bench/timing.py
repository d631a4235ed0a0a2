"""Timers: the median and 20/80% quantiles of a function's run time, warm-up excluded.

On CUDA the work is timed by ``triton.testing.do_bench`` when triton is installed, else by CUDA
events around each call; both clear the L2 cache before every timed call. On the CPU
``time.perf_counter`` times each call (for tests and smoke checks on small shapes). Every timer
first calls the function a few times (autotuning, compilation, allocator warm-up), then for about
``warmup_ms``, then times about ``rep_ms`` worth of calls; the gradients of ``grad_to_none`` are
reset to None before every call so that a backward does not accumulate into them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
WARMUP_CALLS = 5  # calls before any timing, like fla's autotune warm-up
ESTIMATE_CALLS = 5  # calls that estimate one call's time, to size the warm-up and the timed reps
L2_FLUSH_BYTES = 256 * 1024 * 1024  # written before each timed CUDA call to evict the L2 cache


@dataclass(frozen=True)
class Timing:
    """Run-time statistics of one function, in milliseconds.

    Attributes:
        median_ms: the median time of a call.
        p20_ms: the 20% quantile.
        p80_ms: the 80% quantile.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float


def timer_name(device: torch.device) -> str:
    """Which timer ``measure`` uses on ``device``."""
    if device.type != "cuda":
        return "time.perf_counter"
    if importlib.util.find_spec("triton") is not None:
        return "triton.testing.do_bench"
    return "CUDA events"


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times_ms: Sequence[float]) -> Timing:
    times = torch.tensor(times_ms, dtype=torch.float64)
    return Timing(*times.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def _cpu_times(fn: Callable[[], object], calls: int, grad_to_none: Sequence[torch.Tensor]) -> list[float]:
    """Wall-clock milliseconds of ``calls`` calls, one by one."""
    times = []
    for _ in range(calls):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _cuda_event_times(fn: Callable[[], object], calls: int, grad_to_none: Sequence[torch.Tensor],
                      device: torch.device) -> list[float]:
    """GPU milliseconds of ``calls`` calls between CUDA events, the L2 cache cleared before each."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for start, end in zip(starts, ends):
        _clear_grads(grad_to_none)
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Time ``fn`` on ``device``; warm-up calls are excluded.

    Args:
        fn: the work to time, with its inputs already built.
        device: where ``fn`` runs; CUDA work is timed on the GPU.
        warmup_ms: about how long to run ``fn`` before timing.
        rep_ms: about how long the timed calls take together (at least one call).
        grad_to_none: tensors whose ``.grad`` is set to None before every call.

    Returns:
        the median and 20/80% quantiles of one call's time.
    """
    # Timers record events on the current GPU, so the one doing the work is made current.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(WARMUP_CALLS):
            _clear_grads(grad_to_none)
            fn()
        _synchronize(device)
        if timer_name(device) == "triton.testing.do_bench":
            from triton.testing import do_bench

            return Timing(*do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                    quantiles=list(QUANTILES)))
        if device.type == "cuda":
            def times(calls: int) -> list[float]:
                return _cuda_event_times(fn, calls, grad_to_none, device)
        else:
            def times(calls: int) -> list[float]:
                return _cpu_times(fn, calls, grad_to_none)
        estimate_ms = max(sum(times(ESTIMATE_CALLS)) / ESTIMATE_CALLS, 1e-6)
        times(max(1, round(warmup_ms / estimate_ms)))
        return _summary(times(max(1, round(rep_ms / estimate_ms))))
