"""bidvl/stopping.py in the test process: a stop during a wait for data, with and without data coming."""

import os
import signal
import threading
import time

import pytest

from bidvl.stopping import GRACE_S, StopControl


def batches(delay: float):
    """An endless data stream whose every batch takes `delay` seconds (a stalled or slow loader)."""
    while True:
        time.sleep(delay)
        yield "batch", None, 0


def signal_in(seconds: float, sig=signal.SIGTERM):
    threading.Timer(seconds, lambda: os.kill(os.getpid(), sig)).start()


@pytest.fixture
def stops():
    control = StopControl(stop_wait_s=10.0)
    yield control
    signal.setitimer(signal.ITIMER_REAL, 0)
    control.restore()


def test_a_stop_while_the_data_is_stalled_ends_the_wait_after_the_grace(stops):
    signal_in(0.3)
    t0 = time.monotonic()
    assert stops.next_batches(batches(30.0), accum=1) is None  # (a batch takes 30 s)
    assert 0.3 + GRACE_S - 0.1 < time.monotonic() - t0 < 0.3 + GRACE_S + 2
    assert stops.signal == signal.SIGTERM


def test_a_batch_that_is_coming_arrives_and_the_stop_follows_the_step(stops):
    """A stop during the wait lets the batch arrive (no exception inside the loader's receive);
    the engine then stops after that step, as for a stop during a step."""
    signal_in(0.2)
    assert stops.next_batches(batches(0.5), accum=2) == (["batch", "batch"], 0)
    assert stops.signal == signal.SIGTERM
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the grace timer was cancelled
    time.sleep(GRACE_S + 0.2)  # (no StopRequested outside a wait)


def test_a_stop_pending_when_the_wait_begins_ends_it_before_anything_is_read(stops):
    stops.signal = signal.SIGTERM  # received after the last step's flags were agreed
    read = []

    def stream():
        read.append(1)
        yield "batch", None, 0

    assert stops.next_batches(stream(), accum=1) is None and read == []
    stops.processes = 2  # several processes: the data gets train.stop_wait_s
    stops.stop_wait_s = 0.3
    assert stops.next_batches(batches(0.05), accum=1) == (["batch"], 0)


def test_several_processes_wait_stop_wait_s(stops):
    stops.processes, stops.stop_wait_s = 2, 0.5
    signal_in(0.1)
    t0 = time.monotonic()
    assert stops.next_batches(batches(30.0), accum=1) is None
    assert 0.5 < time.monotonic() - t0 < 3
