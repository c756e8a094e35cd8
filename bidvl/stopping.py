"""Stop requests: the signals that end a training run, and the wait for data they may interrupt.

SIGTERM and SIGUSR1 (SLURM's time limit and requeue) and Ctrl-C (SIGINT) end the run after the
current step with a checkpoint; the engine reads `StopControl.signal` after each step (the ranks
agree on it, bidvl.distributed.HostFlags). A second Ctrl-C, once the first was handled, aborts
at once (the process dies of SIGINT).

A stop that arrives while the loop waits for data (a stalled server, a hung `pipe:` command) does
not wait for the data: one process gives the batch GRACE_S (1 s) to arrive, then stops
(`StopRequested` out of the wait, raised by SIGALRM; the state is that of the last step, so it
checkpoints); several processes give the data train.stop_wait_s to arrive, since the other ranks
may be inside the next step, then end without a checkpoint (`stopped_while_waiting` raises the
ShardError that says so). The grace matters with loader workers: an exception raised into the
DataLoader while it receives a batch (a file descriptor passed by the worker) broke the transfer
and the worker printed a ConnectionResetError traceback; a batch that is coming arrives within the
grace, and the stop then follows the step as usual. A stop already pending when a wait begins
(received after the last step's flags were agreed) ends it before anything is read. After the run has ended (`ended` set),
a signal is reported and the teardown finishes.
"""

from __future__ import annotations

import signal
import sys

from .data.errors import ShardError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGALRM)
GRACE_S = 1.0  # one process: how long a stop during a wait for data lets a coming batch arrive


class StopRequested(BaseException):
    """Raised by the signal handler into a wait for data: a BaseException, so that no retry loop of
    the data path takes it for a read error."""


class StopControl:
    """Installs the stop handlers at once (a SLURM time-limit signal during start-up or resume must
    not be lost: the per-node launcher starts us with SIGUSR1 ignored); `restore()` puts the
    previous handlers back."""

    def __init__(self, stop_wait_s: float):
        self.stop_wait_s = stop_wait_s
        self.processes = 1  # set once the Accelerator exists
        self.signal = 0  # the stop signal this process received (SIGTERM, SIGUSR1, SIGINT), else 0
        self.ended = ""  # how the training ended, once the engine has said so (a later signal is only reported)
        self._waiting_for_data = False  # the loop is blocked on the data stream (a safe place to stop)
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGALRM:
            if self._waiting_for_data:
                self._waiting_for_data = False
                raise StopRequested
            return
        if self.ended:  # after the closing lines: nothing left to stop, the teardown finishes
            print(f"signal {signum} after the training had ended ({self.ended}): finishing the teardown, "
                  f"then exiting", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT:
            # The next Ctrl-C takes the default action, in the kernel: it ends the process even
            # inside a long C call, where a Python handler would wait (and two signals would merge).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("interrupted: checkpointing after this step, then exiting (Ctrl-C again aborts "
                  "without a checkpoint)", file=sys.stderr, flush=True)
        self.signal = self.signal or signum
        if self._waiting_for_data:
            self._interrupt_the_wait()

    def _interrupt_the_wait(self) -> None:
        """SIGALRM raises StopRequested into the wait unless the batch arrives first."""
        signal.setitimer(signal.ITIMER_REAL, GRACE_S if self.processes == 1 else self.stop_wait_s)

    def next_batches(self, batches_iter, accum: int) -> tuple[list, int] | None:
        """The next step's `accum` micro-batches and the samples the loader skipped for them, or
        None when a stop request interrupted the wait."""
        batches, skipped_samples = [], 0
        try:
            self._waiting_for_data = True
            if self.signal:  # received after the last step's flags were agreed: nothing is being read yet
                if self.processes == 1:
                    raise StopRequested
                self._interrupt_the_wait()
            for _ in range(accum):
                batch, _, skipped = next(batches_iter)
                batches.append(batch)
                skipped_samples += skipped
        except StopRequested:
            return None
        finally:
            self._waiting_for_data = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        return batches, skipped_samples

    def stopped_while_waiting(self, accelerator, step: int, last_saved: int, save) -> str:
        """A stop request ended a wait for data: one process checkpoints the last step (`save()`);
        several end without a checkpoint (ShardError: exit 2), as a checkpoint needs every rank.
        Returns how the training ended."""
        if self.processes > 1:
            raise ShardError(f"signal {self.signal} arrived while rank {accelerator.process_index} waited for "
                             f"data, and no data came within train.stop_wait_s={self.stop_wait_s:g} s: "
                             f"exiting without a checkpoint (a checkpoint needs every rank at the same step); "
                             f"a restart resumes from the newest complete one")
        accelerator.print(f"signal {self.signal} while waiting for data: checkpointing at step {step} and exiting")
        if last_saved != step and step > 0:  # (a new run stopped before its first step: nothing to save)
            save()
        return f"stopped by signal {self.signal} while waiting for data"

    def restore(self) -> None:
        """The previous handlers back (last in a teardown: a signal during it is reported, not fatal)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
