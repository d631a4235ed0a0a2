"""Shared assertions for the test suite."""

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 1e-6) -> None:
    """Assert that ``out`` matches ``ref`` in relative RMS error (flash-linear-attention style).

    Passes when the largest absolute difference is at most ``atol``, or otherwise when
    ``||ref - out||_2 / ||ref||_2 <= ratio``. Fails on a shape mismatch and on any NaN or
    infinity in either tensor. Both tensors are compared in float64 on the CPU.

    Args:
        name: what is compared, used in the failure message.
        ref: the reference tensor.
        out: the tensor under test.
        ratio: largest allowed relative RMS error.
        atol: largest absolute difference that passes outright.
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    ref64 = ref.detach().to("cpu", torch.float64)
    out64 = out.detach().to("cpu", torch.float64)
    for label, tensor in (("reference", ref64), ("output", out64)):
        if not torch.isfinite(tensor).all():
            raise AssertionError(f"{name}: the {label} holds NaN or infinite values")
    diff = ref64 - out64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    ref_norm = torch.linalg.vector_norm(ref64).item()
    diff_norm = torch.linalg.vector_norm(diff).item()
    rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else float("inf"))
    if max_abs <= atol or rel <= ratio:
        return
    raise AssertionError(f"{name}: relative RMS error {rel:.3e} exceeds {ratio:.1e} (max abs error {max_abs:.3e})")


def assert_all_close(ref: dict, out: dict, ratio: float, atol: float = 1e-6) -> None:
    """``assert_close`` on every entry of two result dicts with the same keys."""
    assert ref.keys() == out.keys(), f"results differ in names: {sorted(ref)} vs {sorted(out)}"
    for name, expected in ref.items():
        assert_close(name, expected, out[name], ratio, atol=atol)

