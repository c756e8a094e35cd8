"""The non-finite policy: what a run does after steps whose loss or gradients were not finite.

`bidvl.distributed.step_optimizer` skips, on the device, an optimizer step whose gradients are not
finite. `NonfiniteCounts` keeps the counts on the device too (skipped optimizer steps, training
steps with a non-finite skip in a row, the step at which train.nonfinite_patience of them in a row
was reached), so an ordinary training step reads nothing back. The engine reads them with one
device read at its *sync steps*: every log, image, evaluation, health and checkpoint step, the last
step and a stop. There `apply_policy` applies train.on_nonfinite: `skip` (go on), `stop`
(NonFiniteError), `rollback` (reload the newest complete checkpoint with the learning rates scaled
by train.rollback_lr_scale, at most train.max_rollbacks times).

The delay this costs: the policy acts at the first sync step at or after the step at which the
patience was reached, at most min(log.every, checkpoint.every, ...) - 1 steps later (the message
names both steps). In between the run goes on skipping non-finite steps, as it would under `skip`.
A checkpoint is a sync step, so no checkpoint is ever written between reaching the patience and
acting on it, and a rollback goes back to the same checkpoint as an immediate one would.
"""

from __future__ import annotations

import torch

from .errors import BidvlError


class NonFiniteError(BidvlError, FloatingPointError):
    """train.on_nonfinite gave up: stop, rollbacks used up, or no checkpoint to roll back to."""


class NonfiniteCounts:
    """The non-finite counts of a run, on the device, since they were last read.

    `record(skipped, nonfinite, step)` after each training step (device tensors: optimizer steps
    skipped in it; whether any of them was non-finite); `read_into(state)` moves them into the
    TrainState (skipped_steps, skipped_in_a_row) with one read and keeps the step at which the
    patience was reached (`reached`, None if not) until `take_reached()`; `start_from(state)`
    after the state was replaced (resume, rollback, restart)."""

    def __init__(self, device, patience: int):
        self.patience = patience
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # since the last read
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.reached_at = torch.full((), -1, dtype=torch.int64, device=device)  # -1: not reached
        self.reached: int | None = None

    def start_from(self, state) -> None:
        self.skipped.zero_()
        self.in_a_row.fill_(state.skipped_in_a_row)
        self.reached_at.fill_(-1)
        self.reached = None

    def record(self, skipped: torch.Tensor, nonfinite: torch.Tensor, step: int) -> None:
        self.skipped.add_(skipped.to(self.skipped.device, torch.int64))
        self.in_a_row.add_(1).mul_(nonfinite.to(self.in_a_row.device, torch.int64))
        first = (self.reached_at < 0) & (self.in_a_row >= self.patience)
        self.reached_at.copy_(torch.where(first, step, self.reached_at))

    def read_into(self, state) -> None:
        skipped, in_a_row, reached_at = torch.stack([self.skipped, self.in_a_row, self.reached_at]).tolist()
        state.skipped_steps += skipped
        state.skipped_in_a_row = in_a_row
        if reached_at >= 0 and self.reached is None:
            self.reached = reached_at
        self.skipped.zero_()
        self.reached_at.fill_(-1)

    def take_reached(self) -> int | None:
        reached, self.reached = self.reached, None
        return reached


def apply_policy(trainer) -> bool:
    """At a sync step of `trainer` (bidvl.engine.Trainer): reads its NonfiniteCounts into its state;
    when train.nonfinite_patience steps in a row had a non-finite skip since the last sync step,
    applies train.on_nonfinite: skip (go on), stop (raise), rollback (reload the newest complete
    checkpoint with the learning rates scaled). Returns True when the run was rolled back."""
    cfg, counts = trainer.cfg.train, trainer.nonfinite
    counts.read_into(trainer.state)
    reached = counts.take_reached()
    if reached is None or cfg.on_nonfinite == "skip":
        return False
    step = trainer.state.step
    what = f"{cfg.nonfinite_patience} consecutive steps with non-finite loss or gradients at step {reached}"
    if step != reached:
        what += f" (acted on at step {step}, the first sync step after it)"
    if cfg.on_nonfinite == "stop":
        raise NonFiniteError(f"{what} (train.on_nonfinite=stop)")
    if trainer.state.rollbacks >= cfg.max_rollbacks:
        raise NonFiniteError(f"{what}, after {trainer.state.rollbacks} rollbacks "
                             f"(train.max_rollbacks={cfg.max_rollbacks})")
    rollbacks = trainer.state.rollbacks + 1
    # Scaled from the current rates, not the checkpoint's: a second rollback to the same
    # checkpoint lowers them again (it would otherwise replay the same rates).
    lr_scale = trainer.state.lr_scale * cfg.rollback_lr_scale
    loaded = trainer.checkpointer.rollback(trainer.unwrapped, trainer.ema)
    if loaded is None:
        raise NonFiniteError(f"{what} and no checkpoint to roll back to")
    latest, trainer.state = loaded
    trainer.state.rollbacks = rollbacks
    trainer.state.lr_scale = lr_scale
    counts.start_from(trainer.state)
    trainer.set_learning_rates()
    trainer.accelerator.print(f"{what}: rolled back to {latest.name}, learning rates x{lr_scale:g}")
    return True
