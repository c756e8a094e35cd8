"""The non-finite policy: what a run does after steps whose loss or gradients were not finite.

`bidvl.distributed.step_optimizer` skips an optimizer step whose gradients are not finite and says
so in the StepResult (`nonfinite`); after each step the engine calls `apply_policy`, which counts
such steps in a row (TrainState.skipped_in_a_row) and, after train.nonfinite_patience of them,
applies train.on_nonfinite: `skip` (go on), `stop` (NonFiniteError), `rollback` (reload the newest
complete checkpoint with the learning rates scaled by train.rollback_lr_scale, at most
train.max_rollbacks times).
"""

from __future__ import annotations

from .errors import BidvlError


class NonFiniteError(BidvlError, FloatingPointError):
    """train.on_nonfinite gave up: stop, rollbacks used up, or no checkpoint to roll back to."""


def apply_policy(trainer, result) -> bool:
    """After a step of `trainer` (bidvl.engine.Trainer) whose StepResult is `result`: counts
    consecutive steps with a non-finite skip; after train.nonfinite_patience of them applies
    train.on_nonfinite: skip (go on), stop (raise), rollback (reload the newest complete checkpoint
    with the learning rates scaled). Returns True when the run was rolled back."""
    cfg = trainer.cfg.train
    if not result.nonfinite:
        trainer.state.skipped_in_a_row = 0
        return False
    trainer.state.skipped_in_a_row += 1
    if trainer.state.skipped_in_a_row < cfg.nonfinite_patience or cfg.on_nonfinite == "skip":
        return False
    what = f"{trainer.state.skipped_in_a_row} consecutive steps with non-finite loss or gradients"
    if cfg.on_nonfinite == "stop":
        raise NonFiniteError(f"{what} at step {trainer.state.step} (train.on_nonfinite=stop)")
    if trainer.state.rollbacks >= cfg.max_rollbacks:
        raise NonFiniteError(f"{what} at step {trainer.state.step}, after {trainer.state.rollbacks} "
                             f"rollbacks (train.max_rollbacks={cfg.max_rollbacks})")
    rollbacks = trainer.state.rollbacks + 1
    # Scaled from the current rates, not the checkpoint's: a second rollback to the same
    # checkpoint lowers them again (it would otherwise replay the same rates).
    lr_scale = trainer.state.lr_scale * cfg.rollback_lr_scale
    loaded = trainer.checkpointer.rollback(trainer.unwrapped, trainer.ema)
    if loaded is None:
        raise NonFiniteError(f"{what} at step {trainer.state.step} and no checkpoint to roll back to")
    latest, trainer.state = loaded
    trainer.state.rollbacks = rollbacks
    trainer.state.lr_scale = lr_scale
    trainer.set_learning_rates()
    trainer.accelerator.print(f"{what}: rolled back to {latest.name}, learning rates x{lr_scale:g}")
    return True
