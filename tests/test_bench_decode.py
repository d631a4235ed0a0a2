"""`linmix bench decode` on the CPU with a few dozen tokens: the JSON report, the state memory of the
K-Operators model (constant) and of the attention baseline (linear), the growing KV cache, the plot
and the usage errors. Wall-clock times are never asserted, only that they were measured."""

import json

import pytest
import torch

from linmix.bench import decode
from linmix.bench.decode import DEFAULT_CHECKPOINTS, build_baseline, plan_decode, run_decode, state_bytes
from linmix.cli import main
from linmix.layers import attention

CHECKPOINTS = [16, 32, 64]
PROMPT = 4
CPU_RUN = ["--checkpoints", ",".join(map(str, CHECKPOINTS)), "--window", "8", "--prompt-tokens", str(PROMPT),
           "--device", "cpu", "--dtype", "fp32", "--no-progress"]
TINY_KSTACK = {"d_model": 16, "rank": 4, "n_k2": 1}
KV_PAGE = 4  # the positions 20, 36 and 68 fill whole pages
TINY_GPT = {"d_model": 16, "n_layers": 2, "mixer_kwargs": {"n_heads": 2, "bias": False}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: small CPU ops run no faster on two, and far slower when a core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, one_thread):
    """The report and plot of `linmix bench decode` with kops-ts-linear against nanogpt-ts, 64 tokens."""
    out = tmp_path_factory.mktemp("decode")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "KV_PAGE", KV_PAGE)
        code = main(["bench", "decode", *CPU_RUN, "--json", str(out / "decode.json"), "--plot",
                     str(out / "decode.png")])
    assert code == 0
    return json.loads((out / "decode.json").read_text()), out / "decode.png"


def rows_of(report, name):
    return [row for row in report["rows"] if row["model"] == name]


def test_report_has_every_checkpoint_of_every_model(cli_report):
    report, _ = cli_report
    assert {"gpu", "cpu", "torch", "date", "git_commit"} <= set(report["machine"])
    settings = report["settings"]
    assert settings["checkpoints"] == CHECKPOINTS and settings["max_tokens"] == 64 and settings["batch_size"] == 1
    assert settings["presets"] == ["kops-ts-linear"] and settings["baseline"] == "nanogpt-ts"
    assert [(m["name"], m["role"]) for m in report["models"]] == [("kops-ts-linear", "model"),
                                                                  ("nanogpt-ts-nope", "baseline")]
    baseline = report["models"][1]["config"]
    assert baseline["position_embedding"] is False and baseline["context_length"] == PROMPT + 64
    for model in report["models"]:
        rows = rows_of(report, model["name"])
        assert [row["tokens"] for row in rows] == CHECKPOINTS
        assert [row["position"] for row in rows] == [PROMPT + n for n in CHECKPOINTS]
        for row in rows:
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["allocated_bytes"] is None and row["max_allocated_bytes"] is None  # CPU
        assert rows[0]["latency_ratio"] == 1.0 and rows[0]["state_ratio"] == 1.0
    for row in rows_of(report, "kops-ts-linear"):
        assert row["vs"]["nanogpt-ts-nope"] > 0


def test_kops_state_is_constant_and_the_kv_cache_grows_linearly(cli_report):
    report, _ = cli_report
    kops = rows_of(report, "kops-ts-linear")
    assert len({row["state_bytes"] for row in kops}) == 1
    config = report["models"][0]["config"]
    per_layer = 4 * config["d_model"] * (config["mixer_kwargs"]["rank"] + config["kbase_taps"])  # decay state + L-row history
    assert kops[0]["state_bytes"] == config["n_k2"] * per_layer
    assert [row["state_ratio"] for row in kops] == [1.0, 1.0, 1.0]

    gpt = report["models"][1]["config"]
    attention = rows_of(report, "nanogpt-ts-nope")
    for row in attention:  # keys and values of every layer and position
        assert row["state_bytes"] == 2 * gpt["n_layers"] * row["position"] * gpt["d_model"] * 4
    positions = [PROMPT + n for n in CHECKPOINTS]
    assert [row["state_ratio"] for row in attention] == [p / positions[0] for p in positions]


def test_plot_is_a_png(cli_report):
    _, png = cli_report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unbounded_attention_decodes_the_attention_forward(monkeypatch):
    monkeypatch.setattr(attention, "KV_PAGE", KV_PAGE)  # the cache grows in both prefills and 3 steps
    torch.manual_seed(0)
    baseline = build_baseline("nanogpt-ts", 64, TINY_GPT).model.double().eval()
    idx = torch.randint(65, (2, 23))
    logits, _ = baseline(idx)
    state = baseline.init_state(2, "cpu", torch.float64)
    first, state = baseline.prefill(idx[:, :5], state)  # an empty cache, then one with 5 positions
    second, state = baseline.prefill(idx[:, 5:9], state)
    stepped = [first, second]
    for t in range(9, 23):
        out, state = baseline.step(idx[:, t], state)
        stepped.append(out[:, None])
    torch.testing.assert_close(torch.cat(stepped, dim=1), logits, rtol=1e-10, atol=1e-10)
    assert state["blocks"][0]["keys"].shape[2] == 24


def test_sampled_batched_decoding_with_tiny_models():
    plan = plan_decode(["kops-ts-linear", "kops-ts-v2-nokbase"], max_tokens=12, checkpoints=[4, 12], window=4,
                       prompt_tokens=3, batch_size=2, temperature=1.0, dtype="fp32", device="cpu",
                       overrides=TINY_KSTACK, baseline_overrides=TINY_GPT)
    report = run_decode(plan)
    assert [(row["model"], row["tokens"]) for row in report["rows"]] == [
        (name, n) for name in ("kops-ts-linear", "kops-ts-v2-nokbase", "nanogpt-ts-nope") for n in (4, 12)]
    assert report["settings"]["temperature"] == 1.0
    nokbase = rows_of(report, "kops-ts-v2-nokbase")
    assert nokbase[0]["state_bytes"] == nokbase[1]["state_bytes"] == 2 * 4 * 16 * 4  # batch x rank x d, float32


def test_prefill_reaches_the_same_states(cli_report, monkeypatch):
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 5)  # several prefill calls per checkpoint
    monkeypatch.setattr(attention, "KV_PAGE", KV_PAGE)
    plan = plan_decode(max_tokens=64, checkpoints=CHECKPOINTS, window=8, prompt_tokens=PROMPT, dtype="fp32",
                       device="cpu", prefill=True)
    report = run_decode(plan)
    assert report["settings"]["reached_by"] == "prefill in chunks of 5"
    decoded, _ = cli_report
    assert [(r["model"], r["tokens"], r["state_bytes"]) for r in report["rows"]] == [
        (r["model"], r["tokens"], r["state_bytes"]) for r in decoded["rows"]]


def test_default_checkpoints_end_at_max_tokens():
    def checkpoints(**request):
        plan = plan_decode(baseline=None, device="cpu", dtype="fp32", overrides=TINY_KSTACK, **request)
        assert [m.name for m in plan.models] == ["kops-ts-linear"]
        return plan.checkpoints, plan.max_tokens

    assert checkpoints() == (list(DEFAULT_CHECKPOINTS), 65536)
    assert checkpoints(max_tokens=3000) == ([1024, 2048, 3000], 3000)
    assert checkpoints(max_tokens=100) == ([100], 100)
    assert checkpoints(max_tokens=64, checkpoints=[16, 32]) == ([16, 32, 64], 64)


def test_state_bytes_counts_each_storage_once():
    buffer = torch.zeros(10, 4)  # 160 bytes
    state = {"position": 3, "a": buffer[2:], "b": [buffer[:5], (torch.zeros(3, dtype=torch.float64), None)]}
    assert state_bytes(state) == 160 + 24


@pytest.mark.parametrize("flags, message", [
    (["--checkpoints", "32,16"], "--checkpoints must be strictly increasing"),
    (["--checkpoints", "16,128", "--max-tokens", "64"], "--checkpoints: 128 is beyond --max-tokens 64"),
    (["--checkpoints", "0,16"], "--checkpoints must be a positive integer"),
    (["--checkpoints", ""], "--checkpoints needs at least one step count"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer"),
    (["--presets", "kops-ts-v9", "--checkpoints", "16"], "--presets: unknown preset 'kops-ts-v9'"),
    (["--baseline", "gpt-9", "--checkpoints", "16"], "--baseline: unknown preset 'gpt-9'"),
    (["--baseline", "kops-ts-linear", "--checkpoints", "16"], "--baseline: kops-ts-linear is no softmax-attention"),
    (["--presets", "kops-ts-v2", "--checkpoints", "300"], "--presets: kops-ts-v2 decodes at most 256 positions"),
    (["--checkpoints", "16", "--window", "32"], "--window 32 is longer than the first checkpoint 16"),
    (["--checkpoints", "16", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--checkpoints", "16", "--temperature", "-1"], "--temperature must be >= 0"),
])
def test_usage_errors_exit_2(flags, message, capsys):
    assert main(["bench", "decode", "--device", "cpu", "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err


def test_unparsable_checkpoints_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", "--checkpoints", "16,x"])
    assert exit_info.value.code == 2
    assert "--checkpoints: expected a comma-separated list" in capsys.readouterr().err
