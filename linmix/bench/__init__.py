"""Benchmarks of the ops and layers: a registry of ops and backends, timers, a correctness-gated
sweep runner that prints a table and writes JSON, and a time-versus-length plot; and a decoding
benchmark of per-token latency and state memory against generated tokens; and a training-throughput
benchmark of presets against a baseline preset."""

from linmix.bench.decode import format_decode_report, plan_decode, run_decode
from linmix.bench.plot import plot_decode, plot_times
from linmix.bench.registry import OPS, Backend, Cost, Op, get_op, mode_cost, register_backend, shape_label
from linmix.bench.runner import (
    Plan,
    format_op_list,
    format_report,
    gate_backend,
    plan_benchmark,
    run_benchmark,
    write_json,
)
from linmix.bench.timing import Timing, measure
from linmix.bench.train import format_train_report, plan_train, run_train

__all__ = [
    "OPS",
    "Backend",
    "Cost",
    "Op",
    "Plan",
    "Timing",
    "format_decode_report",
    "format_op_list",
    "format_report",
    "format_train_report",
    "gate_backend",
    "get_op",
    "measure",
    "mode_cost",
    "plan_benchmark",
    "plan_decode",
    "plan_train",
    "plot_decode",
    "plot_times",
    "register_backend",
    "run_benchmark",
    "run_decode",
    "run_train",
    "shape_label",
    "write_json",
]
