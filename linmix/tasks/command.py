"""`linmix synth`: run a grid of synthetic-task runs, resumably, and write its table and plots.

Module-level imports stay light (no torch) so that `linmix --help` is fast; the command imports
the rest when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from linmix.errors import UsageError
from linmix.tasks.protocols import PROTOCOLS, RECIPES


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got {text!r}") from None

    return parse


def _pairs(text: str, flag: str) -> dict:
    pairs = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes field=value pairs separated by commas, got {text!r}")
        pairs[key.strip()] = yaml.safe_load(value.strip())
    return pairs


def _mixer_overrides(items: list[str]) -> dict[str, dict]:
    overrides: dict[str, dict] = {}
    for item in items:
        mixer, sep, fields = item.partition(":")
        if not sep or not mixer:
            raise UsageError(f"--mixer-kwargs takes MIXER:field=value[,field=value], got {item!r}")
        overrides.setdefault(mixer, {}).update(_pairs(fields, "--mixer-kwargs"))
    return overrides


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `synth` command to the CLI's subparsers.

    Args:
        subparsers: what `ArgumentParser.add_subparsers` returned.

    Returns:
        The `synth` parser (its `run` default is `cmd_synth`).
    """
    tasks = ", ".join(f"{name} (cells {p.cell_help}; default {','.join(p.cells)})" for name, p in PROTOCOLS.items())
    synth = subparsers.add_parser(
        "synth", help="train a grid of synthetic-task runs (MQAR, copy, multi-hop, parity, S5) and tabulate them",
        description="Runs cells x mixers x widths x lrs x seeds as parallel worker processes on one device, "
                    "stops each run at the target test accuracy, skips finished runs when run again, and writes "
                    "OUT/results.jsonl, OUT/summary.md and plots. Unset flags take the task protocol's values "
                    f"(linmix/tasks/protocols.py). Tasks: {tasks}.",
    )
    synth.add_argument("--task", choices=sorted(PROTOCOLS), default="mqar", help="the task (default mqar)")
    synth.add_argument("--mixers", type=_csv(str), default=["attention", "k2"],
                       help="comma list of registered mixers (default attention,k2)")
    synth.add_argument("--d-model", type=_csv(int), help="comma list of widths, e.g. 64,128,256 (default: the protocol's)")
    synth.add_argument("--lr", type=_csv(float), help="comma list of peak learning rates, e.g. 1e-3,3.2e-3 (default: the protocol's)")
    synth.add_argument("--seeds", type=_csv(int), help="comma list of seeds, e.g. 0,1,2 (default: the protocol's)")
    synth.add_argument("--cells", type=_csv(str),
                       help="comma list of cells or cell-set names, e.g. 256:16,512:64 for MQAR (T:kv; default: the protocol's)")
    synth.add_argument("--out", required=True, help="sweep folder (created; reused to resume)")
    synth.add_argument("--parallel", type=int, default=1, help="worker processes sharing the device (default 1)")
    synth.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    model = synth.add_argument_group("model (default: the task's recipe)")
    model.add_argument("--recipe", choices=sorted(RECIPES),
                       help="zoology: 2 layers, no MLP, short conv 3; pdn: 2 layers with MLPs, short conv 3; "
                            "structured: 2 layers with MLPs, learned positions; state: 2 layers with MLPs (default: the task's)")
    model.add_argument("--layers", type=int, help="mixer blocks (default: the recipe's)")
    model.add_argument("--mlp-ratio", type=int, help="MLP width over d_model after each mixer; 0 for no MLP (default: the recipe's)")
    model.add_argument("--short-conv", type=int, help="short causal conv (zoology's BaseConv) kernel; 0 for none (default: the recipe's)")
    model.add_argument("--positions", choices=("on", "off"), help="learned absolute position embeddings (default: the recipe's)")
    model.add_argument("--mixer-kwargs", action="append", default=[], metavar="MIXER:FIELD=VALUE[,...]",
                       help="a mixer's config fields, e.g. k2:kbase=toeplitz,kbase_taps=16 (repeatable; default: none)")
    data = synth.add_argument_group("data and training (default: the task's protocol)")
    data.add_argument("--task-arg", action="append", default=[], metavar="FIELD=VALUE",
                      help="a generator argument every cell shares, e.g. vocab_size=512 or random_non_queries=false (default: none)")
    data.add_argument("--batch-size", type=int, help="training examples per step (default: the protocol's)")
    data.add_argument("--epochs", type=int, help="passes over fixed training sets, MQAR (default: the protocol's)")
    data.add_argument("--max-steps", type=int, help="step budget, caps the epochs' steps for fixed sets (default: the protocol's)")
    data.add_argument("--eval-interval", type=int, help="steps between test evaluations (default: the protocol's; MQAR once an epoch)")
    data.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay (default: the protocol's)")
    data.add_argument("--target", type=float, help="test accuracy that stops a run (default 0.99)")
    data.add_argument("--data-seed", type=int, default=0, help="seeds the fixed training and test sets (default 0)")
    planning = synth.add_argument_group("planning")
    planning.add_argument("--plan", action="store_true",
                          help="train nothing: time a few steps of each configuration and estimate the grid's "
                               "device time")
    planning.add_argument("--budget-minutes", type=float,
                          help="with --plan: how many runs fit; otherwise: stop the grid after this many minutes (default: no limit)")
    planning.add_argument("--probe-steps", type=int, default=50,
                          help="timed steps per configuration in --plan (default 50)")
    synth.add_argument("--summarize-only", action="store_true", help="train nothing; write the table and plots")
    synth.set_defaults(run=cmd_synth)
    return synth


def _settings(args, protocol) -> dict:
    def pick(value, default):
        return default if value is None else value

    settings = {
        "batch_size": pick(args.batch_size, protocol.batch_size),
        "test_batch_size": protocol.test_batch_size,
        "epochs": pick(args.epochs, protocol.epochs),
        "max_steps": pick(args.max_steps, protocol.max_steps),
        "eval_interval": pick(args.eval_interval, protocol.eval_interval),
        "warmup_steps": pick(args.warmup_steps, protocol.warmup_steps),
        "weight_decay": protocol.weight_decay,
        "grad_clip": protocol.grad_clip,
        "target": pick(args.target, protocol.target),
        "device": args.device,
        "data_seed": args.data_seed,
    }
    for name in ("batch_size", "epochs", "max_steps", "eval_interval"):
        if settings[name] is not None and settings[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["warmup_steps"] < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {settings['warmup_steps']}")
    if not 0 < settings["target"] <= 1:
        raise UsageError(f"--target must be in (0, 1], got {settings['target']}")
    return settings


def _check_grid(args, d_models, lrs) -> None:
    if args.parallel < 1:
        raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise UsageError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.probe_steps < 1:
        raise UsageError(f"--probe-steps must be >= 1, got {args.probe_steps}")
    if not args.mixers:
        raise UsageError("--mixers names no mixer")
    if any(d < 1 for d in d_models):
        raise UsageError(f"--d-model values must be >= 1, got {d_models}")
    if any(not lr > 0 for lr in lrs):
        raise UsageError(f"--lr values must be > 0, got {lrs}")


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device("cpu" if device == "auto" else device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")


def _check_cells(specs: list[dict]) -> None:
    """Generate one example of every segment, so bad cell arguments fail before any run starts."""
    from linmix.tasks.train import generate

    seen = set()
    for spec in specs:
        for segment in spec["train"] + spec["test"]:
            key = repr((spec["fixed"], segment["args"]))
            if key not in seen:
                seen.add(key)
                try:
                    generate(spec, segment["args"], 1, 0)
                except (TypeError, ValueError) as error:
                    raise UsageError(f"cell {spec['cell']}: {error}") from None


def cmd_synth(args) -> int:
    """Run (or plan, or only summarise) a synthetic-task grid; exit 1 if a run failed."""
    from linmix.tasks.protocols import expand_cells, get_protocol
    from linmix.tasks.report import write_report
    from linmix.tasks.runner import build_specs, default_recipe, plan_grid, run_grid

    out_dir = Path(args.out)
    if args.summarize_only:
        written = write_report(out_dir)
        if not written:
            raise UsageError(f"{out_dir} holds no finished run")
        print("\n".join(map(str, written)))
        return 0
    protocol = get_protocol(args.task)
    d_models = args.d_model or list(protocol.d_models)
    lrs = args.lr or list(protocol.lrs)
    seeds = args.seeds or list(protocol.seeds)
    _check_grid(args, d_models, lrs)
    _check_device(args.device)
    try:
        cells = expand_cells(protocol, args.cells or list(protocol.cells))
    except ValueError as error:
        raise UsageError(str(error)) from None
    task_args = {}
    for item in args.task_arg:
        task_args.update(_pairs(item, "--task-arg"))
    unknown = sorted(set(task_args) - set(protocol.fixed))
    if unknown:
        raise UsageError(f"--task-arg {unknown}: task {protocol.task} takes {sorted(protocol.fixed) or 'none'}")
    positions = None if args.positions is None else args.positions == "on"
    recipe = default_recipe(protocol, args.recipe, n_layers=args.layers, mlp_ratio=args.mlp_ratio,
                            short_conv=args.short_conv, position_embedding=positions)
    if recipe.n_layers < 1 or recipe.mlp_ratio < 0 or recipe.short_conv < 0:
        raise UsageError(f"need --layers >= 1, --mlp-ratio >= 0 and --short-conv >= 0, got {recipe}")
    overrides = _mixer_overrides(args.mixer_kwargs)
    strays = sorted(set(overrides) - set(args.mixers))
    if strays:
        raise UsageError(f"--mixer-kwargs names {strays}, which --mixers {args.mixers} does not")
    try:
        specs = build_specs(protocol, cells, args.mixers, d_models, lrs, seeds, recipe, _settings(args, protocol),
                            {**protocol.fixed, **task_args}, overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    _check_cells(specs)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plan:
        budget_s = None if args.budget_minutes is None else args.budget_minutes * 60
        plan_grid(specs, out_dir, args.parallel, args.probe_steps, budget_s)
        return 0
    outcome = run_grid(specs, out_dir, args.parallel,
                       None if args.budget_minutes is None else args.budget_minutes * 60)
    for path in write_report(out_dir):
        print(f"wrote {path}")
    return 1 if outcome["failed"] else 0
