"""Synthetic tasks (MQAR, copy, multi-hop, parity, S5), their model, one-run trainer and sweep runner.

* `generators`: seeded generators returning a `TaskBatch` (inputs, targets, scored-position mask).
* `protocols`: cells, default grids, model recipes and training settings per task.
* `model`: `TaskModel`, embedding -> blocks of any registered mixer (MLP and short conv optional).
* `train`: one run from its spec (`train_run`), and the timing probe (`probe_run`).
* `runner`: the grid on parallel worker processes, resumable (`build_specs`, `run_grid`, `plan_grid`).
* `report`: summary table and plots of a sweep folder (`write_report`).
* `command`: the `linmix synth` command (`python -m linmix.tasks` runs it too).

Names are imported on first use, so `import linmix.tasks` (and the CLI's parser) stays free of torch.
"""

import importlib

_EXPORTS = {
    "TaskBatch": "generators", "GENERATORS": "generators", "mqar": "generators", "copy_task": "generators",
    "multihop": "generators", "parity": "generators", "s5": "generators",
    "PROTOCOLS": "protocols", "RECIPES": "protocols", "Protocol": "protocols", "Recipe": "protocols",
    "Cell": "protocols", "Segment": "protocols", "get_protocol": "protocols", "expand_cells": "protocols",
    "TaskModel": "model", "TaskModelConfig": "model",
    "train_run": "train", "probe_run": "train",
    "build_specs": "runner", "run_grid": "runner", "plan_grid": "runner",
    "write_report": "report", "summarize": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'linmix.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"linmix.tasks.{_EXPORTS[name]}"), name)
