"""The iterable the engine loops over: one epoch of ``(samples, targets)`` per pass.

:class:`EpochLoader` wraps a ``torch.utils.data.DataLoader`` built afresh for every epoch from a
:class:`~data.samplers.SeededBatchSampler`, with workers seeded from ``(seed, epoch, rank, worker)``.
It also

* finishes the uint8 images of the fast path into a normalised float batch (plus random erasing
  once per batch) inside the workers, in parallel and off the training loop's critical path, written
  straight into shared memory so that handing the batch to the main process copies nothing; or,
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
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, get_worker_info

from utils.errors import UserError

from .datasets import ImageListDataset, LoadedSample, UnreadableDataError
from .samplers import SeededBatchSampler, WorkerSeeder, mix_seed
from .transforms import BatchNormalize

_logger = logging.getLogger(__name__)


class KeyedCollate:
    """Stacks :class:`LoadedSample` items into ``(images, targets, bad, seed)``, finishing uint8
    batches when given ``finish``; ``seed`` (from the batch's first key, so fixed by (seed, epoch,
    rank, position)) drives the batch's random erasing wherever the batch is finished."""

    def __init__(self, finish: Optional[BatchNormalize] = None):
        self.finish = finish

    def __call__(self, items: Sequence[LoadedSample]):
        images = [item.image for item in items]
        targets = torch.tensor([item.target for item in items], dtype=torch.int64)
        bad = [entry for item in items for entry in item.bad]
        seed = mix_seed(items[0].seed, 0xE2A5E)
        out = _empty_batch((len(images), *images[0].shape), torch.float32 if self.finish else images[0].dtype)
        if self.finish is not None:
            self.finish(images, seed, out=out)
        else:
            torch.stack(images, out=out)
        return out, targets, bad, seed


def _empty_batch(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch, in shared memory when built in a worker (as torch's default collate does):
    sending it to the main process then moves no data."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


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

    def _dataloader(self) -> DataLoader:
        generator = torch.Generator()  # base seed of the workers, kept off the global generator
        generator.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.num_workers,
                          collate_fn=KeyedCollate(None if self.finish_on else self.finish),
                          pin_memory=self.pin_memory,
                          worker_init_fn=WorkerSeeder(self.seed, self.epoch, self.rank), generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler_epoch = getattr(self.sampler, 'epoch', self.epoch)
        if sampler_epoch != self.epoch:  # official-style code calls loader.sampler.set_epoch(epoch)
            self.set_epoch(sampler_epoch)
        self._epoch_bad = 0
        try:
            for images, targets, bad, seed in self._dataloader():
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
