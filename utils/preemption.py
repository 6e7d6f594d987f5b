"""Stop cleanly when the scheduler asks: SIGTERM (preemption, ``scancel``), SIGUSR1 (SLURM's warning) and a first
Ctrl-C (SIGINT; a second one ends the run at once, as Python's default does).

The signal handler only raises a flag (``received``). The training loop reads it at its log steps and agrees
on it across ranks in the one max all-reduce it runs there (engine.StepStats.read), so every rank stops after
the same optimizer step and rank 0 can write a checkpoint that resumes mid-epoch.
"""
from __future__ import annotations

import signal
from typing import Iterable


class PreemptionHandler:
    """Records whether a stop signal arrived; installs and restores the signal handlers."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step
        self.received = signum

    def install(self) -> 'PreemptionHandler':
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> 'PreemptionHandler':
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
