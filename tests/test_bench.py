"""`linmix bench` on the CPU with tiny shapes: the registry, the correctness gate, the JSON report,
the ratio columns, the cost model and the usage errors. Wall-clock times are never asserted, only
that they were measured."""

import importlib.util
import json

import pytest
import torch

from linmix.bench import OPS, Backend, get_op, mode_cost, plan_benchmark, register_backend, run_benchmark
from linmix.bench.registry import CHUNK, FLA_SHAPES, TSWEEP_LENGTHS, _triton_kernel_traffic
from linmix.bench.runner import add_speed_ratios, format_kernels, format_table, gate_backend, scaling_summary
from linmix.cli import main
from linmix.ops.decayed_attention import BACKENDS as DECAYED_ATTENTION_BACKENDS

CPU_RUN = ["--modes", "fwd,fwdbwd", "--shapes", "small", "--device", "cpu", "--dtype", "fp32",
           "--warmup-ms", "1", "--rep-ms", "5"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: small CPU ops run no faster on two, and far slower when a core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scratch_backends(monkeypatch):
    """Backends registered by a test vanish after it."""
    for op in OPS.values():
        monkeypatch.setattr(op, "backends", dict(op.backends))


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory, one_thread):
    """The report and plot of a CPU run of decayed_attention's chunk, mask and naive backends."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--op", "decayed_attention", "--backends", "chunk,mask,naive", *CPU_RUN,
                 "--json", str(out / "report.json"), "--plot", str(out / "times.png")])
    assert code == 0
    return json.loads((out / "report.json").read_text()), out / "times.png"


def test_registry_lists_ops_backends_and_shape_sets():
    assert set(OPS) == {"decayed_attention", "k2_layer", "causal_kernel"}
    decayed = get_op("decayed_attention")
    assert {"naive", "mask", "chunk", "fla", "sdpa"} <= set(decayed.backends)
    assert ("triton" in decayed.backends) == ("triton" in DECAYED_ATTENTION_BACKENDS)
    assert {"chunk", "mask", "attention", "sdpa"} <= set(get_op("k2_layer").backends)
    assert {"conv", "matmul"} <= set(get_op("causal_kernel").backends)
    for op in OPS.values():
        assert not op.backends[op.reference].baseline
        assert set(op.default_backends) <= set(op.backends)
        assert {"fla", "tsweep", "k2", "small"} <= set(op.shape_sets)
        assert all(shape["B"] * shape["T"] == 32768 for shape in op.shape_sets["tsweep"])
        assert [shape["T"] for shape in op.shape_sets["tsweep"]] == list(TSWEEP_LENGTHS)
    assert [(s["B"], s["T"], s["H"], s["K"]) for s in decayed.shape_sets["fla"]] == [s[:4] for s in FLA_SHAPES]
    assert all(s["H"] == 1 and s["K"] == 32 and s["V"] == 1024 for s in decayed.shape_sets["k2"])
    assert decayed.backends["sdpa"].baseline and get_op("k2_layer").backends["attention"].baseline
    assert decayed.backends["mask"].max_T == 4096 and decayed.backends["mask"].skip_reason == "quadratic memory"


def test_bench_list_exits_zero(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("decayed_attention", "k2_layer", "causal_kernel", "sdpa", "attention", "tsweep"):
        assert name in out


def test_cpu_run_writes_a_gated_report_with_every_backend_and_mode(cpu_report):
    report, _ = cpu_report
    assert {"gpu", "cuda", "torch", "triton", "date", "git_commit"} <= set(report["machine"])
    assert report["machine"]["torch"] == torch.__version__
    rows = report["rows"]
    shapes = get_op("decayed_attention").shape_sets["small"]
    assert len(rows) == 3 * 2 * len(shapes)
    assert {(r["backend"], r["mode"]) for r in rows} == {(b, m) for b in ("chunk", "mask", "naive")
                                                         for m in ("fwd", "fwdbwd")}
    for row in rows:
        assert row["status"] == "ok" and row["gate"] == "passed", row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["flops"] > 0 and row["bytes"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
        assert row["roofline_pct"] is None  # no peaks given on the CPU
    for name in ("chunk", "mask", "naive"):
        gate = report["gates"][name]["fwdbwd"]
        assert gate["status"] == "passed" and gate["error"] <= 1e-3
        assert set(gate["errors"]) == {"o", "dq", "dk", "dv", "dlog_gamma"}


def test_ratio_columns_use_baselines_of_the_same_run(cpu_report):
    report, _ = cpu_report
    chunk_ms = {(r["label"], r["mode"]): r["median_ms"] for r in report["rows"] if r["backend"] == "chunk"}
    for row in report["rows"]:
        assert set(row["vs"]) == {"chunk"}  # fla and sdpa were not measured
        assert row["vs"]["chunk"] == pytest.approx(chunk_ms[row["label"], row["mode"]] / row["median_ms"])
    header = format_table(report).splitlines()[0]
    assert "x vs chunk" in header and "x vs sdpa" not in header and "x vs fla" not in header


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


def test_gate_refuses_a_wrong_backend_and_reports_a_raising_one(scratch_backends, tmp_path, capsys):
    chunk = get_op("decayed_attention").backends["chunk"]
    register_backend("decayed_attention", "off_by_1pct", Backend(lambda inputs: chunk.run(inputs) * 1.01))

    def refuse(inputs):
        raise RuntimeError("this backend refuses the shape")

    register_backend("decayed_attention", "refusing", Backend(refuse))
    with pytest.raises(ValueError, match="already has"):
        register_backend("decayed_attention", "refusing", Backend(refuse))
    path = tmp_path / "gate.json"
    code = main(["bench", "--op", "decayed_attention", "--backends", "chunk,off_by_1pct,refusing",
                 "--modes", "fwd", "--shapes", '{"B": 1, "T": 40, "H": 1, "K": 8, "V": 8}', "--device", "cpu",
                 "--dtype", "fp32", "--warmup-ms", "1", "--rep-ms", "2", "--json", str(path)])
    assert code == 1
    assert "correctness gate failed for off_by_1pct" in capsys.readouterr().err
    report = json.loads(path.read_text())
    rows = {row["backend"]: row for row in report["rows"]}
    assert rows["chunk"]["status"] == "ok"
    wrong = rows["off_by_1pct"]
    assert wrong["status"] == "gate failed" and wrong["gate"] == "failed"
    assert wrong["gate_error"] == pytest.approx(0.01, rel=1e-3)
    assert wrong["median_ms"] is None and "vs" in wrong and wrong["vs"] == {}
    assert report["gates"]["off_by_1pct"]["fwd"]["error"] == pytest.approx(0.01, rel=1e-3)
    assert rows["refusing"]["status"] == "error" and rows["refusing"]["gate"] == "error"
    assert "this backend refuses the shape" in rows["refusing"]["reason"]


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_missing_fla_is_recorded_as_not_installed():
    plan = plan_benchmark("decayed_attention", backends=["fla"], modes=["fwd"], shapes="small", dtype="fp32",
                          device="cpu", warmup_ms=1, rep_ms=1)
    report = run_benchmark(plan)
    assert [row["status"] for row in report["rows"]] == ["unavailable"] * 2
    assert {row["reason"] for row in report["rows"]} == {"not installed"}
    assert "fla" not in report["gates"]


@pytest.mark.parametrize("op_name, backends", [("k2_layer", ["chunk", "mask"]), ("causal_kernel", ["conv", "matmul"])])
def test_gate_passes_the_cpu_backends_of_the_other_ops(op_name, backends):
    op = get_op(op_name)
    for name in backends:
        gate = gate_backend(op, name, ["fwd", "fwdbwd"], op.options, torch.device("cpu"))
        assert gate["fwdbwd"]["status"] == "passed", (name, gate)
    assert gate_backend(get_op("k2_layer"), "attention", ["fwd"], {}, torch.device("cpu")) == {
        "fwd": {"status": "baseline"}}


def test_k2_layer_run_with_peaks_reports_roofline_and_attention_ratios():
    plan = plan_benchmark("k2_layer", backends=["chunk", "attention", "sdpa"], modes=["fwd"], shapes="small",
                          dtype="fp32", device="cpu", warmup_ms=1, rep_ms=2, peak_tflops=1.0, peak_gbps=10.0)
    report = run_benchmark(plan)
    for row in report["rows"]:
        assert row["status"] == "ok"
        assert row["roofline_pct"] > 0 and row["bound"] in ("compute", "memory")
        assert set(row["vs"]) == {"attention", "sdpa", "chunk"}
    assert {c["baseline"] for c in report["summary"]["crossover"]} == {"attention", "sdpa"}


def test_cost_model():
    op = get_op("decayed_attention")
    shape = {"B": 2, "T": 128, "H": 3, "K": 16, "V": 32, "decay": "constant"}
    cost = op.cost_of("chunk", shape, torch.bfloat16)
    assert cost.flops == 2 * 2 * 3 * 128 * (CHUNK * 16 + CHUNK * 32 + 2 * 16 * 32)
    assert cost.in_bytes == 2 * 2 * 128 * 3 * (16 + 16 + 32) + 4 * 3 * 16
    assert cost.out_bytes == 2 * 2 * 128 * 3 * 32
    assert mode_cost(cost, "fwd") == (cost.flops, cost.in_bytes + cost.out_bytes)
    assert mode_cost(cost, "fwdbwd") == (3 * cost.flops, 3 * cost.in_bytes + 2 * cost.out_bytes)
    per_token = op.cost_of("chunk", {**shape, "decay": "per-token"}, torch.bfloat16)
    assert per_token.in_bytes - cost.in_bytes == 4 * (2 * 128 * 3 * 16 - 3 * 16)
    assert op.cost_of("sdpa", shape, torch.bfloat16).flops == 2 * 2 * 3 * 128 * 128 * 16


def test_plot_is_a_png(cpu_report):
    _, png = cpu_report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_token_decay_and_custom_shapes():
    plan = plan_benchmark("decayed_attention", backends=["chunk"], modes=["fwd"], dtype="fp32", device="cpu",
                          shapes='[{"B": 1, "T": 33, "H": 1, "K": 4, "V": 4}]', options={"decay": "per-token"},
                          warmup_ms=1, rep_ms=1)
    assert plan.shape_set == "custom" and plan.shapes[0]["decay"] == "per-token"
    inputs = plan.op.build_inputs(plan.shapes[0], torch.float32, "cpu", False)
    assert inputs["log_gamma"].shape == (1, 33, 1, 4) and (inputs["log_gamma"] < 0).all()
    assert run_benchmark(plan)["rows"][0]["status"] == "ok"


@pytest.mark.parametrize("flags, message", [
    (["--op", "decayed_attention", "--backends", "chunk,warp"], "unknown backend"),
    (["--op", "decayed_attention", "--shapes", "huge"], "unknown shape set"),
    (["--op", "decayed_attention", "--shapes", '{"B": 1, "T": 8}'], "missing H, K, V"),
    (["--op", "decayed_attention", "--shapes", "[{"], "not valid JSON"),
    (["--op", "decayed_attention", "--modes", "bwd"], "modes must be"),
    (["--op", "k2_layer", "--decay", "per-token"], "takes no option decay"),
    (["--op", "nope"], "unknown op"),
    (["--op", "decayed_attention", "--kernels", "3"], "per-kernel GPU times need a CUDA device"),
    (["--op", "decayed_attention", "--kernels", "-1"], "kernels must be a non-negative"),
    ([], "--op is needed"),
])
def test_usage_errors_exit_2(flags, message, capsys):
    assert main(["bench", *flags, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_kernel_blocks_list_each_kernel_with_its_share():
    row = {"backend": "triton", "mode": "fwd", "label": "B1 T8", "median_ms": 0.05,
           "kernels_us": {"chunk_scores_kernel": 30.0, "chunk_states_kernel": 10.0}}
    lines = format_kernels({"rows": [row, {**row, "kernels_us": None}]})
    assert lines[0] == "kernels of triton fwd B1 T8: 40 us per call (timed call 50 us)"
    assert "75.0%  chunk_scores_kernel" in lines[1] and "25.0%  chunk_states_kernel" in lines[2]
    assert len(lines) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in DECAYED_ATTENTION_BACKENDS,
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


def test_kernel_traffic_column_appears_only_with_a_traffic_model():
    row = {"op": "decayed_attention", "backend": "triton", "mode": "fwd", "label": "B1 T8", "median_ms": 1.0,
           "p20_ms": 1.0, "p80_ms": 1.0, "tflops": 1.0, "gbps": 10.0, "roofline_pct": 5.0, "bound": "memory",
           "gate": "passed", "vs": {}, "status": "ok", "kernel_gbps": 1675.0, "kernel_bandwidth_pct": 50.0}
    without = {key: value for key, value in row.items() if not key.startswith("kernel")}
    table = format_table({"rows": [row, {**without, "backend": "fla"}]}).splitlines()
    assert "kernel traffic" in table[0] and "1675 (50%)" in table[1] and " - " in table[2]
    assert "kernel traffic" not in format_table({"rows": [without]})


def test_the_triton_kernel_traffic_model_and_who_reports_it():
    shape = {"B": 8, "T": 2048, "H": 16, "K": 128, "V": 128, "decay": "per-token"}
    per_row = _triton_kernel_traffic(shape, torch.bfloat16, "fwdbwd") / (8 * 2048 * 16)
    assert per_row == pytest.approx(20032)  # about 4.6x the ideal 3 in + 2 out = 4352 bytes per position and head
    backends = get_op("decayed_attention").backends
    assert backends["chunk"].traffic is None and backends["fla"].traffic is None
