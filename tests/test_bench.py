"""`linmix bench` on the CPU with tiny shapes: entries discovered from the op and mixer registries, an
op benchmarked from its registration alone, the correctness gate, the JSON report, the ratio
columns, the cost model, the roofs and the usage errors. Wall-clock times are never asserted, only
that they were measured."""

import importlib.util
import json
import sys
import types

import pytest
import torch

from linmix.bench import (
    OpBench,
    layer_target,
    op_entries,
    op_target,
    plan_benchmark,
    roofs_for,
    run_benchmark,
)
from linmix.bench.cost import Cost, mode_cost
from linmix.bench.layer_entry import LAYER_SHAPE_SETS
from linmix.bench.report import format_kernels, format_report, format_table
from linmix.bench.runner import add_speed_ratios, performance, scaling_summary
from linmix.bench.shapes import FLA_SHAPES, TSWEEP_LENGTHS
from linmix.bench.timing import Timing
from linmix.cli import main
from linmix.layers import MIXERS
from linmix.ops import OPS, Backend, Op
from linmix.ops._dispatch import dispatch, register_op
from linmix.ops._testing import OpInputs, OpTestSpec, randn, spec_of
from linmix.ops.decayed_attention.bench import CHUNK
from linmix.ops.decayed_attention.triton import kernel_traffic

CPU_RUN = ["--shapes", "small", "--device", "cpu", "--dtype", "fp32", "--warmup-ms", "1", "--rep-ms", "5"]
TOY = "toy_running_sum"  # the throwaway op of test_an_op_is_benchmarked_from_its_registration_alone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: small CPU ops run no faster on two, and far slower when a core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory, one_thread):
    """The report and plot of a CPU run of decayed_attention's chunk, mask and naive backends."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--op", "decayed_attention", "--backends", "chunk,mask,naive", *CPU_RUN,
                 "--json", str(out / "report.json"), "--plot", str(out / "times.png")])
    assert code == 0
    return json.loads((out / "report.json").read_text()), out / "times.png"


# ----------------------------------------------------------------------------- entries from the registries


def test_every_op_has_an_entry_with_the_shared_shape_sets():
    entries = op_entries()
    assert set(entries) == set(OPS) and {"decayed_attention", "causal_kernel"} <= set(entries)
    for name, entry in entries.items():
        target = op_target(name)
        assert {"fla", "tsweep", "k2", "small"} <= set(entry.shape_sets)
        assert all(shape["B"] * shape["T"] == 32768 for shape in entry.shape_sets["tsweep"])
        assert [shape["T"] for shape in entry.shape_sets["tsweep"]] == list(TSWEEP_LENGTHS)
        assert [(s["B"], s["T"], s["H"]) for s in entry.shape_sets["fla"]] == [s[:3] for s in FLA_SHAPES]
        assert entry.regime in spec_of(OPS[name]).regimes and target.options == {"regime": entry.regime}
        assert set(entry.default_backends) <= set(target.contenders)
    decayed, causal = entries["decayed_attention"], entries["causal_kernel"]
    assert all(s["H"] == 1 and s["K"] == 32 and s["V"] == 1024 for s in decayed.shape_sets["k2"])
    assert all(s["H"] == 1 and s["D"] == 1024 and s["L"] == 16 for s in causal.shape_sets["k2"])
    assert decayed.regime == "const_typical" and causal.regime == "toeplitz_per_head"


@pytest.mark.parametrize("name", sorted(OPS))
def test_backends_are_the_registered_ones_with_their_limits_and_tolerances(name):
    op, spec = OPS[name], spec_of(OPS[name])
    target = op_target(name)
    backends = [key for key, contender in target.contenders.items() if not contender.baseline]
    assert backends == list(op.backends) and target.reference == "naive"
    for key in backends:
        contender, backend = target.contenders[key], op.backends[key]
        assert (contender.max_T, contender.limit) == (backend.max_T, backend.limit)
        assert contender.tolerance == spec.ratio(key, torch.float32)
        assert contender.unavailable(torch.device("cpu")) == backend.unavailable(torch.device("cpu"))


def test_a_backend_refusing_the_regimes_settings_is_unavailable():
    dense = op_target("causal_kernel", {"regime": "dense_4d"})
    assert "takes form='toeplitz' only" in dense.contenders["conv"].unavailable(torch.device("cpu"))
    assert dense.contenders["matmul"].unavailable(torch.device("cpu")) is None


def test_the_layer_entry_covers_every_registered_mixer():
    for mixer, entry in MIXERS.items():
        target = layer_target(mixer)
        assert target.shape_sets == LAYER_SHAPE_SETS and target.shape_keys == ("B", "T", "d")
        assert target.contenders["attention"].baseline and target.contenders["sdpa"].baseline
        backends = [key for key, contender in target.contenders.items() if not contender.baseline]
        if entry.backend_op is None:
            assert backends == ["default"] and target.reference == "default"
        else:
            assert backends == list(OPS[entry.backend_op].backends) and target.reference == "naive"
    assert all(shape["d"] == 1024 for shape in LAYER_SHAPE_SETS["tsweep"] + LAYER_SHAPE_SETS["fla"])


def test_bench_list_names_every_entry_backend_and_mixer(capsys):
    assert main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in (*OPS, *MIXERS, "layer", "sdpa", "attention", "tsweep", "regime=const_typical", "token_typical",
                 "skipped above T=4096 (quadratic memory)", "decay_backend of decayed_attention"):
        assert name in out
    assert "--op layer --mixer k2" in main_help(capsys)


def main_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    return " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- a new op needs no bench edit


def _naive_sum(x, initial_state, output_final_state):
    state = torch.zeros_like(x[:, 0]) if initial_state is None else initial_state  # [B, D]
    outputs = []
    for t in range(x.shape[1]):
        state = state + x[:, t]
        outputs.append(state)
    return torch.stack(outputs, dim=1), (state if output_final_state else None)


def _scan_sum(x, initial_state, output_final_state):
    o = x.cumsum(dim=1) + (0 if initial_state is None else initial_state[:, None])  # [B, T, D]
    return o, (o[:, -1] if output_final_state else None)


def _off_by_1pct(x, initial_state, output_final_state):
    o, state = _scan_sum(x, initial_state, output_final_state)
    return 1.01 * o, state


def _refusing(x, initial_state, output_final_state):
    raise RuntimeError("this backend refuses the shape")


def _running_sum(x, *, initial_state=None, output_final_state=False, cu_seqlens=None, backend="auto"):
    return dispatch(OPS[TOY], backend, {"x": x}, {}, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _toy_inputs(dims, regime, generator):
    B, T, D = dims["B"], dims["T"], dims["D"]
    scale = 10.0 if regime == "large" else 1.0
    return OpInputs({"x": scale * randn(generator, B, T, D)}, {}, randn(generator, B, D))


@pytest.fixture
def toy_op(monkeypatch):
    """A running sum along T registered like a real op: backends, a test spec and a bench entry in
    its (fake) package, nothing else."""
    package = types.ModuleType("toy_package", "A running sum along T: the throwaway op of the bench tests.")
    testing, bench = types.ModuleType("toy_package.testing"), types.ModuleType("toy_package.bench")
    testing.SPEC = OpTestSpec(op=TOY, make_inputs=_toy_inputs, dims={"B": 2, "D": 3}, regimes=("unit", "large"),
                              bad_inputs={}, dim_ranges={})
    bench.BENCH = OpBench(
        shape_keys=("B", "T", "D"), shape_sets={"small": [{"B": 2, "T": 50, "D": 4}, {"B": 1, "T": 120, "D": 4}]},
        gate_dims={"B": 1, "T": 33, "D": 5}, regime="unit", flops=lambda x: x.numel(),
        default_backends=("naive", "scan", "off_by_1pct", "refusing"), ratio_baselines=("naive",),
    )
    for module in (package, testing, bench):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    register_op(Op(
        name=TOY, module="toy_package", fn=_running_sum,
        backends={"naive": Backend(_naive_sum, "token loop", max_T=100, limit="token loop"),
                  "scan": Backend(_scan_sum, "torch.cumsum"),
                  "off_by_1pct": Backend(_off_by_1pct, "1% too large"),
                  "refusing": Backend(_refusing, "raises")},
        auto=("scan",), per_token={"x": (3,)}, step=lambda x, state: (state + x, state + x),
    ))
    yield TOY
    del OPS[TOY]


def test_an_op_is_benchmarked_from_its_registration_alone(toy_op, tmp_path, capsys):
    path = tmp_path / "toy.json"
    code = main(["bench", "--op", toy_op, "--option", "regime=large", *CPU_RUN, "--json", str(path)])
    assert code == 1
    assert "correctness gate failed for off_by_1pct" in capsys.readouterr().err
    report = json.loads(path.read_text())
    assert report["settings"]["options"] == {"regime": "large"}
    rows = {(row["backend"], row["shape"]["T"], row["mode"]): row for row in report["rows"]}
    assert len(rows) == 4 * 2 * 2
    for T in (50, 120):
        for mode in ("fwd", "fwdbwd"):
            assert rows["scan", T, mode]["status"] == "ok" and rows["scan", T, mode]["gate"] == "passed"
            numel = 4 * T * (2 if T == 50 else 1)  # the entry's flops: x.numel(), 3 times that in fwdbwd
            assert rows["scan", T, mode]["flops"] == numel * (3 if mode == "fwdbwd" else 1)
            wrong = rows["off_by_1pct", T, mode]
            assert wrong["status"] == "gate failed" and wrong["gate_error"] == pytest.approx(0.01, rel=1e-3)
            assert wrong["median_ms"] is None and wrong["vs"] == {}
            assert rows["refusing", T, mode]["status"] == "error"
            assert "this backend refuses the shape" in rows["refusing", T, mode]["reason"]
    assert rows["naive", 50, "fwd"]["status"] == "ok" and "naive" in rows["scan", 50, "fwd"]["vs"]
    assert rows["naive", 120, "fwd"]["status"] == "skipped"
    assert rows["naive", 120, "fwd"]["reason"] == "token loop: T > 100"
    assert set(report["gates"]["scan"]["fwdbwd"]["errors"]) == {"o", "dx"}
    assert main(["bench", "--list", "--device", "cpu"]) == 0
    assert f"{toy_op}: A running sum along T" in capsys.readouterr().out


# ----------------------------------------------------------------------------- op runs


def test_cpu_run_writes_a_gated_report_with_every_backend_and_mode(cpu_report):
    report, _ = cpu_report
    assert {"gpu", "cuda", "torch", "triton", "date", "git_commit"} <= set(report["machine"])
    assert report["machine"]["torch"] == torch.__version__
    settings = report["settings"]
    assert settings["options"] == {"regime": "const_typical"} and settings["gate_reference"] == "naive, float64"
    assert settings["cost_model"] == "linmix/ops/decayed_attention/bench.py"
    assert settings["peak_tflops"] is None and "pass --peak-tflops and --peak-gbps" in settings["roofs"]
    rows = report["rows"]
    assert len(rows) == 3 * 2 * 2
    assert {(r["backend"], r["mode"]) for r in rows} == {(b, m) for b in ("chunk", "mask", "naive")
                                                         for m in ("fwd", "fwdbwd")}
    for row in rows:
        assert row["status"] == "ok" and row["gate"] == "passed", row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["flops"] > 0 and row["bytes"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
        assert row["roofline_pct"] is None  # no roofs on the CPU
    for name in ("chunk", "mask", "naive"):
        gate = report["gates"][name]["fwdbwd"]
        assert gate["status"] == "passed" and gate["error"] <= gate["tolerance"] == 1e-5
        assert set(gate["errors"]) == {"o", "dq", "dk", "dv", "dlog_gamma"}


def test_ratio_columns_use_baselines_of_the_same_run(cpu_report):
    report, _ = cpu_report
    chunk_ms = {(r["label"], r["mode"]): r["median_ms"] for r in report["rows"] if r["backend"] == "chunk"}
    for row in report["rows"]:
        assert set(row["vs"]) == {"chunk"}  # fla and sdpa were not measured
        assert row["vs"]["chunk"] == pytest.approx(chunk_ms[row["label"], row["mode"]] / row["median_ms"])
    header = format_table(report).splitlines()[0]
    assert "x vs chunk" in header and "x vs sdpa" not in header and "x vs fla" not in header


def test_plot_is_a_png(cpu_report):
    _, png = cpu_report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_ratios_and_crossover_on_synthetic_rows():
    def row(backend, T, ms, baseline=False, status="ok"):
        return {"backend": backend, "mode": "fwd", "label": f"T{T}", "shape": {"T": T}, "median_ms": ms,
                "status": status, "baseline": baseline, "vs": {}}

    rows = [row("sdpa", 1024, 1.0, True), row("chunk", 1024, 4.0), row("sdpa", 4096, 16.0, True),
            row("chunk", 4096, 8.0), row("sdpa", 32768, 1024.0, True), row("chunk", 32768, 8.0),
            row("fla", 1024, None, status="error")]
    add_speed_ratios(rows, ("fla", "sdpa", "chunk"))
    assert rows[1]["vs"] == {"sdpa": 0.25, "chunk": 1.0}
    assert rows[3]["vs"] == {"sdpa": 2.0, "chunk": 1.0}
    assert rows[6]["vs"] == {}
    summary = scaling_summary(rows)
    scaling = {s["backend"]: s for s in summary["scaling"]}
    assert scaling["chunk"]["short_T"] == 4096 and scaling["chunk"]["ratio"] == 1.0
    assert scaling["sdpa"]["ratio"] == 64.0
    assert summary["crossover"] == [{"mode": "fwd", "backend": "chunk", "baseline": "sdpa", "T": 4096, "max_T": 32768}]


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_missing_fla_is_recorded_as_unavailable():
    plan = plan_benchmark("decayed_attention", backends=["fla"], modes=["fwd"], shapes="small", dtype="fp32",
                          device="cpu", warmup_ms=1, rep_ms=1)
    report = run_benchmark(plan)
    assert [row["status"] for row in report["rows"]] == ["unavailable"] * 2
    assert all("'fla', which is not installed" in row["reason"] for row in report["rows"])
    assert "fla" not in report["gates"]


def test_per_token_regime_and_custom_shapes():
    plan = plan_benchmark("decayed_attention", backends=["chunk", "sdpa"], modes=["fwd"], dtype="fp32", device="cpu",
                          shapes='[{"B": 1, "T": 33, "H": 1, "K": 4, "V": 4}]', options={"regime": "token_typical"},
                          warmup_ms=1, rep_ms=1)
    assert plan.shape_set == "custom" and plan.target.options == {"regime": "token_typical"}
    inputs = plan.target.build_inputs(plan.shapes[0], torch.bfloat16, torch.device("cpu"), False)
    assert inputs["log_gamma"].shape == (1, 33, 1, 4) and (inputs["log_gamma"] < 0).all()
    assert inputs["q"].dtype == torch.bfloat16 and inputs["log_gamma"].dtype == torch.float32  # float32_args
    assert [row["status"] for row in run_benchmark(plan)["rows"]] == ["ok", "ok"]


def test_cost_model():
    shape = {"B": 2, "T": 128, "H": 3, "K": 16, "V": 32}
    plan = plan_benchmark("decayed_attention", backends=["chunk", "sdpa"], modes=["fwd"], dtype="fp32",
                          device="cpu", shapes=json.dumps(shape), warmup_ms=1, rep_ms=1)
    rows = {row["backend"]: row for row in run_benchmark(plan)["rows"]}
    flops = 2 * 2 * 3 * 128 * (CHUNK * 16 + CHUNK * 32 + 2 * 16 * 32)
    in_bytes, out_bytes = 4 * 2 * 128 * 3 * (16 + 16 + 32) + 4 * 3 * 16, 4 * 2 * 128 * 3 * 32  # log decays [H, K]
    assert (rows["chunk"]["flops"], rows["chunk"]["bytes"]) == (flops, in_bytes + out_bytes)
    assert rows["sdpa"]["flops"] == 2 * 2 * 3 * 128 * 128 * 16  # causal: B H T^2 (K + V), v cut to K
    assert rows["sdpa"]["bytes"] == 4 * 4 * 2 * 3 * 128 * 16
    cost = Cost(flops, in_bytes, out_bytes)
    assert mode_cost(cost, "fwd") == (flops, in_bytes + out_bytes)
    assert mode_cost(cost, "fwdbwd") == (3 * flops, 3 * in_bytes + 2 * out_bytes)


def test_layer_flops_are_counted_on_the_meta_device():
    B, T, d = 2, 128, 128
    x = torch.empty(B, T, d)
    attention = layer_target("attention").contenders
    assert attention["default"].flops({"x": x}) == 8 * B * T * d * d + 2 * B * T * T * d  # projections, causal
    assert attention["sdpa"].flops({"x": x}) == 2 * B * T * T * d
    r, L = 32, 16  # k2's bench config; its chunked form's in-chunk scores are elementwise, so not counted
    k2_flops = 2 * B * T * (4 * d * r + CHUNK * d + L * d + d * d)  # q, k projections, A V, states, Kbase, out
    assert layer_target("k2").contenders["triton"].flops({"x": x}) == k2_flops


# ----------------------------------------------------------------------------- layer runs


@pytest.mark.parametrize("mixer, backends", [("k2", ["chunk", "naive", "attention", "sdpa"]),
                                             ("attention", ["default", "attention", "sdpa"])])
def test_layer_runs_on_the_cpu(mixer, backends, tmp_path):
    path = tmp_path / "layer.json"
    flags = ["--backends", ",".join(backends)] if mixer == "k2" else []
    assert main(["bench", "--op", "layer", "--mixer", mixer, *flags, *CPU_RUN, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["settings"]["op"] == "layer" and report["settings"]["mixer"] == mixer
    assert report["settings"]["backends"] == backends and report["settings"]["title"] == f"layer {mixer}"
    for row in report["rows"]:
        assert row["status"] == "ok" and row["flops"] > 0 and row["bytes"] > 0, row
        assert set(row["vs"]) >= {"attention", "sdpa"}
        assert row["gate"] == ("baseline" if row["backend"] in ("attention", "sdpa") else "passed")
    assert {c["baseline"] for c in report["summary"]["crossover"]} == {"attention", "sdpa"}


def test_layer_options_set_config_fields():
    target = layer_target("k2", {"rank": 8, "kbase_taps": 4})
    layer = target.contenders["chunk"].prepare({"x": torch.zeros(1, 16, 64)})["layer"]
    assert (layer.config.rank, layer.config.kbase_taps, layer.config.decay_backend) == (8, 4, "chunk")
    assert (layer.config.d_model, layer.config.context_length) == (64, 16)


# ----------------------------------------------------------------------------- roofs


@pytest.mark.parametrize("gpu, dtype, tflops, gbps", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4, 3350.0),
    ("NVIDIA H200", "bf16", 989.4, 4800.0),
    ("NVIDIA H200", "fp32", 66.9, 4800.0),
    ("NVIDIA H100 PCIe", "fp16", 756.5, 2000.0),
    ("NVIDIA H100 NVL", "bf16", 835.5, 3900.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5, 2039.0),
    ("NVIDIA A100-PCIE-40GB", "bf16", 312.0, 1555.0),
])
def test_roofs_come_from_the_gpu_name(gpu, dtype, tflops, gbps):
    roofs = roofs_for(gpu, dtype)
    assert (roofs.tflops, roofs.gbps) == (tflops, gbps)
    assert roofs.source == f"the {gpu} datasheet" and f"({roofs.source})" in roofs.describe()


def test_an_unknown_gpu_gets_no_roofline_unless_given_one():
    unknown = roofs_for("Tesla T4", "bf16")
    assert (unknown.tflops, unknown.gbps) == (None, None)
    assert unknown.describe() == "roofs: unknown GPU 'Tesla T4'; pass --peak-tflops and --peak-gbps"
    given = roofs_for("Tesla T4", "bf16", peak_tflops=65.0, peak_gbps=320.0)
    assert (given.tflops, given.gbps, given.source) == (65.0, 320.0, "--peak-tflops, --peak-gbps")
    half = roofs_for("NVIDIA H200", "bf16", peak_gbps=4000.0)
    assert (half.tflops, half.gbps) == (989.4, 4000.0) and half.source == "the NVIDIA H200 datasheet, --peak-gbps"
    assert roofs_for(None, "bf16", peak_gbps=1.0).source == "no datasheet on the CPU; pass --peak-tflops"


def test_the_report_prints_and_records_its_roofs():
    plan = plan_benchmark("causal_kernel", backends=["conv"], modes=["fwd"], shapes='{"B":1,"T":40,"H":1,"D":8,"L":4}',
                          dtype="fp32", device="cpu", warmup_ms=1, rep_ms=1, peak_tflops=1.0, peak_gbps=10.0)
    report = run_benchmark(plan)
    assert report["settings"]["roofs"] == "--peak-tflops, --peak-gbps"
    assert report["rows"][0]["roofline_pct"] > 0 and report["rows"][0]["bound"] in ("compute", "memory")
    assert "roofs: 1 TFLOP/s and 10 GB/s (--peak-tflops, --peak-gbps)" in format_report(report)
    plan.roofs = roofs_for("Tesla T4", "fp32")
    report = run_benchmark(plan)
    assert report["rows"][0]["roofline_pct"] is None
    assert "roofs: unknown GPU 'Tesla T4'; pass --peak-tflops and --peak-gbps" in format_report(report).splitlines()[1]


# ----------------------------------------------------------------------------- kernel traffic and kernels


@pytest.mark.parametrize("regime", ["const_typical", "token_typical"])
def test_the_kernel_traffic_column_is_the_triton_kernels_model(regime):
    shape = {"B": 2, "T": 100, "H": 3, "K": 32, "V": 48}
    plan = plan_benchmark("decayed_attention", backends=["triton", "chunk"], shapes=json.dumps(shape),
                          options={"regime": regime}, device="cpu", peak_gbps=1000.0)
    inputs = plan.target.build_inputs(shape, torch.bfloat16, torch.device("cpu"), False)
    timing, cost = Timing(2.0, 2.0, 2.0), Cost(1.0, 1.0, 1.0)  # the traffic columns read no FLOPs
    for mode in ("fwd", "fwdbwd"):
        result = performance(plan, "triton", inputs, cost, mode, timing)
        expected = kernel_traffic(2, 100, 3, 32, 48, 2, regime.startswith("token"), mode == "fwdbwd")
        assert result["kernel_bytes"] == expected
        assert result["kernel_gbps"] == pytest.approx(expected / 2e-3 / 1e9)
        assert result["kernel_bandwidth_pct"] == pytest.approx(100 * result["kernel_gbps"] / 1000.0)
    assert "kernel_bytes" not in performance(plan, "chunk", inputs, cost, "fwd", timing)


def test_a_timed_triton_row_reports_its_kernel_traffic():
    """The Triton backend runs in Triton's CPU interpreter here (tests/conftest.py), or on the GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_benchmark("decayed_attention", backends=["triton"], modes=["fwd"], dtype="fp32", device=device,
                          shapes='{"B": 1, "T": 40, "H": 1, "K": 16, "V": 16}', warmup_ms=1, rep_ms=1)
    row = run_benchmark(plan)["rows"][0]
    assert row["status"] == "ok" and row["gate"] == "passed", row
    assert row["kernel_bytes"] == kernel_traffic(1, 40, 1, 16, 16, 4, False, False)


def test_kernel_traffic_column_appears_only_with_a_traffic_model():
    row = {"op": "decayed_attention", "backend": "triton", "mode": "fwd", "label": "B1 T8", "median_ms": 1.0,
           "p20_ms": 1.0, "p80_ms": 1.0, "tflops": 1.0, "gbps": 10.0, "roofline_pct": 5.0, "bound": "memory",
           "gate": "passed", "vs": {}, "status": "ok", "kernel_gbps": 1675.0, "kernel_bandwidth_pct": 50.0}
    without = {key: value for key, value in row.items() if not key.startswith("kernel")}
    table = format_table({"rows": [row, {**without, "backend": "fla"}]}).splitlines()
    assert "kernel traffic" in table[0] and "1675 (50%)" in table[1] and " - " in table[2]
    assert "kernel traffic" not in format_table({"rows": [without]})


def test_kernel_blocks_list_each_kernel_with_its_share():
    row = {"backend": "triton", "mode": "fwd", "label": "B1 T8", "median_ms": 0.05,
           "kernels_us": {"chunk_scores_kernel": 30.0, "chunk_states_kernel": 10.0}}
    lines = format_kernels({"rows": [row, {**row, "kernels_us": None}]})
    assert lines[0] == "kernels of triton fwd B1 T8: 40 us per call (timed call 50 us)"
    assert "75.0%  chunk_scores_kernel" in lines[1] and "25.0%  chunk_states_kernel" in lines[2]
    assert len(lines) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA device and triton")
def test_gpu_kernel_times_name_the_triton_kernels():
    plan = plan_benchmark("decayed_attention", backends=["triton"], modes=["fwd", "fwdbwd"], device="cuda",
                          shapes='[{"B": 2, "T": 300, "H": 2, "K": 32, "V": 64}]', warmup_ms=1, rep_ms=2,
                          kernel_calls=3)
    rows = run_benchmark(plan)["rows"]
    forward, both = (set(row["kernels_us"]) for row in rows)
    assert {"chunk_states_kernel", "chunk_scores_kernel", "chunk_output_kernel"} <= forward
    assert {"chunk_dstates_kernel", "chunk_dqk_kernel"} <= both - forward
    assert all(us > 0 for row in rows for us in row["kernels_us"].values())
    assert all(row["kernel_bytes"] > 0 for row in rows)


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("flags, message", [
    (["--op", "decayed_attention", "--backends", "chunk,warp"], "unknown backend(s) warp for decayed_attention"),
    (["--op", "decayed_attention", "--shapes", "huge"], "unknown shape set 'huge'"),
    (["--op", "decayed_attention", "--shapes", '{"B": 1, "T": 8}'], "missing H, K, V"),
    (["--op", "decayed_attention", "--shapes", '{"B": 1, "T": 8, "H": 1, "K": 2, "V": 2, "r": 1}'], "unknown r"),
    (["--op", "decayed_attention", "--shapes", "[{"], "not valid JSON"),
    (["--op", "decayed_attention", "--modes", "bwd"], "modes must be"),
    (["--op", "decayed_attention", "--option", "regime=steep"], "regime must be one of const_small"),
    (["--op", "decayed_attention", "--option", "decay=per-token"], "takes no option decay; its option: regime"),
    (["--op", "causal_kernel", "--option", "regime"], "--option expects KEY=VALUE, got 'regime'"),
    (["--op", "layer", "--mixer", "k2", "--option", "rank=0"], "--option rank=0 for mixer k2: rank must be >= 1"),
    (["--op", "layer", "--mixer", "k2", "--option", "colour=red"], "mixer 'k2' has no config fields ['colour']"),
    (["--op", "layer", "--mixer", "k2", "--option", "decay_backend=chunk"], "may not set decay_backend"),
    (["--op", "layer", "--mixer", "attention", "--option", "d_model=32"], "may not set d_model"),
    (["--op", "layer", "--mixer", "attention", "--option", "n_heads=3"], "--option n_heads=3 for mixer attention"),
    (["--op", "layer", "--mixer", "k2", "--option", "rank=[1"], "is not a YAML value"),
    (["--op", "layer"], "--op layer needs --mixer"),
    (["--op", "layer", "--mixer", "mamba"], "unknown mixer 'mamba'"),
    (["--op", "causal_kernel", "--mixer", "k2"], "--mixer goes with --op layer"),
    (["--op", "k2_layer"], "unknown op 'k2_layer'; ops: "),
    (["--op", "decayed_attention", "--kernels", "3"], "per-kernel GPU times need a CUDA device"),
    (["--op", "decayed_attention", "--kernels", "-1"], "kernels must be a non-negative"),
    ([], "--op is needed"),
])
def test_usage_errors_exit_2_with_one_line(flags, message, capsys):
    assert main(["bench", *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_sdpa_baseline_repeats_query_and_key_heads_for_grouped_values():
    """GVA (8 value heads over 2 key heads): the attention baseline gets the op's 8 output heads, value head j
    attending with key head j // 4, and runs."""
    from linmix.bench.baselines import causal_sdpa, heads_first

    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 8, 4)
    prepared = heads_first(q, k, v)
    assert [x.shape for x in prepared.values()] == [torch.Size([1, 8, 5, 4])] * 3
    assert torch.equal(prepared["q"][:, 5], q[:, :, 1]) and torch.equal(prepared["k"][:, 3], k[:, :, 0])
    assert causal_sdpa(prepared).shape == (1, 8, 5, 4)
