"""Stop cleanly when the scheduler asks: SIGTERM (preemption, ``scancel``) and SIGUSR1 (SLURM's warning).

The signal handler only raises a flag. The training loop asks :meth:`PreemptionHandler.should_stop`
after each optimizer step; the answer is agreed across ranks (a max all-reduce), so every rank stops
after the same step and rank 0 can write a checkpoint that resumes mid-epoch.
"""
from __future__ import annotations

import signal
from typing import Iterable

import torch
import torch.distributed as dist


class PreemptionHandler:
    """Records whether a stop signal arrived; installs and restores the signal handlers."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> 'PreemptionHandler':
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self) -> 'PreemptionHandler':
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
