"""What ``linmix bench`` prints and writes: the table, the summary, per-kernel blocks, JSON, ``--list``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from linmix.bench.layer_entry import LAYER, WIDTH, layer_target
from linmix.bench.machine import machine_line
from linmix.bench.op_entries import op_target
from linmix.bench.roofs import Roofs
from linmix.bench.shapes import shape_label
from linmix.bench.target import BenchTarget
from linmix.layers import MIXERS
from linmix.ops import OPS


def _finite(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    """Write a report as JSON (non-finite numbers as null).

    Args:
        report: from ``run_benchmark`` (or the decode and train benchmarks).
        path: the file; its folder is created.

    Returns:
        the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2) + "\n")
    return path


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _kernel_traffic_cell(row: dict) -> str:
    """``"GB/s (percent of the memory roof)"`` of a backend's own kernel traffic, or "-"."""
    if row.get("kernel_gbps") is None:
        return "-"
    share = row.get("kernel_bandwidth_pct")
    return f"{row['kernel_gbps']:.4g}" + ("" if share is None else f" ({share:.0f}%)")


def format_table(report: dict) -> str:
    """The rows as an aligned text table with one "x vs NAME" column per baseline measured."""
    rows = report["rows"]
    ratio_names = list(dict.fromkeys(name for row in rows for name in row["vs"]))
    with_traffic = any(row.get("kernel_gbps") is not None for row in rows)
    header = ["op", "backend", "mode", "shape", "ms", "p20", "p80", "TFLOP/s", "GB/s", "roofline",
              *(["kernel traffic"] if with_traffic else []), "gate", *(f"x vs {name}" for name in ratio_names), "note"]
    table = [header]
    for row in rows:
        roofline = "-" if row.get("roofline_pct") is None else f"{row['roofline_pct']:.0f}% {row['bound']}"
        note = "" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        traffic = [_kernel_traffic_cell(row)] if with_traffic else []
        table.append([
            row["op"], row["backend"], row["mode"], row["label"], _number(row["median_ms"], ".3f"),
            _number(row["p20_ms"], ".3f"), _number(row["p80_ms"], ".3f"), _number(row.get("tflops"), ".3g"),
            _number(row.get("gbps"), ".4g"), roofline, *traffic, row["gate"] or "-",
            *(_number(row["vs"].get(name), ".2f") for name in ratio_names), note,
        ])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def format_summary(summary: dict) -> str:
    """The scaling and crossover lines of a sweep over T, or "" when it has one length."""
    lines = []
    if summary["scaling"]:
        lines.append("scaling: time(longest T) / time(T=4096, else the shortest T)")
        lines += [f"  {s['mode']:<7} {s['backend']:<10} t(T={s['long_T']}) / t(T={s['short_T']}) = {s['ratio']:.2f}"
                  for s in summary["scaling"]]
    if summary["crossover"]:
        lines.append("crossover: smallest T at which the backend is faster than the baseline")
        lines += [f"  {c['mode']:<7} {c['backend']:<10} vs {c['baseline']:<10} "
                  + (f"T={c['T']}" if c["T"] is not None else f"never up to T={c['max_T']}")
                  for c in summary["crossover"]]
    return "\n".join(lines)


def format_kernels(report: dict, *, width: int = 60) -> list[str]:
    """One block per row with per-kernel times: each kernel's GPU us per call and share of their sum."""
    lines = []
    for row in report["rows"]:
        kernels = row.get("kernels_us")
        if not kernels:
            continue
        total = sum(kernels.values())
        lines.append(f"kernels of {row['backend']} {row['mode']} {row['label']}: {total:.0f} us per call "
                     f"(timed call {1e3 * row['median_ms']:.0f} us)")
        lines += [f"  {us:9.1f} us {100 * us / total:5.1f}%  {name[:width]}" for name, us in kernels.items()]
    return lines


def format_report(report: dict) -> str:
    """The machine line, the settings and roofs, the table and the summary as printed by ``linmix bench``."""
    machine, settings = report["machine"], report["settings"]
    roofs = Roofs(settings["peak_tflops"], settings["peak_gbps"], settings["roofs"])
    lines = [
        machine_line(settings["title"], machine),
        f"dtype {settings['dtype']}, options {settings['options']}, timer {settings['timer']}, "
        f"warm-up {settings['warmup_ms']} ms, timed {settings['rep_ms']} ms; {roofs.describe()}",
        format_table(report),
    ]
    if any(row["vs"] for row in report["rows"]):
        lines.append("x vs NAME = time(NAME) / time(row), on the same shape and mode: above 1 is faster than NAME")
    summary = format_summary(report["summary"])
    return "\n".join(lines + ([summary] if summary else []) + format_kernels(report))


def _contender_lines(target: BenchTarget, device: torch.device) -> list[str]:
    """One line per backend (available here or why not, its length limit) and per baseline."""
    lines = []
    for name, contender in target.contenders.items():
        if contender.baseline:
            lines.append(f"  baseline {name:<10} {contender.description}")
            continue
        limit = f"; skipped above T={contender.max_T} ({contender.limit})" if contender.max_T else ""
        lines.append(f"  backend  {name:<10} {contender.unavailable(device) or 'available'}{limit}")
    return lines


def _shape_lines(target: BenchTarget) -> list[str]:
    return [f"  shapes   {set_name:<10} {', '.join(shape_label(target.shape_keys, shape) for shape in shapes)}"
            for set_name, shapes in target.shape_sets.items()]


def _op_lines(name: str, device: torch.device) -> list[str]:
    target = op_target(name)
    lines = [f"{name}: {target.description}",
             f"  gate against {target.reference} in float64 at {shape_label(target.shape_keys, target.gate_shape)}; "
             f"default: {', '.join(target.default_backends)}",
             *_contender_lines(target, device), *_shape_lines(target)]
    for option, value in target.options.items():
        choices = target.option_choices.get(option)
        lines.append(f"  option   {option}={value}" + (f" (one of {', '.join(choices)})" if choices else ""))
    return lines


def _layer_lines(device: torch.device) -> list[str]:
    targets = {mixer: layer_target(mixer) for mixer in MIXERS}
    first = next(iter(targets.values()))
    lines = [f"{LAYER}: any registered mixer (--mixer NAME) on x [B, T, d], built at its bench config",
             f"  gate against the mixer with backend naive (else its one backend) in float64 at "
             f"{shape_label(first.shape_keys, first.gate_shape)}"]
    for mixer, target in targets.items():
        entry = MIXERS[mixer]
        backends = f"backends: {entry.backend_field} of {entry.backend_op}" if entry.backend_field else "one backend"
        lines.append(f"  mixer    {mixer:<10} {backends}; default: {', '.join(target.default_backends)}")
        lines.append(f"    bench config at d={WIDTH}: {entry.bench_config(WIDTH)}")
        lines += [f"  {line}" for line in _contender_lines(target, device) if line.startswith("  backend")]
    lines += [line for line in _contender_lines(first, device) if line.startswith("  baseline")]
    lines += _shape_lines(first)
    lines.append("  options  any config field of the mixer besides d_model, context_length and its backend field "
                 "(--option FIELD=VALUE)")
    return lines


def format_list(device: torch.device) -> str:
    """Every op entry (backends and whether each runs here, limits, baselines, shape sets, options
    and regimes) and the layer entry with the registered mixers."""
    lines = []
    for name in OPS:
        lines += _op_lines(name, device)
    return "\n".join(lines + _layer_lines(device))
