"""One rank's failure ends the whole job promptly, with that rank's message.

Without this, a rank that stops (a ``UserError`` such as its bad-image limit, a crash, SIGKILL) leaves the
others blocked in the next collective until its timeout (30 minutes for gloo, 10 for NCCL) unless a launcher
notices. ``PeerWatch`` runs a thread on every rank that agrees with the other ranks' threads, every few
seconds, over a small gloo group of its own (so it works beside NCCL and while the main thread is blocked):

* a rank that fails calls ``report(message)``: at the next round every peer learns which rank failed and
  why, prints ``error: rank R failed: <message>`` and exits at once (status 2 for a UserError, else 1);
* a peer that stops answering (killed, or hung longer than ``timeout`` seconds) ends the others with a line
  that says so;
* a normal end (``stop()``) is agreed too: no thread leaves while another still expects it.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from utils.errors import UserError

# Round codes, agreed by MAX: a failed rank sends 1 + priority * world_size + rank, so the most telling report
# wins when several ranks fail at once (a peer's failure breaks the collectives of the rest).
_RUNNING, _FINISHED = 0, -1
PRIORITY_COLLECTIVE, PRIORITY_CRASH, PRIORITY_USER_ERROR = 0, 1, 2


def failure_priority(error: BaseException) -> int:
    """How telling ``error`` is when several ranks fail: a failed collective (NCCL raises DistError, gloo a
    RuntimeError from its transport) is most often the echo of another rank's failure."""
    if isinstance(error, UserError):
        return PRIORITY_USER_ERROR
    if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and 'gloo' in str(error)):
        return PRIORITY_COLLECTIVE
    return PRIORITY_CRASH


class PeerWatch:
    """A background thread that ends this process when another rank fails or stops answering."""

    def __init__(self, rank: int, timeout: float, interval: Optional[float] = None):
        self.rank = rank
        self.world_size = dist.get_world_size()
        self.timeout = timeout
        self.interval = interval if interval is not None else min(5.0, max(0.2, timeout / 10))
        self._group = dist.new_group(backend='gloo', timeout=datetime.timedelta(seconds=timeout))
        self._code = _RUNNING
        self._message = ''
        self._status, self._priority = 2, PRIORITY_CRASH
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='peer-watch', daemon=True)
        self._thread.start()

    def report(self, message: str, status: int = 1, priority: int = PRIORITY_CRASH) -> None:
        """Tell every peer that this rank failed, then return (bounded by ``timeout``) so the caller can exit."""
        self._message, self._status, self._priority = message, status, priority
        self._code = 1 + priority * self.world_size + self.rank
        self._finish()
        time.sleep(min(1.0, self.interval))  # the peers print and leave before our sockets close

    def stop(self) -> None:
        """A normal end: wait until every rank has stopped its watch too."""
        if self._code == _RUNNING:
            self._code = _FINISHED
        self._finish()
        # gloo's worker thread frees the last round's work (and its tensor, which needs the GIL) just after the
        # round ends; on torch 2.6, freeing the group meanwhile from this thread deadlocks the process at exit
        time.sleep(0.1)

    def _finish(self) -> None:
        self._wake.set()
        self._thread.join(timeout=self.timeout + 2 * self.interval)

    def _watch(self) -> None:
        while True:
            code = torch.tensor([self._code], dtype=torch.int64)
            try:
                dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self._group)
                if code.item() > 0:
                    self._on_failure((int(code.item()) - 1) % self.world_size)
                    return
            except RuntimeError:
                if self._code > 0 and self._priority > PRIORITY_COLLECTIVE:
                    return  # our own failure, reported by the main thread; a peer left first
                _exit(1, f"a peer process stopped answering (exited, was killed, or hung for {self.timeout:.0f} s); "
                         f"ending rank {self.rank}")
            if code.item() == _FINISHED:
                return
            self._wake.wait(self.interval)
            self._wake.clear()

    def _on_failure(self, failed_rank: int) -> None:
        """Every rank joins one more collective: the failed rank's message and exit status, to all."""
        box = [(self._message, self._status) if failed_rank == self.rank else None]
        try:
            dist.broadcast_object_list(box, src=failed_rank, group=self._group)
        except RuntimeError:
            box = [('(its message was lost)', 1)]
        if failed_rank != self.rank:
            message, status = box[0]
            _exit(status, f"rank {failed_rank} failed: {message}")


def _exit(status: int, line: str) -> None:
    """End this process from the watch thread (the main thread may be blocked inside a collective)."""
    print(f"error: {line}", file=sys.stderr, flush=True)
    os._exit(status)
