"""The correctness gate: a backend is timed only after it computes the target's function.

Each backend runs once on the target's small gate shape in float32, and its output (and, when
fwdbwd is measured, the gradients of every input and parameter) is compared with the target's
reference run in float64 on the same inputs, in relative RMS error ``||ref - out|| / ||ref||``.
Baselines compute another function and are exempt.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linmix.bench.inputs import input_generator, leaf_copies
from linmix.bench.target import BenchTarget, Contender


def relative_rms_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||ref - out||_2 / ||ref||_2`` in float64 (the plain norm of the difference if ``ref`` is 0).

    Returns:
        the error; ``inf`` for a shape mismatch or a non-finite value in ``out``.
    """
    if ref.shape != out.shape or not torch.isfinite(out).all():
        return math.inf
    ref64, out64 = ref.detach().double(), out.detach().double()
    diff = torch.linalg.vector_norm(ref64 - out64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    return diff / norm if norm > 0 else diff


def output_grad(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed random gradient of the output: ``do`` of ``(o * do).sum()``."""
    generator = input_generator(device, salt=1)
    return torch.randn(shape, generator=generator, device=device).to(dtype)


def grad_targets(inputs: dict, prepared: dict) -> dict[str, torch.Tensor]:
    """The tensors a backward fills: inputs that require grad, and parameters of prepared layers."""
    targets = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor) and value.requires_grad}
    for key, value in prepared.items():
        if isinstance(value, nn.Module):
            targets.update({f"{key}.{name}": param for name, param in value.named_parameters()})
    return targets


def outputs_and_grads(contender: Contender, inputs: dict, with_grads: bool) -> dict[str, torch.Tensor]:
    """The output ``"o"`` of one contender and, with ``with_grads``, every gradient of ``(o * do).sum()``."""
    prepared = contender.prepare(inputs)
    out = contender.run(prepared)
    if not with_grads:
        return {"o": out.detach()}
    targets = grad_targets(inputs, prepared)
    out.backward(output_grad(out.shape, out.dtype, out.device))
    grads = {f"d{key}": (t.grad if t.grad is not None else torch.zeros_like(t)) for key, t in targets.items()}
    return {"o": out.detach(), **grads}


def describe(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, at most 500 characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _compare(contender: Contender, inputs: dict, ref: dict, modes: list[str]) -> dict[str, dict]:
    """The gate results of one contender on float32 copies of the float64 gate inputs."""
    try:
        out = outputs_and_grads(contender, leaf_copies(inputs, torch.float32), "fwdbwd" in modes)
    except Exception as error:  # a backend that refuses these inputs is reported, not raised
        return {mode: {"status": "error", "message": describe(error)} for mode in modes}
    errors = {key: relative_rms_error(ref[key], out.get(key, torch.zeros_like(ref[key]))) for key in ref}
    results = {}
    for mode in modes:
        checked = {key: value for key, value in errors.items() if mode == "fwdbwd" or key == "o"}
        worst = max(checked.values())
        status = "passed" if worst <= contender.tolerance else "failed"
        results[mode] = {"status": status, "tolerance": contender.tolerance, "error": worst, "errors": checked}
    return results


def gate_backends(target: BenchTarget, names: list[str], modes: list[str], device: torch.device) -> dict[str, dict]:
    """Check contenders against the target's reference on its gate shape, float32 against float64.

    Args:
        target: the benchmark target.
        names: the contenders to check; baselines are passed through as "baseline".
        modes: the modes to check ("fwd": the output; "fwdbwd": the output and all gradients).
        device: where everything runs.

    Returns:
        name -> mode -> ``{"status": "passed" | "failed" | "error" | "baseline", "tolerance",
        "error" (largest relative RMS error), "errors" (per tensor), "message" (for "error")}``.
    """
    results = {name: {mode: {"status": "baseline"} for mode in modes}
               for name in names if target.contenders[name].baseline}
    gated = [name for name in names if name not in results]
    if gated:
        try:
            inputs = target.build_inputs(target.gate_shape, torch.float64, device, True)
            ref = outputs_and_grads(target.contenders[target.reference], leaf_copies(inputs), "fwdbwd" in modes)
        except Exception as error:  # without a reference nothing passes
            failure = {"status": "error", "message": f"reference {target.reference} in float64: {describe(error)}"}
            results.update({name: {mode: dict(failure) for mode in modes} for name in gated})
        else:
            results.update({name: _compare(target.contenders[name], inputs, ref, modes) for name in gated})
    return {name: results[name] for name in names}


def gate_backend(target: BenchTarget, name: str, modes: list[str], device: torch.device) -> dict[str, dict]:
    """``gate_backends`` of one contender: mode -> result."""
    return gate_backends(target, [name], modes, device)[name]
