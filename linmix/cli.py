"""The `linmix` command: train, eval, sample, export, sweep, plot, bench, synth and presets.

Run `linmix COMMAND --help` for the flags of each command. A user error (an unknown name, a value
out of range, a missing or damaged file) prints one line, `linmix COMMAND: error: ...`, and exits
with code 2; an operating-system failure (disk full, say) prints one line and exits with code 1.
The parser imports no torch, so `--help` answers at once; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from linmix.errors import LinmixError, UsageError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
FROM_PRESET = "default: from the preset, see `linmix presets`"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (`PROG: error: ...`) with exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _float_at_least(low: float):
    """An argparse type: a finite number >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low}, got {text!r}")
        return value

    return parse


def _check_device(text: str, flag: str = "--device") -> str:
    """A torch device string that names a device this machine has; UsageError otherwise."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text}: torch sees no CUDA device on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {text!r}")
    return text


def _parse_overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs as {KEY: VALUE}, each value read as YAML; a mixer field's KEY may be
    written mixer_kwargs.FIELD."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(part) for part in text.split(",") if part]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from error

    return parse


def _load_corpus(name: str, data_path: str | None, **options):
    """`linmix.data.load_corpus` with a missing file or a misfit tokenizer as a one-line UsageError."""
    from linmix.data import load_corpus

    try:
        return load_corpus(name, data_path, **options)
    except FileNotFoundError as error:
        raise UsageError(f"--data {data_path}: {error}" if data_path else str(error)) from None
    except ValueError as error:
        raise UsageError(str(error)) from None


def _train_corpus(preset, args):
    """The corpus of `linmix train`: the preset's, or the text folder of --data (see `choose_corpus`)."""
    from linmix.data import choose_corpus

    try:
        name, tokenizer = choose_corpus(preset.corpus, args.data, args.tokenizer)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.vocab_size is not None and tokenizer != "sentencepiece":
        raise UsageError(f"--vocab-size sets the pieces of a sentencepiece tokenizer; {name} uses {tokenizer}")
    return _load_corpus(name, args.data, tokenizer=tokenizer, vocab_size=args.vocab_size)


def _check_head_fits(preset, vocab_size: int) -> None:
    """An adaptive head's cutoffs must lie below the tokenizer's vocabulary size."""
    cutoffs = preset.model.get("adaptive_cutoffs", ())
    if preset.model.get("head") == "adaptive" and max(cutoffs, default=0) >= vocab_size:
        raise UsageError(
            f"the adaptive head's cutoffs {list(cutoffs)} must be < the tokenizer's {vocab_size} ids; "
            f"lower them with --set adaptive_cutoffs=[...] or ask for more pieces with --vocab-size"
        )


def cmd_presets(args) -> int:
    """Print every preset with its parameter count and training recipe."""
    from linmix.models import PRESETS, build
    from linmix.train import TrainConfig

    rows = []
    for preset in PRESETS.values():
        model = build(preset.name)
        recipe = TrainConfig.from_dict(preset.train)
        rows.append({"name": preset.name, "params": model.num_parameters(), "corpus": preset.corpus,
                     "context_length": model.config.context_length, "max_steps": recipe.max_steps,
                     "batch_size": recipe.batch_size, "lr": recipe.lr, "eval_interval": recipe.eval_interval,
                     "eval_protocols": list(recipe.eval_protocols), "description": preset.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'preset':<{width}}  {'params':>11}  {'T':>5}  {'steps':>6}  {'batch':>5}  {'lr':>7}  "
          f"{'eval every':>10}  {'protocols':<11}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['params']:>11,}  {r['context_length']:>5}  {r['max_steps']:>6}  "
              f"{r['batch_size']:>5}  {r['lr']:>7.2g}  {r['eval_interval']:>10}  "
              f"{','.join(r['eval_protocols']):<11}  {r['description']}")
    return 0


def _compile_fields(args) -> dict:
    """TrainConfig's `compile` from --compile / --compile-mode (which implies --compile), and `compile_mode`
    where --compile-mode names one (else the preset's recipe decides)."""
    fields = dict(compile=args.compile or args.compile_mode is not None)
    return fields if args.compile_mode is None else dict(fields, compile_mode=args.compile_mode)


def _eval_budget(text: str) -> float | None:
    """--eval-budget: a positive number, or none for no budget."""
    if text.lower() in ("none", "null"):
        return None
    value = _float_at_least(0.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or none, got {text!r}")
    return value


def _train_config(args, preset, out_dir: Path):
    from linmix.train import TrainConfig

    values = dict(preset.train)
    flag_fields = {
        "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr, "lr_floor": args.lr_floor,
        "warmup_steps": args.warmup_steps, "eval_interval": args.eval_interval,
        "eval_batch_size": args.eval_batch_size, "eval_random_iters": args.eval_random_iters,
        "context_length": args.context_length, "seed": args.seed, "device": args.device,
        "log_interval": args.log_interval, "eval_protocols": args.eval_protocols,
        "max_nonfinite_steps": args.max_nonfinite_steps,
    }
    values.update({k: v for k, v in flag_fields.items() if v is not None})
    if hasattr(args, "eval_budget"):  # given on the command line (the flag's default is the preset's)
        values["eval_budget"] = args.eval_budget
    if args.max_steps is not None and args.warmup_steps is None:
        values["warmup_steps"] = min(values.get("warmup_steps", TrainConfig.warmup_steps), args.max_steps)
    values.update(**_compile_fields(args), out_dir=str(out_dir))
    return TrainConfig.from_dict(values)


def cmd_train(args) -> int:
    """Train a preset, as one process or as every rank of a torchrun launch; print the best validation
    perplexity (rank 0)."""
    import dataclasses

    from linmix.models import get_preset, with_overrides
    from linmix.train import distributed_context, rank_zero_first

    try:
        preset = get_preset(args.preset)
    except KeyError as error:
        raise UsageError(error.args[0]) from None
    if args.device is not None:
        _check_device(args.device)
    try:
        preset = with_overrides(preset, **_parse_overrides(args.set))
        out_dir = Path(args.out or f"runs/{preset.name}-seed{args.seed or preset.train.get('seed', 42)}")
        config = _train_config(args, preset, out_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None
    with distributed_context(config.device, fsdp=args.fsdp) as (rank, world_size, device):
        config = dataclasses.replace(config, device=device)  # cuda:LOCAL_RANK under torchrun
        with rank_zero_first():  # rank 0 trains and caches the tokenizer, then the other ranks read it
            corpus = _train_corpus(preset, args)
        trainer = _build_trainer(preset, corpus, config, args, announce=rank == 0)
        if rank == 0:
            print(f"global batch {trainer.global_batch_size:,} windows = {world_size} process(es) x "
                  f"{config.batch_size} ({trainer.tokens_per_step:,} {corpus.unit}s per step"
                  f"{', FSDP2' if args.fsdp else ''})")
        summary = trainer.fit()
    if rank == 0:
        _print_train_summary(summary, corpus.unit, world_size)
    return 0


def _build_trainer(preset, corpus, config, args, announce: bool):
    """The preset's model (the same weights on every rank) and its Trainer; `announce` prints the corpus
    and the model."""
    import torch

    from linmix.models import model_spec
    from linmix.train import Trainer

    _check_head_fits(preset, corpus.vocab_size)
    torch.manual_seed(config.seed)
    try:
        model = preset.build_model(vocab_size=corpus.vocab_size)
    except ValueError as error:
        raise UsageError(f"--set: {error}") from None
    meta = {"preset": preset.name, "model": model_spec(model), "tokenizer": corpus.tokenizer.to_meta(),
            "corpus": corpus.to_meta(), "ppl_unit": corpus.unit}
    if corpus.tokenizer.kind == "char":
        meta["vocab"] = corpus.tokenizer.vocab
    if announce:
        counts = ", ".join(f"{split} {count:,}" for split, count in corpus.token_counts.items())
        print(f"corpus {corpus.name} at {corpus.source}: {corpus.vocab_size:,} {corpus.unit} ids; "
              f"{corpus.unit}s: {counts}")
        print(f"preset {preset.name}: {model.num_parameters():,} parameters, device {config.device}, "
              f"out {config.out_dir}")
    try:
        return Trainer(model, corpus.train, corpus.val, config, checkpoint_meta=meta, resume=args.resume,
                       stop_after=args.stop_after, progress=not args.no_progress, token_unit=corpus.unit,
                       fsdp=args.fsdp)
    except (FileExistsError, ValueError) as error:
        raise UsageError(str(error)) from None


def _print_train_summary(summary: dict, unit: str, world_size: int) -> None:
    protocols = ", ".join(
        f"{name}: {best['ppl']:.4f} (step {best['step']})" for name, best in summary["best"].items()
    )
    print(f"best val PPL per {unit}  {protocols}")
    speed = summary.get("tokens_per_s_steady") or summary.get("tokens_per_s_mean")
    per_gpu = summary.get("tokens_per_s_steady_per_gpu") or summary.get("tokens_per_s_mean_per_gpu")
    per_gpu_text = f" ({per_gpu or 0:.0f} per process)" if world_size > 1 else ""
    print(f"tokens/s {speed or 0:.0f}{per_gpu_text}   train time {summary['train_time_s']:.1f} s   "
          f"steps {summary['step']}")


def _load_model(ckpt_path: str, device: str):
    """The model of a checkpoint written by `linmix train`, on `device` in eval mode, with the
    checkpoint and its meta; a missing, damaged or foreign file is a one-line error (CheckpointError)."""
    from linmix.train.checkpoint import load_trained_model

    model, checkpoint, meta = load_trained_model(Path(ckpt_path))
    return model.to(device).eval(), checkpoint, meta


def _eval_settings(args, checkpoint) -> dict:
    """The evaluation flags, each defaulting to the run's own setting (else TrainConfig's default)."""
    from linmix.train import TrainConfig
    from linmix.train.config import EVAL_PROTOCOLS

    run = {**TrainConfig.from_dict({}).to_dict(), **checkpoint.get("config", {})}
    settings = {"protocols": args.protocols or run["eval_protocols"],
                "batch_size": args.batch_size or run["eval_batch_size"],
                "random_iters": args.random_iters or run["eval_random_iters"],
                "seed": run["eval_seed"] if args.seed is None else args.seed}
    unknown = [p for p in settings["protocols"] if p not in EVAL_PROTOCOLS]
    if unknown or not settings["protocols"]:
        raise UsageError(f"--protocols must be a comma list of {', '.join(EVAL_PROTOCOLS)}, got {unknown or 'none'}")
    return settings


def cmd_eval(args) -> int:
    """Evaluate a checkpoint on the validation (or test) split; print JSON."""
    import torch
    from tqdm import tqdm

    from linmix.data import count_eval_windows
    from linmix.train import evaluate_full, evaluate_random

    _check_device(args.device)
    model, checkpoint, meta = _load_model(args.ckpt, args.device)
    settings = _eval_settings(args, checkpoint)
    tokenizer = _checkpoint_tokenizer(args.ckpt, meta)
    corpus_meta = meta.get("corpus", {})
    recorded = corpus_meta.get("source") if Path(corpus_meta.get("source", "")).exists() else None
    corpus = _load_corpus(corpus_meta.get("name", "tinyshakespeare-char"), args.data or recorded,
                          tokenizer=tokenizer, need_train=False)
    tokens = corpus.val if args.split == "valid" else corpus.test
    if tokens is None:
        raise UsageError(f"--split test: {corpus.name} at {corpus.source} has no test split "
                         "(test.txt or wiki.test.tokens beside valid)")
    prefix = "val" if args.split == "valid" else "test"
    window, batch = int(model.config.context_length), settings["batch_size"]
    batches = {"full": -(-count_eval_windows(len(tokens), window) // batch), "random": settings["random_iters"]}
    cost = ", ".join(f"{p} {batches[p]:,} batches of up to {batch} x {window} tokens" for p in settings["protocols"])
    print(f"evaluating {args.ckpt} (step {checkpoint.get('step')}) on {args.split}: {cost}", file=sys.stderr)
    results = {"ckpt": str(args.ckpt), "step": checkpoint.get("step"), "params": model.num_parameters(),
               "corpus": corpus.name, "split": args.split, "ppl_unit": corpus.unit, f"{prefix}_tokens": len(tokens)}
    for protocol in settings["protocols"]:
        with tqdm(total=batches[protocol], desc=f"eval {protocol}", unit="batch", disable=args.no_progress) as bar:
            def advance(done: int, total: int) -> None:
                bar.update(done - bar.n)

            if protocol == "full":
                full = evaluate_full(model, tokens, window, batch, on_batch=advance)
                results.update({f"{prefix}_loss_full": full["loss"], f"{prefix}_ppl_full": full["ppl"],
                                "tokens_full": full["tokens"]})
            else:
                generator = torch.Generator().manual_seed(settings["seed"])
                rand = evaluate_random(model, tokens, window, batch, settings["random_iters"], generator,
                                       on_batch=advance)
                results.update({f"{prefix}_loss_random": rand["loss"], f"{prefix}_ppl_random": rand["ppl"]})
    print(json.dumps(results, indent=2))
    return 0


def cmd_sample(args) -> int:
    """Generate text from a checkpoint."""
    import torch

    from linmix.models import generate

    _check_device(args.device)
    model, _, meta = _load_model(args.ckpt, args.device)
    tokenizer = _checkpoint_tokenizer(args.ckpt, meta)
    prompt_text = args.prompt if args.prompt is not None else ("\n" if tokenizer.kind == "char" else "The")
    try:
        prompt_ids = tokenizer.encode(prompt_text)
    except ValueError as error:
        raise UsageError(f"--prompt must use the model's characters: {error}") from None
    if not prompt_ids:
        raise UsageError(f"--prompt {prompt_text!r} encodes to no tokens; give some text")
    prompt = torch.tensor([prompt_ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
    print(tokenizer.decode(out[0]))
    return 0


def _checkpoint_tokenizer(ckpt_path: str, meta: dict):
    """The tokenizer stored in a checkpoint's meta (or its characters, in older checkpoints)."""
    from linmix.data import tokenizer_from_meta

    try:
        return tokenizer_from_meta(meta)
    except ValueError as error:
        raise UsageError(f"--ckpt {ckpt_path}: {error}") from None


def cmd_sweep(args) -> int:
    """Train a preset once per seed (resuming unfinished runs, skipping finished ones), then
    write the sweep summary; exit 1 if a run failed."""
    from linmix.models import get_preset, with_overrides
    from linmix.sweep import aggregate_lines, run_sweep, summarize_sweep

    out_dir = Path(args.out)
    failed = []
    if not args.summarize_only:
        if not args.preset or not args.seeds:
            raise UsageError("--preset and --seeds are needed unless --summarize-only is given")
        if args.parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
        train_args = build_parser().parse_args(["train", "--preset", args.preset, *args.train_flags])
        try:
            with_overrides(get_preset(args.preset), **_parse_overrides(train_args.set))
            failed = run_sweep(args.preset, args.seeds, out_dir, args.train_flags, args.parallel)
        except KeyError as error:
            raise UsageError(error.args[0]) from error
        except ValueError as error:
            raise UsageError(str(error)) from error
    try:
        summary = summarize_sweep(out_dir)
    except (FileNotFoundError, ValueError) as error:  # ValueError: runs of different PPL units
        raise UsageError(str(error)) from error
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
    for line in aggregate_lines(summary):
        print(line)
    if summary["unfinished"]:
        print(f"unfinished (excluded): {', '.join(summary['unfinished'])}")
    if failed:
        print(f"linmix sweep: runs failed: seeds {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args) -> int:
    """Draw learning curves and learned-dynamics figures of runs and sweeps as PNG files."""
    from linmix.diagnostics import load_group, write_figures

    try:
        groups = [load_group(path) for path in args.runs]
        reference = load_group(args.reference) if args.reference else None
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    out = args.out or Path(args.runs[0]) / "figures"
    for path in write_figures(groups, out, reference):
        print(path)
    return 0


def cmd_bench(args) -> int:
    """Benchmark an op's backends, or a mixer's, against baselines measured in the same run; print a
    table, optionally write JSON and a plot; exit 1 if a backend failed the correctness gate."""
    import torch

    from linmix.bench import (
        format_list,
        format_report,
        parse_options,
        plan_benchmark,
        plot_times,
        run_benchmark,
        write_json,
    )

    if args.list:
        print(format_list(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))))
        return 0
    if not args.op:
        raise UsageError("--op is needed (see `linmix bench --list`)")
    try:
        plan = plan_benchmark(
            args.op, mixer=args.mixer, backends=args.backends, modes=args.modes, shapes=args.shapes, dtype=args.dtype,
            device=args.device, options=parse_options(args.option), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
            peak_tflops=args.peak_tflops, peak_gbps=args.peak_gbps, kernel_calls=args.kernels,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error

    def progress(row):
        done = f"{row['median_ms']:.4f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        print(f"  {row['backend']} {row['mode']} {row['label']}: {done}", file=sys.stderr, flush=True)

    report = run_benchmark(plan, progress=progress)
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {plot_times(report, args.plot)}")
    failed = sorted({row["backend"] for row in report["rows"] if row["status"] == "gate failed"})
    if failed:
        print(f"linmix bench: the correctness gate failed for {', '.join(failed)} (not timed)", file=sys.stderr)
        return 1
    return 0


def cmd_bench_decode(args) -> int:
    """Decode with each preset and the attention baseline step by step; print per-token latency and
    state memory at each checkpoint, optionally write JSON and a plot."""
    from linmix.bench import format_decode_report, plan_decode, plot_decode, run_decode, write_json

    given = {"window": args.window, "prompt_tokens": args.prompt_tokens, "batch_size": args.batch_size,
             "temperature": args.temperature}  # None: plan_decode's default
    try:
        plan = plan_decode(
            args.presets, baseline=None if args.baseline == "none" else args.baseline, max_tokens=args.max_tokens,
            checkpoints=args.checkpoints, dtype=args.dtype, device=args.device, prefill=args.prefill,
            **{name: value for name, value in given.items() if value is not None},
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    report = run_decode(plan, progress=not args.no_progress)
    print(format_decode_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {plot_decode(report, args.plot)}")
    return 0


def cmd_bench_train(args) -> int:
    """Train each preset and the baseline for a few steps at each batch size; print tokens/s and the
    ratio to the baseline, optionally write JSON."""
    from linmix.bench import format_train_report, plan_train, run_train, write_json

    try:
        plan = plan_train(
            args.presets, baseline=None if args.baseline == "none" else args.baseline,
            context_length=args.context_length, batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup,
            **{"compile_mode": "default", **_compile_fields(args)}, device=args.device,
            overrides=_parse_overrides(args.set), profile_steps=args.profile_steps,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    report = run_train(plan, progress=not args.no_progress)
    print(format_train_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def cmd_bench_solver(args) -> int:
    """Run the Gated KalmaNet solver study; print its tables, optionally write JSON, and draw its two figures."""
    from linmix.bench import write_json
    from linmix.bench.solver import format_solver_report, plan_solver_study, plot_solver_study, run_solver_study

    device = _check_device(args.device) if args.device else None
    try:
        plan = plan_solver_study(batch_size=args.batch_size, seq_len=args.seq_len, heads=args.heads,
                                 head_dim=args.head_dim, ridge=args.ridge, iters=args.iters, stride=args.stride,
                                 seed=args.seed, dtype=args.dtype, device=device)
    except ValueError as error:
        raise UsageError(str(error)) from error
    report = run_solver_study(plan, progress=not args.no_progress)
    print(format_solver_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot_dir != "none":
        for path in plot_solver_study(report, args.plot_dir):
            print(f"wrote {path}")
    return 0


def _add_compile_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """--compile and --compile-mode, read back by `_compile_fields`."""
    parser.add_argument("--compile", action="store_true", help=f"train through torch.compile ({default})")
    parser.add_argument("--compile-mode", metavar="MODE",
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or "
                             f"max-autotune-no-cudagraphs; implies --compile ({default})")


def _add_train_parser(sub) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train", help="train a preset",
        description="Train a preset on its corpus. Every flag left out takes the preset's recipe (see "
                    "`linmix presets`). Evaluations run at step 0, every --eval-interval steps and at the end; "
                    "the full protocol reads every non-overlapping validation window (111,360 tokens of Tiny "
                    "Shakespeare at T = 256), the random one --eval-random-iters batches of --eval-batch-size "
                    "windows (200 x 64 x 256 = 3.3M tokens, 29 times the full one). All evaluations of a run "
                    "read at most --eval-budget times the tokens it trains on, so a few-step run evaluates in "
                    "seconds; the first line of the log says what each evaluation reads.",
    )
    train.add_argument("--preset", required=True, help="preset name (see `linmix presets`; required)")
    train.add_argument("--out", help="run folder (default: runs/PRESET-seedS)")
    train.add_argument("--data", metavar="PATH",
                       help="corpus file or folder (default: $LINMIX_DATA_DIR, else the download cache); a folder "
                            "of train.txt and valid.txt (optionally test.txt) trains any preset on that text")
    train.add_argument("--tokenizer", choices=["char", "sentencepiece"],
                       help="tokenizer of a --data text folder: characters, or a SentencePiece unigram model "
                            "trained on train.txt and cached beside it (default: the preset's corpus's: char for "
                            "character presets, sentencepiece for subword ones)")
    train.add_argument("--vocab-size", type=_int_at_least(2), metavar="N",
                       help="pieces of the sentencepiece tokenizer; the model's vocabulary follows the pieces "
                            "actually trained (default: 8192)")
    train.add_argument("--device", help=f"cpu, cuda or cuda:N ({FROM_PRESET}: cpu)")
    train.add_argument("--seed", type=_int_at_least(0), help=f"seed of the batches and the weights ({FROM_PRESET})")
    train.add_argument("--max-steps", type=_int_at_least(1), help=f"optimizer steps in the whole run ({FROM_PRESET})")
    train.add_argument("--batch-size", type=_int_at_least(1),
                       help=f"windows per step on each process; under torchrun the global batch is N processes x "
                            f"this ({FROM_PRESET})")
    train.add_argument("--context-length", type=_int_at_least(1), metavar="T",
                       help="training window T (default: the model's context length)")
    train.add_argument("--lr", type=_float_at_least(0.0), help=f"peak learning rate ({FROM_PRESET})")
    train.add_argument("--lr-floor", type=_float_at_least(0.0),
                       help=f"learning rate at the last step, the end of the cosine ({FROM_PRESET})")
    train.add_argument("--warmup-steps", type=_int_at_least(0),
                       help=f"steps of linear warmup ({FROM_PRESET}, cut to --max-steps)")
    train.add_argument("--eval-interval", type=_int_at_least(1), help=f"steps between evaluations ({FROM_PRESET})")
    train.add_argument("--eval-batch-size", type=_int_at_least(1), help=f"windows per evaluation batch ({FROM_PRESET})")
    train.add_argument("--eval-random-iters", type=_int_at_least(1),
                       help=f"batches of the random protocol ({FROM_PRESET})")
    train.add_argument("--eval-protocols", type=_csv(str), metavar="LIST",
                       help=f"comma list of full,random ({FROM_PRESET})")
    train.add_argument("--eval-budget", type=_eval_budget, default=argparse.SUPPRESS, metavar="X",
                       help="all evaluations read at most X times the tokens the run trains on, or none for the "
                            f"whole protocols at every evaluation ({FROM_PRESET}: 1.0)")
    train.add_argument("--log-interval", type=_int_at_least(1), help=f"steps between training records ({FROM_PRESET})")
    train.add_argument("--max-nonfinite-steps", type=_int_at_least(1), metavar="N",
                       help="a step with a non-finite loss or gradients is skipped; stop after N of them in a row "
                            f"({FROM_PRESET}: 8)")
    _add_compile_flags(train, FROM_PRESET)
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun, shard the model, gradients and optimizer state over the processes with "
                            "FSDP2 instead of replicating the model with DDP (default: DDP; see docs/DISTRIBUTED.md)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    train.add_argument("--stop-after", type=_int_at_least(0), metavar="N",
                       help="stop after step N, to resume later (default: run to --max-steps)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model config field or a field of its mixer, e.g. --set decay_backend=chunk "
                            "or --set mixer_kwargs.rank=16; the value is read as YAML (repeatable; default: none)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(run=cmd_train)
    return train


def _add_checkpoint_parsers(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="evaluate a checkpoint on the validation (or test) split",
        description="Evaluate a checkpoint of `linmix train` on the validation (or --split test) split and print JSON. The flags "
                    "left out take the run's own evaluation settings. Cost: the full protocol reads every "
                    "non-overlapping window once (436 windows of 256 tokens for Tiny Shakespeare), the random one "
                    "--random-iters batches of --batch-size windows (200 x 64 by default: 29 times the full one).",
    )
    evaluate.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/NAME/best.pt (required)")
    evaluate.add_argument("--split", choices=["valid", "test"], default="valid",
                          help="the split to evaluate; test needs a corpus with a test file, e.g. WikiText-2's "
                               "(default: valid, the split the run selected its checkpoint on)")
    evaluate.add_argument("--data", metavar="PATH",
                          help="corpus file or folder; the checkpoint's tokenizer encodes it (default: the folder "
                               "the run trained on, else $LINMIX_DATA_DIR, else the download cache)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    evaluate.add_argument("--batch-size", type=_int_at_least(1), help="windows per batch (default: the run's, 64)")
    evaluate.add_argument("--protocols", type=_csv(str), metavar="LIST",
                          help="comma list of full,random (default: the run's)")
    evaluate.add_argument("--random-iters", type=_int_at_least(1),
                          help="batches of the random protocol (default: the run's, 200)")
    evaluate.add_argument("--seed", type=_int_at_least(0), help="seed of the random windows (default: the run's, 1337)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    evaluate.set_defaults(run=cmd_eval)

    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/NAME/best.pt (required)")
    sample.add_argument("--prompt", help="text to continue, encoded by the checkpoint's tokenizer (any text for "
                                         "sentencepiece, the model's characters for char; default: a newline "
                                         "for char models, \"The\" for sentencepiece ones)")
    sample.add_argument("--tokens", type=_int_at_least(1), default=500,
                        help="tokens (characters or pieces) to generate (default: 500)")
    sample.add_argument("--temperature", type=_float_at_least(0.0), default=0.8,
                        help="softmax temperature, 0 for the most likely token (default: 0.8)")
    sample.add_argument("--top-k", type=_int_at_least(1), help="sample among the k likeliest tokens (default: all)")
    sample.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the sampling (default: 0)")
    sample.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    sample.set_defaults(run=cmd_sample)

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `linmix` command (imports no torch: `--help` answers at once)."""
    parser = Parser(prog="linmix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list presets with their parameter counts and training recipes")
    presets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    presets.set_defaults(run=cmd_presets)

    train = _add_train_parser(sub)
    _add_checkpoint_parsers(sub)

    from linmix.hf.export import add_export_parser
    from linmix.tasks.command import add_synth_parser

    add_synth_parser(sub)
    add_export_parser(sub)

    from linmix.sweep import PassThroughFlag

    sweep = sub.add_parser("sweep", help="train a preset once per seed, resumably, and summarise the runs")
    sweep.add_argument("--preset", help="preset name (required unless --summarize-only; default: none)")
    sweep.add_argument("--seeds", type=_csv(int), help="comma list of seeds, e.g. 42,69,420 (required unless "
                                                        "--summarize-only; default: none)")
    sweep.add_argument("--out", required=True, help="sweep folder; the run of seed S goes to OUT/seed-S (required)")
    sweep.add_argument("--parallel", type=_int_at_least(1), default=1, help="runs at a time (default: 1)")
    sweep.add_argument("--summarize-only", action="store_true",
                       help="train nothing; write OUT/summary.json and OUT/summary.md from the runs there")
    passed_on = sweep.add_argument_group("train flags", "given unchanged to every run (see `linmix train --help`)")
    for action in train._actions:  # every train flag except those the sweep sets per run
        if action.option_strings and action.dest not in ("help", "preset", "out", "seed", "resume", "no_progress"):
            takes_value = action.nargs != 0
            passed_on.add_argument(*action.option_strings, action=PassThroughFlag, dest="train_flags",
                                   nargs=None if takes_value else 0, help=action.help,
                                   metavar=(action.metavar or action.dest.upper()) if takes_value else None)
    sweep.set_defaults(run=cmd_sweep, train_flags=[])

    plot = sub.add_parser("plot", help="draw learning curves and learned-dynamics figures of runs and sweeps")
    plot.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                      help="run folders (with metrics.jsonl) or sweep folders (with seed-*/metrics.jsonl)")
    plot.add_argument("--out", help="folder for the PNG files (default: DIR/figures of the first --runs folder)")
    plot.add_argument("--reference", metavar="DIR",
                      help="a run or sweep drawn dashed as the reference curve (default: none)")
    plot.set_defaults(run=cmd_plot)

    bench = sub.add_parser(
        "bench", help="benchmark an op's or a mixer's backends against baselines (correctness-gated), or decoding",
        description="Gate every backend against the float64 reference (the naive backend) on a small shape, then "
                    "time it on each shape and mode beside the baselines of the same run. Exits 1 if a backend fails "
                    "the gate. `linmix bench decode` benchmarks step-by-step decoding instead, `linmix bench "
                    "train` training throughput, and `linmix bench solver` the accuracy of the Gated KalmaNet "
                    "solvers (see their --help).",
    )
    bench.add_argument("--list", action="store_true",
                       help="list the op entries (backends, baselines, shape sets, options) and the mixers")
    bench.add_argument("--op", help="an op, or layer for a mixer with --mixer; `linmix bench --list` names them "
                                    "(`--op k2_layer` is now `--op layer --mixer k2`; required unless --list; default: none)")
    bench.add_argument("--mixer", help="with --op layer: a registered mixer, e.g. k2 (see --list; default: none)")
    bench.add_argument("--backends", type=_csv(str), help="comma list (default: the entry's defaults, see --list)")
    bench.add_argument("--modes", type=_csv(str), default=["fwd", "fwdbwd"], help="comma list of fwd,fwdbwd (default: fwd,fwdbwd)")
    bench.add_argument("--shapes", default="fla",
                       help="a shape set of the entry (see --list) or a JSON dict or list of dicts (default fla)")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of the op's entry, e.g. regime=token_typical, or with --op layer a config "
                            "field of the mixer, e.g. rank=64; the value is read as YAML (repeatable; default: none)")
    bench.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                       help="input dtype of the timed runs (default: bf16)")
    bench.add_argument("--kernels", type=int, default=0, metavar="N",
                       help="also profile N calls of each timed row: every kernel's GPU time per call (CUDA; default: 0)")
    bench.add_argument("--device", help="cuda[:N] or cpu (default cuda when available)")
    bench.add_argument("--json", metavar="OUT.json", help="write the report (machine, settings, gates, rows; default: not written)")
    bench.add_argument("--plot", metavar="OUT.png", help="draw time against T per backend, log-log (default: not drawn)")
    bench.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per measurement (default 25)")
    bench.add_argument("--rep-ms", type=float, default=100.0, help="timed duration per measurement (default 100)")
    bench.add_argument("--peak-tflops", type=float,
                       help="compute roof (default: the GPU's datasheet peak in --dtype, looked up by its name)")
    bench.add_argument("--peak-gbps", type=float,
                       help="memory roof in GB/s (default: the GPU's datasheet bandwidth, looked up by its name)")
    bench.set_defaults(run=cmd_bench)

    bench_commands = bench.add_subparsers(dest="bench_command", metavar="{decode,train,solver}")
    decode = bench_commands.add_parser(
        "decode", help="per-token latency and decoding-state memory against generated tokens",
        description="Prefill a short random prompt, then generate step by step with each preset and with an "
                    "attention baseline (learned positions removed, growing KV cache); record the median ms/token "
                    "of the steps before each checkpoint and the bytes of the decoding state.",
    )
    decode.add_argument("--presets", type=_csv(str), help="comma list of presets to decode (default kops-ts-linear)")
    decode.add_argument("--baseline", default="nanogpt-ts",
                        help="attention preset decoded beside them, or none (default nanogpt-ts)")
    decode.add_argument("--max-tokens", type=int,
                        help="tokens generated per model, the last checkpoint (default: the last of --checkpoints)")
    decode.add_argument("--checkpoints", type=_csv(int),
                        help="comma list of increasing token counts (default 1024,2048,...,65536 up to --max-tokens)")
    decode.add_argument("--prefill", action="store_true",
                        help="reach each checkpoint by prefilling the tokens before its window in chunks, decoding "
                             "only the window step by step (same state and step cost, a far shorter run)")
    decode.add_argument("--window", type=int,
                        help="steps timed before each checkpoint (default 64, or the first checkpoint)")
    decode.add_argument("--prompt-tokens", type=int, help="length of the random prompt (default 16)")
    decode.add_argument("--batch-size", type=int, help="sequences decoded together (default 1)")
    decode.add_argument("--temperature", type=float, help="0 for greedy tokens (default), else sampled")
    decode.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="dtype of the models (default: bf16)")
    decode.add_argument("--device", help="cuda[:N] or cpu (default cuda when available)")
    decode.add_argument("--json", metavar="OUT.json", help="write the report (machine, settings, models, rows; default: not written)")
    decode.add_argument("--plot", metavar="OUT.png", help="draw ms/token and memory against generated tokens (default: not drawn)")
    decode.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    decode.set_defaults(run=cmd_bench_decode)

    train_bench = bench_commands.add_parser(
        "train", help="training tokens/s of presets against a baseline preset, in one run",
        description="Train each preset and the baseline through the Trainer on random tokens, at a context "
                    "length that becomes every model's own, for --warmup untimed then --steps timed optimizer "
                    "steps at each batch size; report steady tokens/s and the ratio to the baseline.",
    )
    train_bench.add_argument("--presets", type=_csv(str), help="comma list (default kops-ts-linear-long)")
    train_bench.add_argument("--baseline", default="kops-ts-v2",
                             help="preset of the ratios, or none (default kops-ts-v2)")
    train_bench.add_argument("--context-length", type=int, required=True,
                             help="training window T, each model's context")
    train_bench.add_argument("--batch-sizes", type=_csv(int), required=True, help="comma list of windows per step")
    train_bench.add_argument("--steps", type=int, default=50, help="timed optimizer steps per run (default 50)")
    train_bench.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    _add_compile_flags(train_bench, "default: off")
    train_bench.add_argument("--profile-steps", type=int, default=0, metavar="N",
                             help="then profile N more steps: wall and GPU ms per step, kernel launches (default 0)")
    train_bench.add_argument("--device", help="cuda[:N] or cpu (default cuda when available)")
    train_bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="model-config field for every model, e.g. decay_backend=chunk (repeatable; default: none)")
    train_bench.add_argument("--json", metavar="OUT.json", help="write the report (machine, settings, rows; default: not written)")
    train_bench.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train_bench.set_defaults(run=cmd_bench_train)
    _add_solver_parser(bench_commands)
    return parser


def _add_solver_parser(bench_commands) -> None:
    """`linmix bench solver`: the Gated KalmaNet solver study (spec/gated_kalmanet.md §4)."""
    solver = bench_commands.add_parser(
        "solver", help="Gated KalmaNet solver study: residuals of GD, Nesterov, CG and Chebyshev, gradient errors",
        description="Random unit keys and queries; at every --stride-th position t of each sequence (t = s-1, 2s-1, "
                    "..., 0-based), the Gram state H_t = sum_{i<=t} k_i k_i^T / its Frobenius norm and the system "
                    "(H_t + ridge I) x = q_t. Gradient descent (step 2/(L+mu)), Nesterov, conjugate gradient and the "
                    "GKA Chebyshev iteration run in --dtype; report the relative residual and error of iteration "
                    "n = 0..--iters (products with A; float64 metrics, median and p10-p90 over the systems), and the "
                    "relative errors of the gradients of CG (implicit), Chebyshev (implicit) and Chebyshev (autograd "
                    "through its steps) against the float64 exact solve and against autograd through the same "
                    "solver's steps in float64.",
    )
    solver.add_argument("--batch-size", type=_int_at_least(1), default=8, help="sequences B (default 8)")
    solver.add_argument("--seq-len", type=_int_at_least(1), default=2048, help="tokens T per sequence (default 2048)")
    solver.add_argument("--heads", type=_int_at_least(1), default=8, help="heads per sequence (default 8)")
    solver.add_argument("--head-dim", type=_int_at_least(1), default=128, help="head dim D (default 128)")
    solver.add_argument("--ridge", type=float, default=0.02,
                        help="ridge ratio a of A = H + a ||H||_F I, > 0 (default 0.02, kappa <= 51)")
    solver.add_argument("--iters", type=_int_at_least(1), default=30,
                        help="products with A per solver; iterations 0..N are measured (default 30)")
    solver.add_argument("--stride", type=_int_at_least(1), default=64,
                        help="sample the positions t = s-1, 2s-1, ... of each sequence, T // s of them; 1 measures "
                             "every token (default 64: 2048 systems at the default sizes)")
    solver.add_argument("--seed", type=int, default=0, help="seed of the keys, queries and cotangents (default 0)")
    solver.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"],
                        help="precision the solvers and gradients run in, fp32 as the kernels (default fp32)")
    solver.add_argument("--device", help="cuda[:N] or cpu (default cuda when available)")
    solver.add_argument("--json", metavar="OUT.json",
                        help="write the report (machine, settings, per-iteration spreads, gradients; default: not written)")
    solver.add_argument("--plot-dir", default="docs/figures", metavar="DIR",
                        help="folder of solver_residuals.png and solver_gradients.png, or none (default docs/figures)")
    solver.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    solver.set_defaults(run=cmd_bench_solver)


def _report(args, message: object) -> None:
    """Print `linmix COMMAND: error: MESSAGE` as one line on stderr."""
    command = " ".join(filter(None, (args.command, getattr(args, "bench_command", None))))
    print(f"linmix {command}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `linmix` command; returns the exit code (0 done, 1 failed, 2 user error,
    130 interrupted). User errors and operating-system failures are one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except LinmixError as error:
        _report(args, error)
        return EXIT_USAGE
    except OSError as error:  # disk full, a folder that cannot be written, a file that vanished
        _report(args, f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _report(args, "interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
