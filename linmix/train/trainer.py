"""The training loop: AdamW groups, warmup-cosine schedule, mixed precision, evaluation,
checkpoints and exact resumption."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from linmix.data.batches import RandomWindowSampler
from linmix.models.param_groups import param_groups
from linmix.models.registry import current_config_dict
from linmix.train.checkpoint import (
    capture_rng_states,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
    seed_global_rngs,
)
from linmix.train.config import TrainConfig, run_changing_differences
from linmix.train.evaluate import autocast_for, evaluate_full, evaluate_random
from linmix.train.metrics import MetricsLog, to_jsonable, truncate_metrics, write_summary
from linmix.train.schedule import lr_multiplier

ParamGroupsFn = Callable[[torch.nn.Module, str, float], list[dict[str, Any]]]
RecordCallback = Callable[[dict[str, Any]], None]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = 1

_PARAM_GROUP_KEYS = ("params", "weight_decay", "lr_scale", "name")
_SAMPLER_STREAM = 0
_GLOBAL_RNG_STREAM = 1


def derive_seed(seed: int, stream: int) -> int:
    """An independent 32-bit seed for one random stream of a run.

    Args:
        seed: the run's seed.
        stream: which stream (training batches, global RNGs, ...).

    Returns:
        A seed in `[0, 2**32)`, different for each `(seed, stream)`.
    """
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


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
        progress: show a tqdm progress bar on stderr.

    On CUDA the Trainer enables TF32 matrix products for the whole process, trains under bf16
    autocast and uses fused AdamW; elsewhere it trains in float32.

    Raises:
        FileExistsError: `out_dir` holds a last.pt and `resume` is False.
        ValueError: the config, model, tokens or parameter groups do not fit together, or the
            resumed checkpoint was made with a config that changes the run (the fields are named).
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
    ) -> None:
        if stop_after is not None and stop_after < 0:
            raise ValueError(f"stop_after must be >= 0 or None, got {stop_after}")
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.context_length = self._resolve_context_length()
        self.train_tokens = self._check_tokens("train_tokens", train_tokens)
        self.val_tokens = self._check_tokens("val_tokens", val_tokens)
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.callbacks = list(callbacks)
        self.stop_after = stop_after
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        self.tokens_per_step = config.batch_size * self.context_length

        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        self.optimizer = self._build_optimizer(param_groups_fn or param_groups)
        sampler_generator = torch.Generator().manual_seed(derive_seed(config.seed, _SAMPLER_STREAM))
        self.sampler = RandomWindowSampler(
            self.train_tokens, config.batch_size, self.context_length, sampler_generator, device=self.device
        )
        self.forward_model = self._compiled_model() if config.compile else self.model

        self.step = 0
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
            The summary also written to `out_dir/summary.json`: best validation loss/ppl per
            protocol and their steps, the final evaluation, parameter count, times, and training
            throughput over the whole run (`tokens_per_s_mean`, compilation included) and from
            this call's first training record on (`tokens_per_s_steady`).
        """
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / METRICS_FILE
        if self.resumed:
            truncate_metrics(metrics_path, self.step)
            restore_rng_states(self._saved_rng, self.device)
        else:
            seed_global_rngs(derive_seed(config.seed, _GLOBAL_RNG_STREAM))
        last_step = (
            config.max_steps if self.stop_after is None else min(config.max_steps, self.stop_after)
        )

        self.model.train()
        self._session_start = time.perf_counter()
        self._wall_offset = self.wall_time_s
        self._last_log = (self.step, self.train_time_s)
        self._first_log = None
        with (
            MetricsLog(metrics_path, fresh=not self.resumed) as log,
            tqdm(
                total=config.max_steps,
                initial=self.step,
                disable=not self.progress,
                unit="step",
                dynamic_ncols=True,
            ) as bar,
        ):
            if not self.resumed:
                self._evaluate(log, bar)
            clock_start = time.perf_counter()
            while self.step < last_step:
                loss, grad_norm, lr = self.train_step()
                self.step += 1
                bar.update(1)
                log_now = self.step % config.log_interval == 0 or self.step == config.max_steps
                eval_now = self.step % config.eval_interval == 0 or self.step == config.max_steps
                save_now = self.step % config.checkpoint_every == 0 or self.step == config.max_steps
                if log_now or eval_now or save_now:
                    self._synchronize()
                    self.train_time_s += time.perf_counter() - clock_start
                    if log_now:
                        self._log_train(log, bar, loss, grad_norm, lr)
                    if eval_now:
                        self._evaluate(log, bar)
                    if save_now:
                        self._save_last()
                    clock_start = time.perf_counter()
            self._synchronize()
            self.train_time_s += time.perf_counter() - clock_start
            if self._last_saved_step != self.step:
                self._save_last()
        summary = self._summary()
        write_summary(self.out_dir / SUMMARY_FILE, summary)
        return summary

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer update on a fresh batch at the current step's learning rate.

        `fit` calls it and then advances `step`, logs, evaluates and saves; called alone (as
        `linmix bench train --profile-steps` does) it only updates the model, the optimizer and the
        sampler. Nothing is read back from the device.

        Returns:
            (loss, gradient norm before clipping, learning rate); the first two are device scalars.
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
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm, lr

    def _log_train(
        self, log: MetricsLog, bar: tqdm, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float
    ) -> None:
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} at step {self.step}")
        tokens_per_s = self._tokens_per_s_since(*self._last_log)
        self._last_log = (self.step, self.train_time_s)
        if self._first_log is None:
            self._first_log = self._last_log
        record = {
            "step": self.step,
            "kind": "train",
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "elapsed_s": self._elapsed_s(),
        }
        self._emit(log, record)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s or 0:,.0f}")

    def _evaluate(self, log: MetricsLog, bar: tqdm) -> None:
        config = self.config
        record: dict[str, Any] = {"step": self.step, "kind": "eval"}
        results = {}
        if "full" in config.eval_protocols:
            results["full"] = evaluate_full(
                self.forward_model,
                self.val_tokens,
                self.context_length,
                config.eval_batch_size,
                self.device,
            )
            record["val_tokens_full"] = results["full"]["tokens"]
        if "random" in config.eval_protocols:
            results["random"] = evaluate_random(
                self.forward_model,
                self.val_tokens,
                self.context_length,
                config.eval_batch_size,
                config.eval_random_iters,
                torch.Generator().manual_seed(config.eval_seed),
                self.device,
            )
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
            scores = ", ".join(f"{p} ppl {r['ppl']:.4f}" for p, r in results.items())
            bar.write(
                f"step {self.step}: val {scores} (best {selected['ppl']:.4f} at {selected['step']})"
            )

    def _diagnostics(self, record: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(self.model, "diagnostics"):
            return {}
        with torch.no_grad():
            diagnostics = to_jsonable(self.model.diagnostics())
        clashes = sorted(set(diagnostics) & set(record))
        if clashes:
            raise ValueError(f"model.diagnostics() returned reserved metric names: {clashes}")
        return diagnostics

    def _save_best(self, result: dict[str, float]) -> None:
        save_checkpoint(
            {
                "kind": "best",
                "format_version": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
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
            self.out_dir / BEST_CHECKPOINT,
        )

    def _save_last(self) -> None:
        self.wall_time_s = self._elapsed_s()
        save_checkpoint(
            {
                "kind": "last",
                "format_version": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "rng": capture_rng_states(self.device),
                "progress": {
                    "best": self.best,
                    "last_eval": self.last_eval,
                    "train_time_s": self.train_time_s,
                    "wall_time_s": self.wall_time_s,
                },
                "config": self.config.to_dict(),
                "model_config": model_config_dict(self.model),
                "meta": self.checkpoint_meta,
            },
            self.out_dir / LAST_CHECKPOINT,
        )
        self._last_saved_step = self.step

    def _load_last(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
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
        if differences:
            raise ValueError(
                f"cannot resume {path}: the run would change in " + "; ".join(differences)
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.sampler.load_state_dict(checkpoint["sampler"])
        self.step = checkpoint["step"]
        progress = checkpoint["progress"]
        self.best = progress["best"]
        self.last_eval = progress["last_eval"]
        self.train_time_s = progress["train_time_s"]
        self.wall_time_s = progress["wall_time_s"]
        self._saved_rng = checkpoint["rng"]
        self._last_saved_step = self.step
        self.resumed = True

    def _summary(self) -> dict[str, Any]:
        config = self.config
        selected = self.best[config.selection_protocol]
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
            "tokens_seen": self.step * self.tokens_per_step,
            "tokens_per_s_mean": self._tokens_per_s_since(0, 0.0),
            "tokens_per_s_steady": (
                self._tokens_per_s_since(*self._first_log) if self._first_log else None
            ),
            "train_time_s": self.train_time_s,
            "wall_time_s": self._elapsed_s(),
            "config": config.to_dict(),
        }

    def _tokens_per_s_since(self, step: int, train_time_s: float) -> float | None:
        """Training throughput from a (step, train_time_s) point to now; None over no time."""
        seconds = self.train_time_s - train_time_s
        return (self.step - step) * self.tokens_per_step / seconds if seconds > 0 else None

    def _emit(self, log: MetricsLog, record: dict[str, Any]) -> None:
        log.write(record)
        for callback in self.callbacks:
            callback(record)

    def _elapsed_s(self) -> float:
        return self._wall_offset + time.perf_counter() - self._session_start

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

    def _compiled_model(self) -> Callable:
        """The model through torch.compile in the config's `compile_mode`."""
        mode = self.config.compile_mode
        return torch.compile(self.model, mode=None if mode == "default" else mode)

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
