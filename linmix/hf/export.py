"""`linmix export`: a training checkpoint as a folder that transformers loads.

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer
(tokenizer_config.json, linmix_tokenizer.json) and a README.md model card. This module imports
neither torch nor transformers until a command runs, so the `linmix` parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

from linmix.errors import CheckpointError, UsageError

INSTALL_HINT = "pip install 'linmix[hf]'"
MIN_TRANSFORMERS = (5, 17)  # the versions linmix.hf is tested with: 5.17 to 5.24
# The four lines that load an exported folder and generate (README.md shows them too).
USAGE = """import linmix.hf.auto  # registers linmix with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer, model = AutoTokenizer.from_pretrained("{path}"), AutoModelForCausalLM.from_pretrained("{path}")
print(tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=200, do_sample=True)[0]))
"""


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` command to the `linmix` command's subparsers.

    Args:
        subparsers: what `ArgumentParser.add_subparsers` returned.

    Returns:
        The command's parser (its `run` default is `cmd_export`).
    """
    export = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face transformers folder (needs linmix[hf])"
    )
    export.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/NAME/best.pt (required)")
    export.add_argument("--out", required=True,
                        help="folder to write; must be empty or absent unless --force (required)")
    export.add_argument("--force", action="store_true", help="write into a folder that holds files already")
    export.set_defaults(run=cmd_export)
    return export


def cmd_export(args) -> int:
    """Export --ckpt to --out; print the folder and how to load it.

    Raises:
        UsageError: transformers or safetensors is missing, the checkpoint is missing, damaged or
            not written by `linmix train`, or --out holds files and --force is not given.
    """
    _check_installed()
    try:
        out = export_checkpoint(args.ckpt, args.out, force=args.force)
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(f"wrote {out}: after `import linmix.hf.auto`, AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    return 0


def _check_installed() -> None:
    """Raise UsageError unless transformers (5.x, at least MIN_TRANSFORMERS) and safetensors are installed."""
    versions = {}
    for name in ("transformers", "safetensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"linmix export needs {name}: {INSTALL_HINT}") from None
    major_minor = tuple(int(part) for part in versions["transformers"].split(".")[:2])
    if not MIN_TRANSFORMERS <= major_minor < (6, 0):
        wanted = ".".join(map(str, MIN_TRANSFORMERS))
        raise UsageError(f"linmix export needs transformers {wanted} or a later 5.x, "
                         f"found {versions['transformers']}: {INSTALL_HINT}")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a checkpoint of `linmix train` as a transformers folder.

    Args:
        ckpt_path: the checkpoint (best.pt or last.pt).
        out_dir: the folder to write; created if absent.
        force: write into a folder that holds files already (files of the same names are replaced).

    Returns:
        The folder.

    Raises:
        CheckpointError: (a ValueError) the checkpoint is missing or damaged, was not written by
            `linmix train`, or its weights or tokenizer do not fit its meta.
        FileExistsError: `out_dir` holds files and `force` is False.
        NotADirectoryError: `out_dir` is a file.
    """
    from linmix.data.tokenizers import tokenizer_from_meta
    from linmix.hf.configuration import LinmixConfig
    from linmix.hf.modeling import LinmixForCausalLM
    from linmix.hf.tokenization import LinmixTokenizer
    from linmix.train.checkpoint import load_trained_model

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    _check_out_dir(out_dir, force)
    linmix_model, checkpoint, meta = load_trained_model(ckpt_path)
    try:
        tokenizer = LinmixTokenizer(meta=tokenizer_from_meta(meta).to_meta())
    except ValueError as error:
        raise CheckpointError(f"{ckpt_path}: its tokenizer is damaged ({error})") from None
    model = LinmixForCausalLM(LinmixConfig.from_model(linmix_model))
    model.linmix.load_state_dict(linmix_model.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card = model_card(out_dir, ckpt_path, checkpoint, linmix_model.num_parameters())
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def model_card(out_dir: Path, ckpt_path: Path, checkpoint: dict, params: int) -> str:
    """A short README.md for an exported folder: preset, size, training step and metric, and usage.

    Args:
        out_dir: the exported folder.
        ckpt_path: the checkpoint's path.
        checkpoint: its dict (meta, step, and the best validation metric: "metric" in best.pt,
            "progress" in last.pt).
        params: the model's parameter count.

    Returns:
        The Markdown text.
    """
    meta = checkpoint["meta"]
    spec = meta["model"]
    unit = meta.get("ppl_unit", "char" if "vocab" in meta else "token")
    tokenizer = meta.get("tokenizer", {}).get("kind", "char")
    return f"""---
library_name: transformers
tags: [linmix]
---

# {meta.get('preset', spec['kind'])}

A linmix {spec['kind']} model exported from `{ckpt_path}` (step {checkpoint.get('step')}) by `linmix export`.

- preset: {meta.get('preset', 'unknown')}; mixer: {spec['config'].get('mixer', 'none')}
- parameters: {params:,}
- {_best_metric(checkpoint, unit)}
- tokenizer: {tokenizer}, {spec['config']['vocab_size']:,} ids

```python
{USAGE.format(path=out_dir)}```

The linmix model spec:

```json
{json.dumps(spec, indent=2)}
```
"""


def _best_metric(checkpoint: dict, unit: str) -> str:
    """The best validation perplexity a checkpoint records, as one line of the model card."""
    metric = checkpoint.get("metric")
    if metric:
        return f"best validation PPL {metric['ppl']:.4f} per {unit} ({metric['protocol']} protocol)"
    best = checkpoint.get("progress", {}).get("best") or {}
    scores = ", ".join(f"{protocol} {entry['ppl']:.4f} (step {entry['step']})" for protocol, entry in best.items())
    return f"best validation PPL per {unit}: {scores}" if scores else "no validation metric recorded"


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a file, or a folder that holds files unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"--out {out_dir} holds files already: give an empty folder, or --force to write there")
