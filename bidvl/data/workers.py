"""DataLoader workers that never outlive the training process and never hold it at exit.

Workers ignore SIGTERM, SIGUSR1 and SIGINT: SLURM (time limit, scancel) and Ctrl-C signal every
process of the job or of the terminal's process group, and the main process must first finish its
step and checkpoint while its workers keep serving (a worker ended by the signal would make the
loader raise in the main process). Two consequences are handled here:

* At exit, multiprocessing ends daemonic children with SIGTERM and then *joins* them: with SIGTERM
  ignored, that join never returned, so any error after the loader had started (a bad shard, a full
  disk, a crash in logging) printed its message and then hung for ever. The main process registers
  `end_workers_at_exit` when it starts workers; it runs before multiprocessing's own exit handler
  (atexit runs last-registered first) and kills the remaining children with SIGKILL. Workers only
  read shards: there is nothing of theirs to flush.
* A worker whose parent died (SIGKILL, a killed launcher) is killed by the kernel on Linux
  (prctl PR_SET_PDEATHSIG) instead of living on as an orphan.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
_registered = False


def start(loader):
    """iter(loader), its workers forked with the stop signals blocked: a Ctrl-C or SIGTERM that
    arrives while they start stays pending for the main process instead of killing a worker
    before `worker_init` made it ignore them (the loader would then fail with a traceback).
    Errors raised in a worker come out as the worker raised them (`Unwrapped`)."""
    end_workers_at_exit()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return Unwrapped(iter(loader))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Unwrapped:
    """A DataLoader iterator whose worker errors read as in the main process.

    torch re-raises a worker's exception as the same type with the worker's whole traceback as
    its message ("Caught ShardError in DataLoader worker process 0. Original Traceback ...").
    Here it is raised again with the original message (the traceback's last line), chained to the
    torch one (`__cause__`), so a ShardError's one line names the shard and nothing else."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except Exception as exc:
            original = original_error(exc)
            if original is exc:
                raise
            raise original from exc


def original_error(exc: Exception) -> Exception:
    """`exc` as the DataLoader worker raised it (see `Unwrapped`); `exc` itself otherwise."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    if not sep or name.rsplit(".", 1)[-1] != type(exc).__name__:
        return exc
    try:
        return type(exc)(message)
    except Exception:  # a type whose constructor takes other arguments: keep torch's error
        return exc


def worker_init(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave the job's signals to the main process, die with it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by `start`; now ignored
    if sys.platform.startswith("linux"):
        parent = multiprocessing.parent_process()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            return
        if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl
            os._exit(1)


def end_workers_at_exit() -> None:
    """Registers (once per process) the exit handler that kills this process's remaining
    multiprocessing children (its loader workers) instead of waiting for them."""
    global _registered
    if not _registered:
        atexit.register(_kill_children)
        _registered = True


def _kill_children() -> None:
    children = multiprocessing.active_children()
    if not children:
        return
    # torch's SIGCHLD handler would report each killed worker as a failure of the loader.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
