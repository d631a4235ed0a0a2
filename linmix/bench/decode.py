"""Decoding benchmark: per-token latency and decoding-state memory against generated tokens.

Each model prefills a short random prompt, then generates ``max_tokens`` tokens one ``step`` at a
time (greedy, or sampled at a temperature) under ``torch.inference_mode``; with ``prefill`` only
the timed steps are decoded and the tokens between them are prefilled in chunks. Every step is
timed with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA), so a token's latency
is the wall time from feeding the last token to holding the next one. At each checkpoint N the
report holds the median and 20/80% quantiles of the ``window`` steps that end at step N, the
bytes of the decoding state the model carries between steps, and on CUDA the allocator's
``memory_allocated`` and ``max_memory_allocated`` since the model was placed on the GPU.

The baseline, measured in the same run, is a softmax-attention transformer preset decoding with
a KV cache. Its learned absolute positions are removed (no positional encoding at all, NoPE), so
that it can decode past the preset's context length; the cost of a step does not depend on the
weights. Its attention layers (``UnboundedAttention``) keep the mixer's KV cache, written in place
and grown a page at a time, with no length limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from linmix.bench.inputs import DTYPES, INPUT_SEED
from linmix.bench.machine import machine_info, machine_line
from linmix.bench.timing import QUANTILES, Timing
from linmix.layers import CausalSelfAttention, attention
from linmix.models import build, get_preset
from linmix.models.generate import sample_next

DEFAULT_CHECKPOINTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_WINDOW = 64  # steps timed per checkpoint, ending at the checkpoint
DEFAULT_PROMPT_TOKENS = 16
DEFAULT_BASELINE = "nanogpt-ts"
PREFILL_CHUNK = 2048  # tokens per prefill call when --prefill reaches the checkpoints
MIB = 2**20


class UnboundedAttention(CausalSelfAttention):
    """The attention mixer without a length limit: its KV cache (see ``CausalSelfAttention``) grows
    a page at a time for as long as the sequence goes on."""

    @property
    def window(self) -> float:
        """No capacity limit."""
        return math.inf


@dataclass
class DecodeModel:
    """One decoded model.

    Attributes:
        name: the row label.
        role: "model" or "baseline".
        preset: the preset it was built from.
        model: the model in the plan's dtype, in eval mode, on the CPU until it is decoded.
        description: what was built, for the report.
    """

    name: str
    role: str
    preset: str
    model: nn.Module
    description: str


@dataclass
class DecodePlan:
    """A validated decoding benchmark request.

    Attributes:
        models: the decoded models, baseline last.
        max_tokens: decoding steps per model.
        checkpoints: increasing step counts at which a row is recorded, the last = max_tokens.
        window: steps timed per checkpoint.
        prompt_tokens: length of the random prompt prefilled first.
        batch_size: sequences decoded together.
        temperature: 0 for greedy decoding, else the sampling temperature.
        dtype: name of the model dtype (a key of ``DTYPES``).
        device: where everything runs.
        prefill: reach each checkpoint's window by prefilling the tokens before it, in chunks,
            rather than by decoding them one step at a time.
    """

    models: list[DecodeModel]
    max_tokens: int
    checkpoints: list[int]
    window: int
    prompt_tokens: int
    batch_size: int
    temperature: float
    dtype: str
    device: torch.device
    prefill: bool


def _seeded(factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPUT_SEED)
        return factory()


def _preset(name: str, option: str):
    try:
        return get_preset(name)
    except KeyError as error:
        raise ValueError(f"{option}: {error.args[0]}") from error


def _model_entry(name: str, overrides: dict, positions: int) -> DecodeModel:
    preset = _preset(name, "--presets")
    model = _seeded(lambda: build(name, **overrides))
    if model.window < positions:
        raise ValueError(f"--presets: {name} decodes at most {model.window} positions (a dense Kbase or learned "
                         f"positions), fewer than the {positions} of the prompt and --max-tokens")
    return DecodeModel(name, "model", name, model, preset.description)


def build_baseline(name: str, positions: int, overrides: dict | None = None) -> DecodeModel:
    """An attention preset without learned positions, its mixers swapped for ``UnboundedAttention``.

    Args:
        name: a preset whose model has mixer "attention" (e.g. "nanogpt-ts").
        positions: the longest sequence it will decode (recorded as its context_length).
        overrides: further model-config fields.

    Returns:
        the baseline entry.

    Raises:
        ValueError: the preset is unknown or is no attention model.
    """
    preset = _preset(name, "--baseline")
    if preset.model.get("mixer") != "attention":
        raise ValueError(f"--baseline: {name} is no softmax-attention model (mixer 'attention'), e.g. nanogpt-ts")
    fields = {**(overrides or {}), "position_embedding": False, "context_length": positions}
    model = _seeded(lambda: build(name, **fields))
    for block in model.blocks:
        unbounded = UnboundedAttention(block.mixer.config)
        unbounded.load_state_dict(block.mixer.state_dict())
        block.mixer = unbounded
    description = (f"{name} without learned positions (NoPE); KV cache written in place, grown {attention.KV_PAGE} "
                   f"positions at a time ({preset.description})")
    return DecodeModel(f"{name}-nope", "baseline", name, model, description)


def _check_positive(option: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")


def plan_decode(presets: list[str] | None = None, *, baseline: str | None = DEFAULT_BASELINE,
                max_tokens: int | None = None, checkpoints: list[int] | None = None, window: int | None = None,
                prompt_tokens: int = DEFAULT_PROMPT_TOKENS, batch_size: int = 1, temperature: float = 0.0,
                dtype: str = "bf16", device: str | None = None, prefill: bool = False,
                overrides: dict | None = None, baseline_overrides: dict | None = None) -> DecodePlan:
    """Check a decoding benchmark request, resolve its defaults and build its models.

    Args:
        presets: the decoded presets; None for ``["kops-ts-linear"]``.
        baseline: an attention preset decoded beside them (see ``build_baseline``), or None.
        max_tokens: decoding steps, recorded as the last checkpoint; None for the last checkpoint.
        checkpoints: strictly increasing step counts; None for 1k, 2k, ..., 64k up to ``max_tokens``.
        window: steps timed per checkpoint, at most the first checkpoint; None for 64 (or the first
            checkpoint, if smaller).
        prompt_tokens: length of the random prompt.
        batch_size: sequences decoded together.
        temperature: 0 for greedy decoding, else the sampling temperature.
        dtype: "bf16", "fp16" or "fp32".
        device: "cuda", "cuda:N" or "cpu"; None for cuda when available, else cpu.
        prefill: reach each checkpoint's window by prefilling, not decoding (see ``DecodePlan``).
        overrides: model-config fields applied to every preset's model (e.g. a smaller width for tests).
        baseline_overrides: model-config fields applied to the baseline.

    Returns:
        the DecodePlan.

    Raises:
        ValueError: a bad value, with the command-line option it came from.
    """
    if max_tokens is not None:
        _check_positive("--max-tokens", max_tokens)
    if checkpoints is None:
        limit = max_tokens or DEFAULT_CHECKPOINTS[-1]
        checkpoints = [n for n in DEFAULT_CHECKPOINTS if n < limit] + [limit]
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("--checkpoints needs at least one step count")
    for value in checkpoints:
        _check_positive("--checkpoints", value)
    if any(later <= earlier for earlier, later in zip(checkpoints, checkpoints[1:])):
        raise ValueError(f"--checkpoints must be strictly increasing, got {','.join(map(str, checkpoints))}")
    max_tokens = max_tokens or checkpoints[-1]
    if checkpoints[-1] > max_tokens:
        raise ValueError(f"--checkpoints: {checkpoints[-1]} is beyond --max-tokens {max_tokens}")
    checkpoints += [] if checkpoints[-1] == max_tokens else [max_tokens]
    window = min(DEFAULT_WINDOW, checkpoints[0]) if window is None else window
    _check_positive("--window", window)
    if window > checkpoints[0]:
        raise ValueError(f"--window {window} is longer than the first checkpoint {checkpoints[0]} (--checkpoints)")
    _check_positive("--prompt-tokens", prompt_tokens)
    _check_positive("--batch-size", batch_size)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    positions = prompt_tokens + max_tokens
    models = [_model_entry(name, overrides or {}, positions) for name in dict.fromkeys(presets or ["kops-ts-linear"])]
    if baseline:
        models.append(build_baseline(baseline, positions, baseline_overrides))
    for entry in models:
        entry.model.to(DTYPES[dtype]).eval()
    return DecodePlan(models, max_tokens, checkpoints, window, prompt_tokens, batch_size, temperature, dtype, device,
                      prefill)


def state_bytes(state) -> int:
    """Bytes of the distinct tensor storages in a decoding state of nested dicts, lists and tuples."""
    storages = {}

    def visit(item) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)

    visit(state)
    return sum(storages.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _window_timing(times_ms: list[float]) -> Timing:
    times = torch.tensor(times_ms, dtype=torch.float64)
    return Timing(*times.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def _feed_random(model: nn.Module, state, count: int, plan: DecodePlan,
                 generator: torch.Generator) -> tuple[torch.Tensor, object]:
    """Prefill ``count`` random tokens in chunks of ``PREFILL_CHUNK``; return the next token [B] and the state."""
    for first in range(0, count, PREFILL_CHUNK):
        length = min(PREFILL_CHUNK, count - first)
        tokens = torch.randint(model.config.vocab_size, (plan.batch_size, length), generator=generator,
                               device=plan.device)
        logits, state = model.prefill(tokens, state)
    return sample_next(logits[:, -1], plan.temperature, None, generator), state


def decode_model(plan: DecodePlan, entry: DecodeModel, progress: bool = False) -> tuple[list[dict], float]:
    """Generate ``plan.max_tokens`` tokens with one model, step by step, and record the checkpoints.

    The model is moved to the plan's device for the decode and back to the CPU after it, so the
    CUDA memory figures hold its weights, state and activations alone. With ``plan.prefill`` the
    tokens before each checkpoint's window are prefilled in chunks (random tokens) and only the
    window is decoded step by step; the peak memory then covers the window's steps alone.

    Args:
        plan: from ``plan_decode``.
        entry: one of ``plan.models``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        (one row per checkpoint, wall seconds of the whole decode).
    """
    device, cuda = plan.device, plan.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = entry.model.to(device)
    generator = torch.Generator(device=device).manual_seed(INPUT_SEED)
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (plan.batch_size, plan.prompt_tokens), generator=generator, device=device)
    rows, times_ms, step = [], [], 0
    bar = tqdm(total=plan.max_tokens, desc=entry.name, unit="tok", disable=not progress, leave=False)
    started = time.perf_counter()
    with torch.inference_mode():
        state = model.init_state(plan.batch_size, device, DTYPES[plan.dtype])
        logits, state = model.prefill(prompt, state)
        token = sample_next(logits[:, -1], plan.temperature, None, generator)  # [B]
        for checkpoint in plan.checkpoints:
            if plan.prefill and checkpoint - plan.window > step:
                token, state = _feed_random(model, state, checkpoint - plan.window - step, plan, generator)
                bar.update(checkpoint - plan.window - step)
                step = checkpoint - plan.window
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            while step < checkpoint:
                start = time.perf_counter()
                logits, state = model.step(token, state)
                token = sample_next(logits, plan.temperature, None, generator)
                _synchronize(device)
                times_ms.append(1e3 * (time.perf_counter() - start))
                bar.update()
                step += 1
            timing = _window_timing(times_ms[-plan.window:])
            rows.append({
                "model": entry.name, "role": entry.role, "tokens": step, "position": plan.prompt_tokens + step,
                "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
                "state_bytes": state_bytes(state),
                "allocated_bytes": torch.cuda.memory_allocated(device) if cuda else None,
                "max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            })
    seconds = time.perf_counter() - started
    bar.close()
    del state, logits, token
    model.to("cpu")
    return rows, seconds


def add_ratios(rows: list[dict]) -> None:
    """Set each row's growth against its model's first checkpoint and its speed against the baselines.

    ``latency_ratio = median_ms(N) / median_ms(first)``, ``state_ratio = state_bytes(N) /
    state_bytes(first)``, and ``vs[b] = median_ms of baseline b / median_ms`` at the same N.
    """
    first = {}
    for row in rows:
        first.setdefault(row["model"], row)
    base_ms = {(row["model"], row["tokens"]): row["median_ms"] for row in rows if row["role"] == "baseline"}
    baselines = list(dict.fromkeys(row["model"] for row in rows if row["role"] == "baseline"))
    for row in rows:
        reference = first[row["model"]]
        row["latency_ratio"] = row["median_ms"] / reference["median_ms"]
        row["state_ratio"] = row["state_bytes"] / reference["state_bytes"] if reference["state_bytes"] else None
        row["vs"] = {name: base_ms[name, row["tokens"]] / row["median_ms"] for name in baselines
                     if row["role"] != "baseline" and (name, row["tokens"]) in base_ms}


def run_decode(plan: DecodePlan, progress: bool = False) -> dict:
    """Decode with every model of the plan in turn and report.

    Args:
        plan: from ``plan_decode``.
        progress: show a progress bar per model on stderr.

    Returns:
        the report: ``{"machine", "settings", "models", "rows"}``; every model has a row per checkpoint.
    """
    rows, models = [], []
    for entry in plan.models:
        model_rows, seconds = decode_model(plan, entry, progress)
        rows += model_rows
        parameters = list(entry.model.parameters())
        models.append({
            "name": entry.name, "role": entry.role, "preset": entry.preset, "description": entry.description,
            "kind": type(entry.model).__name__, "config": asdict(entry.model.config),
            "params": sum(p.numel() for p in parameters),
            "param_bytes": sum(p.numel() * p.element_size() for p in parameters), "decode_s": seconds,
        })
    add_ratios(rows)
    timer = "time.perf_counter" + (" after torch.cuda.synchronize" if plan.device.type == "cuda" else "")
    settings = {
        "presets": [m.preset for m in plan.models if m.role == "model"],
        "baseline": next((m.preset for m in plan.models if m.role == "baseline"), None),
        "max_tokens": plan.max_tokens, "checkpoints": plan.checkpoints, "window": plan.window,
        "prompt_tokens": plan.prompt_tokens, "batch_size": plan.batch_size, "temperature": plan.temperature,
        "dtype": plan.dtype, "device": str(plan.device), "timer": timer, "seed": INPUT_SEED,
        "reached_by": f"prefill in chunks of {PREFILL_CHUNK}" if plan.prefill else "decoding",
        "peak_since": "the window's first step" if plan.prefill else "the model's start",
    }
    return {"machine": machine_info(plan.device), "settings": settings, "models": models, "rows": rows}


# ----------------------------------------------------------------------------- output


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_decode_table(report: dict) -> str:
    """The rows as an aligned text table, with growth ratios and one "x vs NAME" column per baseline."""
    rows = report["rows"]
    first = report["settings"]["checkpoints"][0]
    baselines = list(dict.fromkeys(name for row in rows for name in row["vs"]))
    header = ["model", "tokens", "ms/token", "p20", "p80", f"ms/ms@{first}", "state MiB", f"state/state@{first}",
              "allocated MiB", "peak MiB", *(f"x vs {name}" for name in baselines)]
    table = [header]
    for row in rows:
        table.append([
            row["model"], str(row["tokens"]), f"{row['median_ms']:.3f}", f"{row['p20_ms']:.3f}", f"{row['p80_ms']:.3f}",
            _ratio(row["latency_ratio"]), _mib(row["state_bytes"]), _ratio(row["state_ratio"]),
            _mib(row["allocated_bytes"]), _mib(row["max_allocated_bytes"]),
            *(_ratio(row["vs"].get(name)) for name in baselines),
        ])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def format_decode_report(report: dict) -> str:
    """The machine line, the models, the table and the growth summary as printed by ``linmix bench decode``."""
    machine, settings = report["machine"], report["settings"]
    lines = [
        machine_line("decode", machine),
        f"dtype {settings['dtype']}, batch {settings['batch_size']}, prompt {settings['prompt_tokens']} tokens, "
        f"{'greedy' if settings['temperature'] == 0 else 'temperature ' + str(settings['temperature'])}, "
        f"median of the {settings['window']} steps before each checkpoint (reached by {settings['reached_by']}), "
        f"timer {settings['timer']}",
    ]
    lines += [f"{m['role']:<8} {m['name']}: {m['params']:,} parameters; {m['description']}" for m in report["models"]]
    lines.append(format_decode_table(report))
    lines.append("state = bytes of the tensors a model carries between steps; x vs NAME = ms/token of NAME / "
                 "ms/token of the row, at the same tokens: above 1 is faster than NAME")
    last = {}
    for row in report["rows"]:
        last[row["model"]] = row
    first = settings["checkpoints"][0]
    lines += [f"  {name}: ms/token x{row['latency_ratio']:.2f}, state x{_ratio(row['state_ratio'])} "
              f"from {first} to {row['tokens']} tokens" for name, row in last.items()]
    return "\n".join(lines)

