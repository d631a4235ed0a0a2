"""The synthetic tasks' protocols in one declarative place: cells, default grids, model recipes
and training settings.

A *cell* is what one run trains and is tested on: its training segments (fixed example sets,
or fresh samples every step) and its held-out test segments. Cells are written on the command
line as short strings that the task's parser reads ("256:16" is MQAR's T = 256, kv = 16).

Sources: anchors.md §2 (zoology's MQAR protocol), structured_mixing.md §4.3 (copy, multi-hop,
parity, S5: our protocol, not the paper's), preconditioned_delta.md §4 (the PDN paper's MQAR cells).
This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    """The task model's shape besides its mixer and width.

    Attributes:
        n_layers: mixer blocks.
        mlp_ratio: MLP hidden width over d_model after each mixer; 0 for no MLP.
        short_conv: kernel size of the gated short causal convolution (zoology's BaseConv) in
            front of each mixer; 0 for none.
        position_embedding: learned absolute position embeddings.
    """

    n_layers: int
    mlp_ratio: int
    short_conv: int
    position_embedding: bool


RECIPES = {
    # zoology: 2 layers, no MLP, BaseConv (kernel 3) with each mixer, no positions.
    "zoology": Recipe(n_layers=2, mlp_ratio=0, short_conv=3, position_embedding=False),
    # The PDN paper's MQAR models: 2 mixer + 2 MLP layers, zoology's defaults otherwise.
    "pdn": Recipe(n_layers=2, mlp_ratio=4, short_conv=3, position_embedding=False),
    # structured_mixing.md §4.3: mixer + MLP blocks, short convolutions off; learned positions
    # stand in for the spec's RoPE (the attention mixer has none).
    "structured": Recipe(n_layers=2, mlp_ratio=4, short_conv=0, position_embedding=True),
    # Parity and S5 test length generalisation, which learned positions cannot give.
    "state": Recipe(n_layers=2, mlp_ratio=4, short_conv=0, position_embedding=False),
}


@dataclass(frozen=True)
class Segment:
    """A block of examples of one generator setting.

    Attributes:
        args: the generator's arguments besides the protocol's fixed ones, e.g. {"seq_len": 256}.
        examples: how many; None (training only) draws a fresh batch every step.
        primary: whether it counts toward the run's accuracy (the number reported and early
            stopped on); length-extrapolation segments of parity and S5 do not.
    """

    args: dict
    examples: int | None
    primary: bool = True

    def as_dict(self) -> dict:
        """The segment as JSON-ready data."""
        return {"args": dict(self.args), "examples": self.examples, "primary": self.primary}


@dataclass(frozen=True)
class Cell:
    """What one run trains and is tested on.

    Attributes:
        label: the cell as written on the command line.
        train: training segments; each batch comes from one of them.
        test: held-out test segments (fixed, the same for every run of the cell).
    """

    label: str
    train: tuple[Segment, ...]
    test: tuple[Segment, ...]


@dataclass(frozen=True)
class Protocol:
    """One task's protocol.

    Attributes:
        task: the task's name (`--task`).
        generator: the generator's key in `linmix.tasks.generators.GENERATORS`.
        fixed: generator arguments every cell shares (overridable with --task-arg).
        axes: generator argument -> the axis name tables and plots give it.
        parse_cell: cell string -> Cell; ValueError for a malformed one.
        cell_help: how cells are written, for --help and error messages.
        cells: the default --cells.
        cell_sets: names that stand for several cells on the command line.
        recipe: the model recipe (a key of RECIPES).
        d_models, lrs, seeds: the default grid.
        batch_size, test_batch_size: examples per training / evaluation batch.
        epochs: passes over fixed training sets (the step budget is epochs x batches per epoch).
        max_steps: steps with fresh training samples.
        eval_interval: steps between evaluations; None evaluates once an epoch.
        warmup_steps: linear warmup before the cosine decay to 0.
        weight_decay: AdamW's, on matrices and embeddings.
        grad_clip: gradient-norm clipping; None for none.
        mixer_kwargs: per-mixer config fields this task uses by default.
        target: test accuracy that stops a run early.
    """

    task: str
    generator: str
    fixed: dict
    axes: dict
    parse_cell: Callable[[str], Cell]
    cell_help: str
    cells: tuple[str, ...]
    recipe: str
    d_models: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    batch_size: int
    test_batch_size: int
    epochs: int | None = None
    max_steps: int | None = None
    eval_interval: int | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float | None = None
    cell_sets: dict = field(default_factory=dict)
    mixer_kwargs: dict = field(default_factory=dict)
    target: float = 0.99


def _ints(text: str, count: int, form: str) -> list[int]:
    parts = text.split(":")
    if len(parts) != count or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"cell {text!r} is not of the form {form} (positive integers)")
    return [int(p) for p in parts]


# --- MQAR (anchors.md §2, zoology's experiments/mqar_example_configs/original_mqar_configs.py) ---

MQAR_TRAIN_CELLS = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
MQAR_TEST_CELLS = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
MQAR_TEST_EXAMPLES = 1_000
MQAR_CELL_TRAIN_EXAMPLES = 20_000  # a cell outside zoology's train list trains on this many
# preconditioned_delta.md §4: fixed kv = 64; kv : T = 1 : 8; T = 1024 (as T:kv).
PDN_CELLS = ("256:64", "512:64", "1024:64", "2048:64", "256:32", "1024:128", "2048:256", "1024:32", "1024:256")


def _mqar_args(seq_len: int, kv: int) -> dict:
    return {"seq_len": seq_len, "num_kv_pairs": kv}


def mqar_cell(text: str) -> Cell:
    """An MQAR cell: "T:kv" trains on that cell (zoology's train size for it, else 20,000 examples)
    and tests on 1,000 held-out examples of it; "zoology" is zoology's whole protocol, one model
    trained on all five train cells and tested on all seven test cells (length extrapolation included)."""
    if text == "zoology":
        train = tuple(Segment(_mqar_args(t, kv), n) for t, kv, n in MQAR_TRAIN_CELLS)
        test = tuple(Segment(_mqar_args(t, kv), MQAR_TEST_EXAMPLES) for t, kv in MQAR_TEST_CELLS)
        return Cell(text, train, test)
    seq_len, kv = _ints(text, 2, "T:kv")
    examples = {(t, k): n for t, k, n in MQAR_TRAIN_CELLS}.get((seq_len, kv), MQAR_CELL_TRAIN_EXAMPLES)
    return Cell(text, (Segment(_mqar_args(seq_len, kv), examples),),
                (Segment(_mqar_args(seq_len, kv), MQAR_TEST_EXAMPLES),))


# --- structured_mixing.md §4.3 ---

TEST_EXAMPLES = 1_000


def copy_cell(text: str) -> Cell:
    """A copy cell "L": strings of L symbols (T = 2L + 2), fresh training samples, 1,000 test examples."""
    (length,) = _ints(text, 1, "L")
    args = {"length": length}
    return Cell(text, (Segment(args, None),), (Segment(args, TEST_EXAMPLES),))


def multihop_cell(text: str) -> Cell:
    """A multi-hop cell "h": h hops, fresh training samples, 1,000 test examples."""
    (hops,) = _ints(text, 1, "h")
    args = {"hops": hops}
    return Cell(text, (Segment(args, None),), (Segment(args, TEST_EXAMPLES),))


def length_generalisation_cell(text: str, test_factors: tuple[int, ...]) -> Cell:
    """A cell "T" trained on length T with fresh samples and tested at T (the run's accuracy) and at
    each longer `factor * T` (reported, not early-stopped on)."""
    (seq_len,) = _ints(text, 1, "T")
    test = tuple(Segment({"seq_len": f * seq_len}, TEST_EXAMPLES, primary=f == 1) for f in (1, *test_factors))
    return Cell(text, (Segment({"seq_len": seq_len}, None),), test)


_STRUCTURED_TRAINING = dict(
    d_models=(128,), lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), batch_size=64, test_batch_size=250,
    max_steps=20_000, eval_interval=250, warmup_steps=200, grad_clip=1.0,
    mixer_kwargs={"attention": {"n_heads": 4}},
)

PROTOCOLS = {
    "mqar": Protocol(
        task="mqar", generator="mqar",
        fixed={"vocab_size": 8192, "power_a": 0.01, "num_passes": 1, "random_non_queries": True},
        axes={"seq_len": "T", "num_kv_pairs": "kv"},
        parse_cell=mqar_cell, cell_help="T:kv (e.g. 256:16) or zoology (the whole protocol)",
        cells=("zoology",),
        cell_sets={"zoology-cells": tuple(f"{t}:{kv}" for t, kv, _ in MQAR_TRAIN_CELLS),
                   "figure2": ("64:4", "128:8", "256:16"), "pdn": PDN_CELLS},
        recipe="zoology", d_models=(64, 128, 256), lrs=(1e-3, 3.2e-3, 1e-2, 3.2e-2), seeds=(0,),
        batch_size=256, test_batch_size=256, epochs=32, eval_interval=None, warmup_steps=0,
        weight_decay=0.1, grad_clip=None, mixer_kwargs={"attention": {"n_heads": 2}},
    ),
    "copy": Protocol(
        task="copy", generator="copy", fixed={"num_symbols": 32}, axes={"length": "L"},
        parse_cell=copy_cell, cell_help="L (e.g. 64)", cells=("64", "128"), recipe="structured",
        **_STRUCTURED_TRAINING,
    ),
    "multihop": Protocol(
        task="multihop", generator="multihop", fixed={"seq_len": 256, "num_entities": 64, "num_chains": 8},
        axes={"hops": "h"}, parse_cell=multihop_cell, cell_help="h (e.g. 2)",
        cells=("2", "3", "4", "5", "6", "7"), recipe="structured", **_STRUCTURED_TRAINING,
    ),
    "parity": Protocol(
        task="parity", generator="parity", fixed={}, axes={"seq_len": "T"},
        parse_cell=lambda text: length_generalisation_cell(text, (2, 4)), cell_help="T (e.g. 64)",
        cells=("64",), recipe="state", **_STRUCTURED_TRAINING,
    ),
    "s5": Protocol(
        task="s5", generator="s5", fixed={}, axes={"seq_len": "T"},
        parse_cell=lambda text: length_generalisation_cell(text, (2,)), cell_help="T (e.g. 32)",
        cells=("32",), recipe="state", **_STRUCTURED_TRAINING,
    ),
}


def get_protocol(task: str) -> Protocol:
    """The protocol of `task`; ValueError listing the tasks for an unknown one."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[task]


def expand_cells(protocol: Protocol, texts: list[str] | tuple[str, ...]) -> list[Cell]:
    """Cells from command-line strings, cell-set names expanded, duplicates dropped.

    Args:
        protocol: the task's protocol.
        texts: cell strings or names of the protocol's cell sets.

    Returns:
        The cells, in order of first mention.

    Raises:
        ValueError: a string that is neither a cell nor a set name.
    """
    labels = []
    for text in texts:
        labels.extend(protocol.cell_sets.get(text, (text,)))
    cells = []
    for label in dict.fromkeys(labels):
        try:
            cells.append(protocol.parse_cell(label))
        except ValueError as error:
            sets = f"; cell sets: {', '.join(protocol.cell_sets)}" if protocol.cell_sets else ""
            raise ValueError(f"{error}; {protocol.task} cells are {protocol.cell_help}{sets}") from None
    return cells
