"""The iterable the engine loops over: one epoch of ``(samples, targets)`` per pass.

:class:`EpochLoader` wraps a ``torch.utils.data.DataLoader`` built afresh for every epoch from a
:class:`~data.samplers.SeededBatchSampler`, with workers seeded from ``(seed, epoch, rank, worker)``.
It also

* finishes the uint8 images of the fast path into a normalised float batch (plus random erasing
  once per batch) inside the workers, in parallel and off the training loop's critical path, written
  straight into shared memory so that handing the batch to the main process copies nothing (each
  worker reuses its buffers once the main process has freed them: :class:`BatchBuffers`); or,
  with ``finish_on`` set to an accelerator, hands uint8 batches over (a quarter of the bytes to pin
  and to copy) and finishes them there, on arrival;
* keeps the books on unreadable images: every file is named once in the log (workers report them
  with their samples, the main process logs), the epoch's count is logged at its end and available
  from :meth:`EpochLoader.bad_images_this_epoch`, and a training run stops with a ``UserError`` as
  soon as more than ``max_bad_fraction`` of the rank's epoch is known to be unreadable.
"""
from __future__ import annotations

import logging
import math
import multiprocessing.util
import weakref
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, get_worker_info

from utils.errors import UserError

from .datasets import ImageListDataset, LoadedSample, UnreadableDataError
from .samplers import SeededBatchSampler, WorkerSeeder, mix_seed
from .transforms import BatchNormalize

_logger = logging.getLogger(__name__)


class KeyedCollate:
    """Stacks :class:`LoadedSample` items into ``(images, targets, bad, seed, slot)``, finishing uint8
    batches when given ``finish``; ``seed`` (from the batch's first key, so fixed by (seed, epoch,
    rank, position)) drives the batch's random erasing wherever the batch is finished. In a worker the
    images go into shared memory, into one of ``buffers``' reusable slots where one is free (``slot``:
    its number, -1 for none)."""

    def __init__(self, finish: Optional[BatchNormalize] = None, buffers: Optional[BatchBuffers] = None):
        self.finish, self.buffers = finish, buffers

    def __call__(self, items: Sequence[LoadedSample]):
        images = [item.image for item in items]
        if isinstance(items[0].target, torch.Tensor):  # multi-hot vectors (multi-label data)
            targets = torch.stack([item.target for item in items])
        else:
            targets = torch.tensor([item.target for item in items], dtype=torch.int64)
        bad = [entry for item in items for entry in item.bad]
        seed = mix_seed(items[0].seed, 0xE2A5E)
        dtype = torch.float32 if self.finish else images[0].dtype
        out, slot = self._empty_batch((len(images), *images[0].shape), dtype)
        if self.finish is not None:
            self.finish(images, seed, out=out)
        else:
            torch.stack(images, out=out)
        return out, targets, bad, seed, slot

    def _empty_batch(self, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """An uninitialised batch, in shared memory when built in a worker (as torch's default collate
        does: sending it to the main process then moves no data), and its slot in ``buffers``."""
        if get_worker_info() is None:
            return torch.empty(shape, dtype=dtype), -1
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.buffers is None:
            storage, slot = torch.UntypedStorage._new_shared(nbytes), -1
        else:
            storage, slot = self.buffers.take(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape), slot


class BatchBuffers:
    """Shared-memory batch buffers that loader workers reuse once the main process has let go of them.

    A worker writing a batch into fresh shared memory pays a page fault and a zero-fill for every
    4 KiB (on the fast path, about a tenth of its time per image); into a reused buffer, neither.
    Each worker owns ``per_worker`` slots. ``busy`` (shared memory, made by the main process) holds a
    flag per slot: the worker raises it when it hands the slot's buffer over, the main process lowers
    it when the batch's storage is freed there (a finalizer on the storage, so views, numpy arrays
    and tensors saved for backward keep the buffer taken; a batch passed on to yet another process
    counts as freed once this one lets go of it). A worker without a free slot falls back to fresh
    memory, so nothing ever waits on the pool; a free slot of the wrong size is reallocated.
    """

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = per_worker
        self.busy = torch.zeros(workers * per_worker, dtype=torch.uint8).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}  # per worker process: slot -> its buffer
        self._exit_hook: Optional[multiprocessing.util.Finalize] = None

    def take(self, nbytes: int) -> tuple[torch.UntypedStorage, int]:
        """In a worker: a shared buffer of ``nbytes`` and its slot (-1: fresh, not from the pool)."""
        if self._exit_hook is None:
            # loader workers end with os._exit: the buffers must go before it, or under the 'file_system'
            # sharing strategy each epoch's buffers stay in /dev/shm until the main process exits
            self._exit_hook = multiprocessing.util.Finalize(self, self._storages.clear, exitpriority=0)
        first = get_worker_info().id * self.per_worker
        for slot in range(first, first + self.per_worker):
            if self.busy[slot]:
                continue
            storage = self._storages.get(slot)
            if storage is None or storage.nbytes() != nbytes:
                storage = self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
            self.busy[slot] = 1
            return storage, slot
        return torch.UntypedStorage._new_shared(nbytes), -1

    def release_when_freed(self, batch: torch.Tensor, slot: int) -> None:
        """In the main process: hand ``slot`` back to its worker once ``batch``'s storage is freed."""
        if slot >= 0:
            weakref.finalize(batch.untyped_storage(), self.busy.__setitem__, slot, 0)


class EpochLoader:
    """Batches of one epoch, reproducible from ``(seed, epoch, rank)``; see the module docstring.

    Args:
        dataset: a dataset of ours (indexed with ``SampleKey``).
        batch_sampler: yields lists of keys; its ``len`` is the number of batches of a full epoch.
        finish: batch-level normalisation for uint8 samples (fast path), or None.
        max_bad_fraction: share of unreadable images that stops the run (None: never stop).

    Attribute ``finish_on`` (default None: in the workers): the device where ``finish`` turns uint8
    batches into float ones instead, on arrival (main.py sets the GPU when training on one).
    """

    PREFETCH = 2  # batches prefetched per worker (DataLoader's default)

    def __init__(self, dataset: ImageListDataset, batch_sampler: SeededBatchSampler, num_workers: int = 0,
                 pin_memory: bool = False, finish: Optional[BatchNormalize] = None, seed: int = 0,
                 rank: int = 0, max_bad_fraction: Optional[float] = None):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.num_workers, self.finish = num_workers, finish
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.max_bad_fraction = max_bad_fraction
        self.finish_on: Optional[torch.device] = None
        self.bad_files: set[str] = set()  # every unreadable file seen so far (each logged once)
        self._epoch_bad = 0

    @property
    def sampler(self):
        """The index sampler (``set_epoch`` is forwarded to it by :meth:`set_epoch`)."""
        return self.batch_sampler.sampler

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reseed for ``epoch``; the next pass skips its first ``start_step`` batches unread."""
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def bad_images_this_epoch(self) -> int:
        """Unreadable images met (and replaced) during the current or last epoch on this rank."""
        return self._epoch_bad

    def _dataloader(self, buffers: Optional[BatchBuffers]) -> DataLoader:
        generator = torch.Generator()  # base seed of the workers, kept off the global generator
        generator.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.num_workers,
                          collate_fn=KeyedCollate(None if self.finish_on else self.finish, buffers),
                          prefetch_factor=self.PREFETCH if self.num_workers else None,
                          pin_memory=self.pin_memory,
                          worker_init_fn=WorkerSeeder(self.seed, self.epoch, self.rank), generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler_epoch = getattr(self.sampler, 'epoch', self.epoch)
        if sampler_epoch != self.epoch:  # official-style code calls loader.sampler.set_epoch(epoch)
            self.set_epoch(sampler_epoch)
        self._epoch_bad = 0
        try:
            # per worker: a batch for each prefetched task, the one the loop holds and the one it is taking
            buffers = BatchBuffers(self.num_workers, self.PREFETCH + 2) if self.num_workers else None
            for images, targets, bad, seed, slot in self._dataloader(buffers):
                if buffers is not None:  # (with pin_memory, ``images`` is the pinned copy: released later)
                    buffers.release_when_freed(images, slot)
                if bad:
                    self._record_bad(bad)
                if self.finish_on is not None and self.finish is not None:
                    images = self.finish(images.to(self.finish_on, non_blocking=True), seed)
                yield images, targets
        except UnreadableDataError as err:
            raise UserError(f'too many unreadable images: {str(err).strip().splitlines()[-1]}') from None
        if self._epoch_bad:
            _logger.warning(f'epoch {self.epoch}: {self._epoch_bad} unreadable images were skipped and replaced '
                            f'({len(self.bad_files)} distinct files so far)')

    def _record_bad(self, bad: list[tuple[str, str]]) -> None:
        self._epoch_bad += len(bad)
        for location, reason in bad:
            if location not in self.bad_files:
                self.bad_files.add(location)
                _logger.warning(f'unreadable image skipped: {location} ({reason})')
        if self.max_bad_fraction is not None:
            epoch_size = len(self.batch_sampler.sampler)
            if len(self.bad_files) > self.max_bad_fraction * epoch_size:
                raise UserError(f'{len(self.bad_files)} unreadable images out of {epoch_size} per rank and epoch '
                                f'exceed DATA.MAX_BAD_FRACTION={self.max_bad_fraction} (files named in the log)')
