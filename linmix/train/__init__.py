"""Training loop, evaluation protocols, checkpoints, the metrics log and multi-process training."""

from linmix.train.checkpoint import (
    atomic_write,
    capture_rng_states,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_states,
    save_checkpoint,
    seed_global_rngs,
)
from linmix.train.config import FIELDS_FREE_ON_RESUME, TrainConfig, run_changing_differences
from linmix.train.distributed import (
    DistributedSetupError,
    ProcessPlace,
    distributed_context,
    rank_zero_first,
)
from linmix.train.evaluate import autocast_for, evaluate_full, evaluate_random
from linmix.train.metrics import MetricsLog, read_metrics, truncate_metrics, write_summary
from linmix.train.schedule import lr_multiplier
from linmix.train.trainer import (
    NonFiniteTrainingError,
    RunOutputError,
    StepResult,
    Trainer,
    derive_seed,
    model_config_dict,
    step_if_finite,
)

__all__ = [
    "DistributedSetupError",
    "FIELDS_FREE_ON_RESUME",
    "MetricsLog",
    "NonFiniteTrainingError",
    "ProcessPlace",
    "RunOutputError",
    "StepResult",
    "TrainConfig",
    "Trainer",
    "atomic_write",
    "autocast_for",
    "capture_rng_states",
    "derive_seed",
    "distributed_context",
    "evaluate_full",
    "evaluate_random",
    "load_checkpoint",
    "lr_multiplier",
    "model_config_dict",
    "rank_zero_first",
    "read_metrics",
    "remove_stale_temporaries",
    "restore_rng_states",
    "run_changing_differences",
    "save_checkpoint",
    "seed_global_rngs",
    "step_if_finite",
    "truncate_metrics",
    "write_summary",
]
