"""Benchmarks of the ops and layers: every registered op's declarative entry (its package's
``bench.py``) and a layer entry for every registered mixer, a correctness-gated sweep runner that
prints a table and writes JSON, roofs from the GPU's datasheet, and a time-versus-length plot;
a decoding benchmark of per-token latency and state memory against generated tokens; and a
training-throughput benchmark of presets against a baseline preset."""

from linmix.bench.baselines import Baseline, sdpa_baseline
from linmix.bench.cost import Cost, counted_flops, mode_cost
from linmix.bench.decode import format_decode_report, plan_decode, run_decode
from linmix.bench.gate import gate_backend, gate_backends
from linmix.bench.layer_entry import layer_target
from linmix.bench.op_entries import OpBench, op_entries, op_target
from linmix.bench.plot import plot_decode, plot_times
from linmix.bench.report import format_list, format_report, write_json
from linmix.bench.roofs import GPU_PEAKS, Roofs, roofs_for
from linmix.bench.runner import Plan, bench_target, parse_options, plan_benchmark, run_benchmark
from linmix.bench.shapes import shape_label
from linmix.bench.target import BenchTarget, Contender
from linmix.bench.timing import Timing, measure
from linmix.bench.train import format_train_report, plan_train, run_train

__all__ = [
    "GPU_PEAKS",
    "Baseline",
    "BenchTarget",
    "Contender",
    "Cost",
    "OpBench",
    "Plan",
    "Roofs",
    "Timing",
    "bench_target",
    "counted_flops",
    "format_decode_report",
    "format_list",
    "format_report",
    "format_train_report",
    "gate_backend",
    "gate_backends",
    "layer_target",
    "measure",
    "mode_cost",
    "op_entries",
    "op_target",
    "parse_options",
    "plan_benchmark",
    "plan_decode",
    "plan_train",
    "plot_decode",
    "plot_times",
    "roofs_for",
    "run_benchmark",
    "run_decode",
    "run_train",
    "sdpa_baseline",
    "shape_label",
    "write_json",
]
