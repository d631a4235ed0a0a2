"""A tiny training run for the reliability tests: a toy model whose chosen steps go non-finite,
and a script that trains it and SIGKILLs itself at a chosen moment.

    python tests/_crash_run.py OUT_DIR [MOMENT]

trains (resuming OUT_DIR/last.pt when there is one) to the end, or until MOMENT:
    eval:S              during the evaluation at step S (its first batch)
    saved:NAME:S        right after NAME (best.pt or last.pt) is written at step S
    writing:NAME:S      halfway through writing NAME at step S (its temporary file is left behind)
"""

import io
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _paths import SHARED_DATA_DIR
from _toy_model import ToyCausalLM, ToyConfig, toy_param_groups
from torch import nn

import linmix.train.checkpoint as checkpoint_module
from linmix.data import load_char_corpus
from linmix.train import TrainConfig, Trainer

NAN_LOSS_STEPS = (4, 5, 6)  # three skips in a row, across the checkpoint at step 5
INF_GRAD_STEPS = (12,)
VAL_TOKENS = 4096


class PoisonedLM(nn.Module):
    """Wraps a model; at chosen training steps makes its loss NaN or, with the loss left finite, its
    gradients infinite.

    Args:
        inner: a model of the linmix model interface.
        nan_loss_steps: steps (1-based, as the Trainer counts them) whose loss becomes NaN.
        inf_grad_steps: steps whose gradients become infinite.
    """

    def __init__(self, inner: nn.Module, nan_loss_steps=(), inf_grad_steps=()) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.nan_loss_steps = frozenset(nan_loss_steps)
        self.inf_grad_steps = frozenset(inf_grad_steps)
        self.next_step: Callable[[], int] = lambda: 0

    def follow(self, trainer: Trainer) -> None:
        """Count steps as `trainer` does: a training forward pass is step `trainer.step + 1`."""
        self.next_step = lambda: trainer.step + 1

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, loss = self.inner(idx, targets)
        if loss is None or not self.training:
            return logits, loss
        step = self.next_step()
        if step in self.nan_loss_steps:
            loss = loss * float("nan")
        elif step in self.inf_grad_steps:
            loss.register_hook(lambda grad: grad * float("inf"))
        return logits, loss

    def num_parameters(self) -> int:
        return self.inner.num_parameters()

    def diagnostics(self) -> dict:
        return self.inner.diagnostics()


def run_config(out_dir: Path) -> TrainConfig:
    """20 steps: evaluations at 0, 10 and 20, last.pt every 5 steps, a record every step."""
    return TrainConfig(
        lr=1e-2,
        lr_floor=1e-3,
        warmup_steps=3,
        max_steps=20,
        batch_size=8,
        context_length=32,
        eval_interval=10,
        eval_batch_size=16,
        eval_random_iters=2,
        log_interval=1,
        checkpoint_interval=5,
        max_nonfinite_steps=4,
        out_dir=str(out_dir),
    )


def build_trainer(out_dir: Path) -> Trainer:
    """The run's Trainer, resuming `out_dir/last.pt` when there is one."""
    torch.manual_seed(0)
    corpus = load_char_corpus(SHARED_DATA_DIR)
    model = PoisonedLM(ToyCausalLM(ToyConfig()), NAN_LOSS_STEPS, INF_GRAD_STEPS)
    trainer = Trainer(
        model,
        corpus.train,
        corpus.val[:VAL_TOKENS],
        run_config(out_dir),
        param_groups_fn=toy_param_groups,
        resume=True,
        progress=False,
    )
    model.follow(trainer)
    return trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str, trainer: Trainer) -> None:
    """Make this process SIGKILL itself at `moment` (see the module's docstring)."""
    what, *where = moment.split(":")
    step = int(where[-1])
    if what == "eval":

        def kill_in_evaluation(module: nn.Module, args: tuple) -> None:
            if not module.training and trainer.step == step:
                die()

        trainer.model.register_forward_pre_hook(kill_in_evaluation)
        return
    name = where[0]
    real_atomic_write = checkpoint_module.atomic_write

    def write_half_then_die(f, write) -> None:
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        die()

    def atomic_write(path, write) -> None:
        hit = Path(path).name == name and trainer.step == step
        if hit and what == "writing":
            real_atomic_write(path, lambda f: write_half_then_die(f, write))
        real_atomic_write(path, write)
        if hit:
            die()

    checkpoint_module.atomic_write = atomic_write


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    trainer = build_trainer(Path(argv[0]))
    if len(argv) > 1:
        arm(argv[1], trainer)
    trainer.fit()


if __name__ == "__main__":
    main(sys.argv[1:])
