"""The training loop: AdamW groups, warmup-cosine schedule, mixed precision, evaluation,
checkpoints and exact resumption, in one process or data-parallel over several (DDP or FSDP2)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from linmix.data.batches import RandomWindowSampler
from linmix.errors import CheckpointError, LinmixError
from linmix.models.param_groups import param_groups
from linmix.models.registry import current_config_dict
from linmix.train.checkpoint import (
    capture_rng_states,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_states,
    save_checkpoint,
    seed_global_rngs,
)
from linmix.train.config import TrainConfig, run_changing_differences
from linmix.train.distributed import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    gather_from_ranks,
    load_full_state,
    process_rank,
    process_world_size,
    replicate_model,
    shard_model,
    sum_over_ranks,
    wait_for_ranks,
)
from linmix.train.evaluate import autocast_for, evaluate_full, evaluate_random, plan_evaluation
from linmix.train.metrics import MetricsLog, to_jsonable, truncate_metrics, write_summary
from linmix.train.schedule import lr_multiplier

ParamGroupsFn = Callable[[torch.nn.Module, str, float], list[dict[str, Any]]]
RecordCallback = Callable[[dict[str, Any]], None]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
RUN_FILES = (BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE, SUMMARY_FILE)

_PARAM_GROUP_KEYS = ("params", "weight_decay", "lr_scale", "name")
_RESUME_KEYS = ("optimizer", "sampler", "rng", "progress", "model_config")
_MIB = 2**20
_SAMPLER_STREAM = 0
_GLOBAL_RNG_STREAM = 1


class NonFiniteTrainingError(LinmixError, FloatingPointError):
    """Training stopped: `max_nonfinite_steps` steps in a row had a non-finite loss or gradients."""


class RunOutputError(LinmixError, OSError):
    """The run's folder cannot take its files: it cannot be created or written, its disk has too
    little free space, or a write failed."""


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one training step leaves on the device; nothing is read back to the host.

    Attributes:
        loss: the training loss, a device scalar (the mean over the ranks under a process group).
        grad_norm: the global gradient norm before clipping, a device scalar.
        lr: the step's learning rate, before each group's `lr_scale`.
        nonfinite: `[2]` bool device tensor: whether the loss, and whether the gradients, held
            NaN or inf; the update was skipped when either did.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    nonfinite: torch.Tensor


def step_if_finite(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """Apply the optimizer's update unless `nonfinite` holds a True.

    A skipped update leaves the parameters and the optimizer state (moments and step counts) as
    they were. A fused optimizer (torch's fused AdamW, which the Trainer uses on CUDA) takes the
    flag on the device as `found_inf`, as under a GradScaler, so the host does not wait for the
    step; any other optimizer needs the flag on the host, a free read on the CPU.

    Args:
        optimizer: a torch optimizer whose parameters hold their gradients.
        nonfinite: bool device tensor, any shape.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.any().float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not nonfinite.any():
        optimizer.step()


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """An independent 32-bit seed for one random stream of one rank of a run.

    Args:
        seed: the run's seed.
        stream: which stream (training batches, global RNGs, ...).
        rank: the process's rank; rank 0 gets the seed of a single-process run.

    Returns:
        A seed in `[0, 2**32)`, different for each `(seed, stream, rank)`.
    """
    entropy = [seed, stream] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def model_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's own config as a dict, or None when it is not a dataclass.

    Args:
        model: a model with a `config` attribute.

    Returns:
        `dataclasses.asdict(model.config)`, or None.
    """
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return None


class Trainer:
    """Trains a language model on a token stream and evaluates it on another.

    Step s (1-based) is the s-th optimizer update; it uses the learning rate
    `lr * lr_multiplier(s - 1) * lr_scale`, set before the update, as torch's LambdaLR does.
    Evaluation runs at step 0, every `eval_interval` steps and at the last step; best.pt is written
    whenever the selection protocol's loss improves; last.pt, holding everything a resume needs,
    every `checkpoint_every` steps, at the last step and when `stop_after` ends the run. A
    last.pt written at step s means steps 1..s are done.

    A step whose loss or gradients hold NaN or inf skips its update: the parameters and the
    optimizer state stay as they were, while the step counter, the learning-rate schedule, the
    batch sampler and the RNGs advance as on any step (so a resumed run skips the same steps). Such
    a step writes a record `{"step", "kind": "skip", "nonfinite": ["loss", "gradients"],
    "consecutive"}` in place of its training record. The flags stay on the device until the next
    log, evaluation or checkpoint step, where they are read back together;
    `config.max_nonfinite_steps` skips in a row then stop the run before last.pt is written again.

    In a torch.distributed process group of N ranks (torchrun, see docs/DISTRIBUTED.md) every rank
    builds its own Trainer and trains on `config.batch_size` windows per step from its own sampler
    (rank 0's draws those of a single-process run), so the global batch is N times that
    (`global_batch_size`); DDP averages the gradients, or FSDP2 shards the model with `fsdp`.
    The logged loss is the mean over the ranks, a step is skipped on every rank when any rank saw
    a non-finite value, evaluations share their batches out over the ranks and give one process's
    numbers, and rank 0 alone writes the run's files and shows the progress bar. last.pt then
    also holds every rank's sampler and RNG states; a resume must use the same N and `fsdp`.

    Args:
        model: follows the linmix model interface: `model(idx, targets) -> (logits, loss)`,
            `model.config.context_length`, `model.config.vocab_size`, `model.num_parameters()`,
            and optionally `model.diagnostics() -> dict`, merged into evaluation records. Seed the
            global RNG before building it; the Trainer moves it to `config.device`.
        train_tokens: training stream, `[N_train]` integer tensor.
        val_tokens: validation stream, `[N_val]` integer tensor.
        config: the run's hyper-parameters.
        param_groups_fn: `(model, optimizer_mode, weight_decay) -> groups`, each group a dict with
            "params", "weight_decay", "lr_scale" and "name"; every trainable parameter must be in
            exactly one group. Defaults to `linmix.models.param_groups`.
        checkpoint_meta: stored as "meta" in best.pt and last.pt, e.g.
            `{"preset": ..., "vocab": [...]}`, so a checkpoint can rebuild its model.
        callbacks: each called with every record written to metrics.jsonl.
        resume: continue from `out_dir/last.pt` if it exists (else start fresh).
        stop_after: end `fit` once this many steps are done, without finishing the schedule
            (a slice of a longer run, or a simulated kill); last.pt is written first.
        progress: show a tqdm progress bar on stderr (rank 0 only).
        token_unit: what one token is ("char", "piece", ...): stored as "ppl_unit" in the
            evaluation records and summary.json, and named in the progress lines.
        fsdp: shard the model with FSDP2 (`fully_shard`) instead of replicating it with DDP;
            needs a process group.

    On CUDA the Trainer enables TF32 matrix products for the whole process, trains under bf16
    autocast and uses fused AdamW; elsewhere it trains in float32.

    Raises:
        FileExistsError: `out_dir` holds a last.pt and `resume` is False.
        CheckpointError: the last.pt to resume is damaged or cannot resume a run.
        ValueError: the config, model, tokens or parameter groups do not fit together, `fsdp`
            without a process group, or the resumed checkpoint was made with a config, world size
            or sharding that changes the run (the fields are named).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor,
        config: TrainConfig,
        *,
        param_groups_fn: ParamGroupsFn | None = None,
        checkpoint_meta: dict[str, Any] | None = None,
        callbacks: Sequence[RecordCallback] = (),
        resume: bool = False,
        stop_after: int | None = None,
        progress: bool = True,
        token_unit: str = "token",
        fsdp: bool = False,
    ) -> None:
        if stop_after is not None and stop_after < 0:
            raise ValueError(f"stop_after must be >= 0 or None, got {stop_after}")
        if fsdp and not torch.distributed.is_initialized():
            raise ValueError("fsdp=True needs a torch.distributed process group (launch with torchrun)")
        self.config = config
        self.device = torch.device(config.device)
        self.rank = process_rank()
        self.world_size = process_world_size()
        self.is_main = self.rank == 0
        self.fsdp = fsdp
        self.model = model if fsdp else model.to(self.device)
        self.context_length = self._resolve_context_length()
        self.train_tokens = self._check_tokens("train_tokens", train_tokens)
        self.val_tokens = self._check_tokens("val_tokens", val_tokens)
        self.eval_plan = plan_evaluation(
            config, len(self.val_tokens), self.context_length, self.world_size
        )
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.callbacks = list(callbacks)
        self.stop_after = stop_after
        self.progress = progress and self.is_main
        self.token_unit = token_unit
        self.out_dir = Path(config.out_dir)
        self.global_batch_size = config.batch_size * self.world_size  # windows per step, all ranks
        self.tokens_per_step = self.global_batch_size * self.context_length  # all ranks

        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        if fsdp:
            self.model = shard_model(self.model, self.device)
        train_model = (
            replicate_model(self.model, self.device) if self.world_size > 1 and not fsdp else self.model
        )
        self.optimizer = self._build_optimizer(param_groups_fn or param_groups)
        sampler_seed = derive_seed(config.seed, _SAMPLER_STREAM, self.rank)
        self.sampler = RandomWindowSampler(
            self.train_tokens,
            config.batch_size,
            self.context_length,
            torch.Generator().manual_seed(sampler_seed),
            device=self.device,
        )
        self.forward_model = self._compiled_model(train_model) if config.compile else train_model

        self.step = 0
        self.nonfinite_streak = 0  # steps in a row, up to the last checked one, that were skipped
        self.skipped_steps = 0
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (step, StepResult.nonfinite)
        self.best: dict[str, dict[str, float]] = {}  # protocol -> {"loss", "ppl", "step"}
        self.last_eval: dict[str, Any] | None = None
        self.train_time_s = 0.0
        self.wall_time_s = 0.0
        self.resumed = False
        self._saved_rng: dict[str, Any] = {}
        self._last_saved_step: int | None = None
        self._session_start = time.perf_counter()
        self._wall_offset = 0.0
        self._last_log = (0, 0.0)  # (step, train_time_s) of the last training record
        self._first_log: tuple[int, float] | None = None  # the same, first record of this fit

        last_path = self.out_dir / LAST_CHECKPOINT
        if last_path.exists() and not resume:
            raise FileExistsError(
                f"{last_path} exists: resume that run (--resume) or choose another out_dir"
            )
        if last_path.exists():
            self._load_last(last_path)

    def fit(self) -> dict[str, Any]:
        """Run the training loop to `max_steps` (or `stop_after`).

        Returns:
            The summary also written to `out_dir/summary.json` (by rank 0): best validation
            loss/ppl per protocol and their steps, the final evaluation, parameter count, times,
            the global batch (`world_size`, `global_batch_size` windows, `tokens_per_step`),
            training throughput over all ranks for the whole run (`tokens_per_s_mean`,
            compilation included) and from this call's first training record on
            (`tokens_per_s_steady`), per GPU beside them when several ranks train, and
            `skipped_steps`.

        Raises:
            RunOutputError: `out_dir` cannot be created or written or has too little free disk
                space for two checkpoints (found before training starts), or a write failed
                during the run (last.pt then still holds the step it held).
            NonFiniteTrainingError: `config.max_nonfinite_steps` steps in a row had a non-finite
                loss or gradients.
        """
        config = self.config
        metrics_path = self.out_dir / METRICS_FILE
        if self.is_main:
            self._prepare_out_dir()
            if self.resumed:
                truncate_metrics(metrics_path, self.step)
        if self.resumed:
            restore_rng_states(self._saved_rng, self.device)
        else:
            seed_global_rngs(derive_seed(config.seed, _GLOBAL_RNG_STREAM, self.rank))
        last_step = (
            config.max_steps if self.stop_after is None else min(config.max_steps, self.stop_after)
        )

        self.model.train()
        self._session_start = time.perf_counter()
        self._wall_offset = self.wall_time_s
        self._last_log = (self.step, self.train_time_s)
        self._first_log = None
        with (
            (
                MetricsLog(metrics_path, fresh=not self.resumed)
                if self.is_main
                else contextlib.nullcontext()
            ) as log,
            tqdm(
                total=config.max_steps,
                initial=self.step,
                disable=not self.progress,
                unit="step",
                dynamic_ncols=True,
            ) as bar,
        ):
            if self.progress:
                bar.write(self.eval_plan.describe())
            if not self.resumed:
                self._evaluate(log, bar)
            clock_start = time.perf_counter()
            while self.step < last_step:
                result = self.train_step()
                self.step += 1
                self._unchecked.append((self.step, result.nonfinite))
                bar.update(1)
                log_now = self.step % config.log_interval == 0 or self.step == config.max_steps
                eval_now = self.step % config.eval_interval == 0 or self.step == config.max_steps
                save_now = self.step % config.checkpoint_every == 0 or self.step == config.max_steps
                if log_now or eval_now or save_now:
                    self._synchronize()
                    self.train_time_s += time.perf_counter() - clock_start
                    self._report_skips(log, bar)
                    if log_now:
                        self._log_train(log, bar, result)
                    if eval_now:
                        self._evaluate(log, bar)
                    if save_now:
                        self._save_last()
                    clock_start = time.perf_counter()
            self._synchronize()
            self.train_time_s += time.perf_counter() - clock_start
            self._report_skips(log, bar)
            if self._last_saved_step != self.step:
                self._save_last()
        summary = self._summary()
        if self.is_main:
            try:
                write_summary(self.out_dir / SUMMARY_FILE, summary)
            except OSError as error:
                raise self._write_error(self.out_dir / SUMMARY_FILE, error) from error
        wait_for_ranks()  # no rank returns before rank 0's files are whole (a resume reads them)
        return summary

    def train_step(self) -> StepResult:
        """One optimizer update on a fresh batch at the current step's learning rate, skipped
        when the loss or the gradients are not finite (see `step_if_finite`).

        `fit` calls it and then advances `step`, logs, evaluates and saves; called alone (as
        `linmix bench train --profile-steps` does) it only updates the model, the optimizer and the
        sampler. Nothing is read back from the device (except the skip flag on non-fused
        optimizers, off CUDA).

        Under a process group every rank must call it: the loss is the mean over the ranks and
        the flags are raised on every rank when they are on any.

        Returns:
            The loss, gradient norm, learning rate and non-finite flags of the step.
        """
        x, y = self.sampler.sample()  # [B, T], on the training device
        lr = self.config.lr * lr_multiplier(
            self.step,
            self.config.warmup_steps,
            self.config.max_steps,
            self.config.lr_floor / self.config.lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if self.config.compile:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs may reuse the last one's outputs
        with autocast_for(self.device):
            _, loss = self.forward_model(x, y)
        if loss is None:
            raise ValueError("the model returned no loss although targets were given")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        grad_norm = full_tensor(grad_norm)  # FSDP2's norm is a replicated DTensor
        loss = loss.detach()
        nonfinite = ~torch.isfinite(torch.stack([loss.float(), grad_norm.float()]))  # [2]
        if self.world_size > 1:
            summed = sum_over_ranks(torch.cat([loss.float().view(1), nonfinite.float()]))  # [3]
            loss = summed[0] / self.world_size
            nonfinite = summed[1:] > 0
        step_if_finite(self.optimizer, nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, nonfinite)

    def _report_skips(self, log: MetricsLog, bar: tqdm) -> None:
        """Write a skip record for each step since the last call whose update was skipped.

        The steps' flags come back from the device in one transfer.

        Raises:
            NonFiniteTrainingError: `config.max_nonfinite_steps` skips in a row.
        """
        if not self._unchecked:
            return
        steps = [step for step, _ in self._unchecked]
        flags = torch.stack([flag for _, flag in self._unchecked]).tolist()  # [n, 2]
        self._unchecked.clear()
        for step, (loss_nonfinite, grads_nonfinite) in zip(steps, flags, strict=True):
            if not (loss_nonfinite or grads_nonfinite):
                self.nonfinite_streak = 0
                continue
            self.nonfinite_streak += 1
            self.skipped_steps += 1
            nonfinite = [
                name
                for name, flag in (("loss", loss_nonfinite), ("gradients", grads_nonfinite))
                if flag
            ]
            record = {
                "step": step,
                "kind": "skip",
                "nonfinite": nonfinite,
                "consecutive": self.nonfinite_streak,
            }
            self._emit(log, record)
            if self.progress:
                bar.write(
                    f"step {step}: non-finite {' and '.join(nonfinite)}, update skipped "
                    f"({self.nonfinite_streak} in a row)"
                )
            if self.nonfinite_streak >= self.config.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"training stopped at step {step}: {self.nonfinite_streak} steps in a row "
                    f"({step - self.nonfinite_streak + 1}-{step}) had a non-finite loss or "
                    f"gradients (max_nonfinite_steps {self.config.max_nonfinite_steps}); "
                    f"{self._last_checkpoint_state()}"
                )

    def _log_train(self, log: MetricsLog, bar: tqdm, result: StepResult) -> None:
        loss_value, grad_norm_value = result.loss.item(), result.grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            return  # the step's update was skipped; its skip record stands for it
        tokens_per_s = self._tokens_per_s_since(*self._last_log)
        self._last_log = (self.step, self.train_time_s)
        if self._first_log is None:
            self._first_log = self._last_log
        record = {
            "step": self.step,
            "kind": "train",
            "loss": loss_value,
            "lr": result.lr,
            "grad_norm": grad_norm_value,
            "tokens_per_s": tokens_per_s,
            **self._per_gpu("tokens_per_s", tokens_per_s),
            "elapsed_s": self._elapsed_s(),
        }
        self._emit(log, record)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s or 0:,.0f}")

    def _evaluate(self, log: MetricsLog, bar: tqdm) -> None:
        config, plan = self.config, self.eval_plan
        record: dict[str, Any] = {"step": self.step, "kind": "eval", "ppl_unit": self.token_unit}
        spread = self.world_size > 1
        results = {}
        for protocol in config.eval_protocols:
            started = time.perf_counter()

            def show(done: int, total: int, protocol: str = protocol) -> None:
                bar.set_description_str(f"eval {protocol} {done}/{total}", refresh=True)

            if protocol == "full":
                results[protocol] = evaluate_full(
                    self.forward_model, self.val_tokens, self.context_length, config.eval_batch_size,
                    self.device, windows=plan.full_windows, on_batch=show, spread=spread,
                )
                record["val_tokens_full"] = results[protocol]["tokens"]
            else:
                results[protocol] = evaluate_random(
                    self.forward_model, self.val_tokens, self.context_length, plan.random_batch_size,
                    plan.random_batches, torch.Generator().manual_seed(config.eval_seed), self.device,
                    on_batch=show, spread=spread,
                )
            record[f"val_windows_{protocol}"] = plan.windows(protocol)
            record.setdefault("eval_s", {})[protocol] = time.perf_counter() - started
        bar.set_description_str("", refresh=False)
        for protocol, result in results.items():
            record[f"val_loss_{protocol}"] = result["loss"]
            record[f"val_ppl_{protocol}"] = result["ppl"]
            best = self.best.get(protocol)
            if best is None or result["loss"] < best["loss"]:
                self.best[protocol] = {
                    "loss": result["loss"],
                    "ppl": result["ppl"],
                    "step": self.step,
                }
                if protocol == config.selection_protocol:
                    self._save_best(result)
        selected = self.best[config.selection_protocol]
        record.update(
            best_val_loss=selected["loss"], best_val_ppl=selected["ppl"], best_step=selected["step"]
        )
        record.update(self._diagnostics(record))
        self.last_eval = to_jsonable(record)
        self._emit(log, record)
        if self.progress:
            scores = ", ".join(
                f"{p} ppl per {self.token_unit} {r['ppl']:.4f}" for p, r in results.items()
            )
            bar.write(
                f"step {self.step}: val {scores} (best {selected['ppl']:.4f} at {selected['step']})"
            )

    def _diagnostics(self, record: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(self.model, "diagnostics"):
            return {}
        with torch.no_grad():
            diagnostics = {
                name: full_tensor(value) if isinstance(value, torch.Tensor) else value
                for name, value in self.model.diagnostics().items()
            }
            diagnostics = to_jsonable(diagnostics)
        clashes = sorted(set(diagnostics) & set(record))
        if clashes:
            raise ValueError(f"model.diagnostics() returned reserved metric names: {clashes}")
        return diagnostics

    def _save_best(self, result: dict[str, float]) -> None:
        """Write best.pt; every rank calls it (FSDP2 gathers the weights), rank 0 writes."""
        model_state = full_model_state(self.model, self.fsdp)
        if not self.is_main:
            return
        self._write_checkpoint(
            BEST_CHECKPOINT,
            {
                "kind": "best",
                "model": model_state,
                "step": self.step,
                "metric": {
                    "protocol": self.config.selection_protocol,
                    "loss": result["loss"],
                    "ppl": result["ppl"],
                },
                "config": self.config.to_dict(),
                "model_config": model_config_dict(self.model),
                "meta": self.checkpoint_meta,
            },
        )

    def _save_last(self) -> None:
        """Write last.pt; every rank calls it (its sampler and RNG states are gathered, and
        FSDP2's shards), rank 0 writes."""
        self.wall_time_s = self._elapsed_s()
        model_state = full_model_state(self.model, self.fsdp)
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self.fsdp)
        rank_states = gather_from_ranks(
            {"sampler": self.sampler.state_dict(), "rng": capture_rng_states(self.device)}
        )
        if self.is_main:
            self._write_checkpoint(
                LAST_CHECKPOINT,
                {
                    "kind": "last",
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "step": self.step,
                    "sampler": rank_states[0]["sampler"],
                    "rng": rank_states[0]["rng"],
                    "parallel": {"world_size": self.world_size, "fsdp": self.fsdp},
                    **({"ranks": rank_states} if self.world_size > 1 else {}),
                    "progress": {
                        "best": self.best,
                        "last_eval": self.last_eval,
                        "train_time_s": self.train_time_s,
                        "wall_time_s": self.wall_time_s,
                        "nonfinite_streak": self.nonfinite_streak,
                        "skipped_steps": self.skipped_steps,
                    },
                    "config": self.config.to_dict(),
                    "model_config": model_config_dict(self.model),
                    "meta": self.checkpoint_meta,
                },
            )
        self._last_saved_step = self.step

    def _write_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        """Write best.pt or last.pt; a failed write leaves the previous file as it was."""
        path = self.out_dir / name
        try:
            save_checkpoint(checkpoint, path)
        except OSError as error:
            raise self._write_error(path, error) from error

    def _write_error(self, path: Path, error: OSError) -> RunOutputError:
        return RunOutputError(
            f"cannot write {path} at step {self.step}: {error.strerror or error}; "
            f"{self._last_checkpoint_state()}"
        )

    def _last_checkpoint_state(self) -> str:
        """Which step last.pt holds, for error messages."""
        if self._last_saved_step is None:
            return "no last.pt was written yet"
        return f"{self.out_dir / LAST_CHECKPOINT} keeps step {self._last_saved_step}"

    def _load_last(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        missing = [key for key in _RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} cannot resume a run: it lacks {', '.join(missing)}"
            )
        differences = run_changing_differences(checkpoint["config"], self.config)
        current_model_config = model_config_dict(self.model)
        saved_model_config = checkpoint["model_config"]
        if saved_model_config is not None:
            saved_model_config = current_config_dict(self.model, saved_model_config)
        if saved_model_config != current_model_config:
            keys = sorted(
                key
                for key in set(saved_model_config or {}) | set(current_model_config or {})
                if (saved_model_config or {}).get(key) != (current_model_config or {}).get(key)
            )
            differences.append(f"model config field(s) {', '.join(keys)}")
        parallel = checkpoint.get("parallel", {"world_size": 1, "fsdp": False})  # absent: older, 1 process
        if parallel["world_size"] != self.world_size:
            differences.append(
                f"world size (processes): {parallel['world_size']} -> {self.world_size}"
            )
        if parallel["fsdp"] != self.fsdp:
            differences.append(f"fsdp: {parallel['fsdp']} -> {self.fsdp}")
        if differences:
            raise ValueError(
                f"cannot resume {path}: the run would change in " + "; ".join(differences)
            )
        load_full_state(
            self.model, self.optimizer, checkpoint["model"], checkpoint["optimizer"], self.fsdp
        )
        own = checkpoint["ranks"][self.rank] if self.world_size > 1 else checkpoint
        self.sampler.load_state_dict(own["sampler"])
        self.step = checkpoint["step"]
        progress = checkpoint["progress"]
        self.best = progress["best"]
        self.last_eval = progress["last_eval"]
        self.train_time_s = progress["train_time_s"]
        self.wall_time_s = progress["wall_time_s"]
        self.nonfinite_streak = progress.get("nonfinite_streak", 0)  # absent before format 2
        self.skipped_steps = progress.get("skipped_steps", 0)
        self._saved_rng = own["rng"]
        self._last_saved_step = self.step
        self.resumed = True

    def _summary(self) -> dict[str, Any]:
        config = self.config
        selected = self.best[config.selection_protocol]
        mean = self._tokens_per_s_since(0, 0.0)
        steady = self._tokens_per_s_since(*self._first_log) if self._first_log else None
        final = {}
        for protocol in config.eval_protocols:
            final[f"final_val_loss_{protocol}"] = self.last_eval[f"val_loss_{protocol}"]
            final[f"final_val_ppl_{protocol}"] = self.last_eval[f"val_ppl_{protocol}"]
        return {
            "finished": self.step >= config.max_steps,
            "step": self.step,
            "max_steps": config.max_steps,
            "params": self.model.num_parameters(),
            "selection_protocol": config.selection_protocol,
            "best_val_loss": selected["loss"],
            "best_val_ppl": selected["ppl"],
            "best_step": selected["step"],
            "best": self.best,
            "final_eval_step": self.last_eval["step"],
            **final,
            "ppl_unit": self.token_unit,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "tokens_per_step": self.tokens_per_step,
            "tokens_seen": self.step * self.tokens_per_step,
            "skipped_steps": self.skipped_steps,
            "tokens_per_s_mean": mean,
            **self._per_gpu("tokens_per_s_mean", mean),
            "tokens_per_s_steady": steady,
            **self._per_gpu("tokens_per_s_steady", steady),
            "train_time_s": self.train_time_s,
            "wall_time_s": self._elapsed_s(),
            "config": config.to_dict(),
        }

    def _tokens_per_s_since(self, step: int, train_time_s: float) -> float | None:
        """Training throughput over all ranks from a (step, train_time_s) point to now; None over
        no time."""
        seconds = self.train_time_s - train_time_s
        return (self.step - step) * self.tokens_per_step / seconds if seconds > 0 else None

    def _per_gpu(self, name: str, tokens_per_s: float | None) -> dict[str, float | None]:
        """`{name + "_per_gpu": tokens_per_s / world_size}` when several ranks train, else `{}`."""
        if self.world_size == 1:
            return {}
        per_gpu = None if tokens_per_s is None else tokens_per_s / self.world_size
        return {f"{name}_per_gpu": per_gpu}

    def _emit(self, log: MetricsLog | None, record: dict[str, Any]) -> None:
        """Write a record to metrics.jsonl and pass it to the callbacks (rank 0 only)."""
        if not self.is_main:
            return
        try:
            log.write(record)
        except OSError as error:
            raise self._write_error(log.path, error) from error
        for callback in self.callbacks:
            callback(record)

    def _elapsed_s(self) -> float:
        return self._wall_offset + time.perf_counter() - self._session_start

    def _prepare_out_dir(self) -> None:
        """Create `out_dir`, check that it takes files and has room for best.pt and last.pt, and
        remove the temporary files of writes cut short by a killed process."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunOutputError(
                f"out_dir {self.out_dir} cannot be created: {error.strerror or error}"
            ) from error
        try:
            fd, probe = tempfile.mkstemp(dir=self.out_dir, prefix=".write-probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise RunOutputError(
                f"out_dir {self.out_dir} is not writable: {error.strerror or error}"
            ) from error
        remove_stale_temporaries(self.out_dir, RUN_FILES)
        free = shutil.disk_usage(self.out_dir).free
        needed = self._checkpoint_bytes()
        if free < needed:
            raise RunOutputError(
                f"out_dir {self.out_dir} has {free / _MIB:.1f} MiB of free disk space; best.pt "
                f"and last.pt need about {needed / _MIB:.1f} MiB"
            )

    def _checkpoint_bytes(self) -> int:
        """Estimated size of best.pt plus last.pt: the model's state twice, and AdamW's two
        moments of each optimized parameter."""
        model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        parameter_bytes = sum(
            p.numel() * p.element_size()
            for group in self.optimizer.param_groups
            for p in group["params"]
        )
        return 2 * model_bytes + 2 * parameter_bytes

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _resolve_context_length(self) -> int:
        model_config = getattr(self.model, "config", None)
        model_length = getattr(model_config, "context_length", None)
        if not isinstance(model_length, int) or not isinstance(
            getattr(model_config, "vocab_size", None), int
        ):
            raise ValueError("model.config must have int context_length and vocab_size")
        length = self.config.context_length or model_length
        if length > model_length:
            raise ValueError(
                f"context_length {length} exceeds the model's context_length {model_length}"
            )
        return length

    def _check_tokens(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor")
        if tokens.numel() <= self.context_length:
            raise ValueError(
                f"{name} has {tokens.numel()} ids; at least context_length + 1 = "
                f"{self.context_length + 1} are needed"
            )
        vocab_size = self.model.config.vocab_size
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} holds ids in [{low}, {high}], "
                f"outside the model's vocabulary [0, {vocab_size})"
            )
        return tokens.long().cpu()

    def _compiled_model(self, model: torch.nn.Module) -> Callable:
        """`model` through torch.compile in the config's `compile_mode`."""
        mode = self.config.compile_mode
        return torch.compile(model, mode=None if mode == "default" else mode)

    def _build_optimizer(self, param_groups_fn: ParamGroupsFn) -> torch.optim.Optimizer:
        groups = param_groups_fn(self.model, self.config.optimizer_mode, self.config.weight_decay)
        names = {id(p): name for name, p in self.model.named_parameters()}
        seen: set[int] = set()
        optimizer_groups = []
        for group in groups:
            missing_keys = [key for key in _PARAM_GROUP_KEYS if key not in group]
            if missing_keys:
                raise ValueError(f"parameter group {group.get('name', '?')!r} lacks {missing_keys}")
            params = list(group["params"])
            for p in params:
                if id(p) in seen:
                    raise ValueError(
                        f"parameter {names.get(id(p), '?')} is in two parameter groups"
                    )
                seen.add(id(p))
            if params:
                optimizer_groups.append({**group, "params": params})
        ungrouped = [
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in seen
        ]
        if ungrouped:
            raise ValueError(f"parameters in no parameter group: {', '.join(ungrouped)}")
        return torch.optim.AdamW(
            optimizer_groups,
            lr=self.config.lr,
            betas=self.config.betas,
            eps=self.config.eps,
            fused=True if self.device.type == "cuda" else None,
        )
