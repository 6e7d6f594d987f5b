"""The stop signals: SIGTERM, SIGUSR1 and a first Ctrl-C raise the stop flag; a second Ctrl-C ends at once;
loader workers ignore them all (the main process stops the run)."""
from __future__ import annotations

import os
import signal

import pytest

from data.samplers import STOP_SIGNALS, WorkerSeeder
from utils.preemption import PreemptionHandler


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_raises_the_flag_and_the_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), sig)
        assert handler.received == sig
    assert signal.getsignal(sig) == before


def test_a_second_ctrl_c_ends_at_once():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert handler.received == signal.SIGINT


def test_loader_workers_ignore_the_stop_signals():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        WorkerSeeder(seed=0, epoch=0, rank=0)(worker_id=0)  # what each worker runs first
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
        for sig in STOP_SIGNALS:
            os.kill(os.getpid(), sig)  # would end this process, or raise, were they not ignored
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
