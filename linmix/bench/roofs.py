"""The roofline's peaks, looked up by the GPU's name (``torch.cuda.get_device_name``).

Datasheet peaks, dense (no 2:4 sparsity): bf16/fp16 on the tensor cores; fp32 without them
(PyTorch's float32 matrix products use no TF32 unless asked); HBM bandwidth. Names are matched
exactly: another GPU (or a MIG slice, whose share of the chip differs) gets no roofline until
``--peak-tflops`` and ``--peak-gbps`` give one, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuPeaks:
    """A GPU's datasheet peaks.

    Attributes:
        tflops: dtype name ("bf16", "fp16", "fp32") -> dense TFLOP/s.
        gbps: memory bandwidth in GB/s.
    """

    tflops: dict[str, float]
    gbps: float


def _peaks(half: float, single: float, gbps: float) -> GpuPeaks:
    return GpuPeaks({"bf16": half, "fp16": half, "fp32": single}, gbps)


H100_SXM = _peaks(989.4, 66.9, 3350.0)  # H100 SXM5 80 GB, HBM3
A100 = (312.0, 19.5)  # every A100: dense bf16/fp16 and fp32 TFLOP/s
GPU_PEAKS: dict[str, GpuPeaks] = {
    "NVIDIA H100 80GB HBM3": H100_SXM,
    "NVIDIA H100 PCIe": _peaks(756.5, 51.2, 2000.0),  # HBM2e
    "NVIDIA H100 NVL": _peaks(835.5, 60.0, 3900.0),  # 94 GB HBM3
    "NVIDIA H200": GpuPeaks(H100_SXM.tflops, 4800.0),  # the H100 SXM's compute, 141 GB HBM3e
    "NVIDIA A100-SXM4-40GB": _peaks(*A100, 1555.0),  # HBM2
    "NVIDIA A100-SXM4-80GB": _peaks(*A100, 2039.0),  # HBM2e
    "NVIDIA A100-PCIE-40GB": _peaks(*A100, 1555.0),
    "NVIDIA A100 80GB PCIe": _peaks(*A100, 1935.0),
}


@dataclass(frozen=True)
class Roofs:
    """The peaks a benchmark compares against, and where they came from.

    Attributes:
        tflops: the compute roof in TFLOP/s, or None.
        gbps: the memory roof in GB/s, or None.
        source: where each came from, or why there is none.
    """

    tflops: float | None
    gbps: float | None
    source: str

    def describe(self) -> str:
        """``"roofs: 989.4 TFLOP/s and 4800 GB/s (the NVIDIA H200 datasheet)"``, or why there are none."""
        if self.tflops and self.gbps:
            return f"roofs: {self.tflops:g} TFLOP/s and {self.gbps:g} GB/s ({self.source})"
        return f"roofs: {self.source}"


def roofs_for(gpu: str | None, dtype: str, peak_tflops: float | None = None, peak_gbps: float | None = None) -> Roofs:
    """The roofs of a run: the overrides where given, else the datasheet peaks of ``gpu``.

    Args:
        gpu: ``torch.cuda.get_device_name`` of the device, or None on the CPU.
        dtype: "bf16", "fp16" or "fp32": which compute peak.
        peak_tflops: ``--peak-tflops``, or None.
        peak_gbps: ``--peak-gbps``, or None.

    Returns:
        the Roofs; a roof is None where neither an override nor the table gives it.
    """
    peaks = GPU_PEAKS.get(gpu) if gpu else None
    tflops = peak_tflops or (peaks.tflops[dtype] if peaks else None)
    gbps = peak_gbps or (peaks.gbps if peaks else None)
    datasheet = f"the {gpu} datasheet"
    origins = [flag if given else datasheet
               for flag, given in (("--peak-tflops", peak_tflops), ("--peak-gbps", peak_gbps))]
    if tflops and gbps:
        source = origins[0] if origins[0] == origins[1] else f"{origins[0]}, {origins[1]}"
        return Roofs(tflops, gbps, source)
    missing = " and ".join(flag for flag, roof in (("--peak-tflops", tflops), ("--peak-gbps", gbps)) if not roof)
    where = f"unknown GPU {gpu!r}" if gpu else "no datasheet on the CPU"
    return Roofs(tflops, gbps, f"{where}; pass {missing}")


def find_roofs(device: torch.device, dtype: str, peak_tflops: float | None = None,
               peak_gbps: float | None = None) -> Roofs:
    """``roofs_for`` the GPU of ``device`` (none on the CPU)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return roofs_for(gpu, dtype, peak_tflops, peak_gbps)
