"""Which indices each rank loads, in which order, and the seeds that make augmentation reproducible.

Training samplers are re-shuffled per epoch from ``(seed, epoch)`` alone, through their own
``torch.Generator``, so nothing depends on what ran earlier in the process. Every rank gets the same
number of samples (DDP needs equal step counts). Validation is sharded without padding, so every
image is evaluated exactly once whatever the world size.

Augmentation randomness is seeded per sample: the batch sampler pairs each index with a seed mixed
from ``(seed, epoch, rank, position in the epoch)``. A sample's crops therefore do not depend on the
number of workers or on which worker loaded it, and an epoch resumed at step k reproduces the
batches of an uninterrupted run. Workers are seeded from ``(seed, epoch, rank, worker id)`` as well,
for any randomness outside our per-sample scope.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import random
import signal
import sys
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a few integers (splitmix64 steps over the values)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators (timm and torchvision ops draw from all three).

    ``torch.default_generator`` rather than ``torch.manual_seed``: the latter would also reseed CUDA.
    """
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)


@contextmanager
def seeded_rngs(seed: int):
    """Run a block under ``seed_all(seed)``.

    In a loader worker the global generators belong to the data pipeline and are simply reseeded.
    In the main process (``num_workers=0``) they belong to training (dropout, mixup), so their state
    is saved and restored around the block: loading data does not shift the training's random stream.
    """
    saved = None
    if get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_all(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


# A scheduler stops a job by signalling every process of it, loader workers included (SLURM's scancel and time
# limit, Kubernetes, a Ctrl-C in the terminal): the workers leave these to the main process, which stops after
# a step and writes a checkpoint; a worker dying of one would end the run with a DataLoader error instead.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL the moment its parent dies. A worker ignores the stop signals, and one
    left behind by a SIGKILLed main process would keep that process's sockets open (inherited at fork) until
    PyTorch's watchdog noticed, seconds later: its peers would not see the rank die, and a restarted job could
    not connect. Elsewhere a no-op."""
    if sys.platform.startswith('linux'):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


class WorkerSeeder:
    """``worker_init_fn``: seeds each worker from ``(seed, epoch, rank, worker id)``, makes it ignore the stop
    signals (:data:`STOP_SIGNALS`) and die with its main process."""

    def __init__(self, seed: int, epoch: int, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, worker_id: int) -> None:
        _die_with_parent()
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        seed_all(mix_seed(self.seed, self.epoch, self.rank, worker_id))


def _permutation(n: int, seed: int) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


class DistributedShuffleSampler(Sampler[int]):
    """Every rank draws ``ceil(n / world)`` indices from one shared per-epoch permutation.

    Like ``torch.utils.data.DistributedSampler`` (the permutation is padded by wrapping around),
    but the dataset size is read lazily, so building a loader never forces listing the files.
    """

    def __init__(self, size_fn, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.size_fn, self.rank, self.world_size = size_fn, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size_fn() / self.world_size)

    def _order(self) -> list[int]:
        n = self.size_fn()
        return _permutation(n, mix_seed(self.seed, self.epoch)) if self.shuffle else list(range(n))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = len(self) * self.world_size
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return iter(order[self.rank:total:self.world_size])


class RepeatedAugSampler(DistributedShuffleSampler):
    """DeiT-style repeated augmentation: each drawn image appears ``repeats`` times per epoch.

    The copies of an image are consecutive in the shared order and dealt round-robin, so they land on
    different ranks (when ``repeats <= world_size``) with different augmentations. An epoch keeps the
    number of steps of a plain epoch (``ceil(n / world)`` samples per rank): it covers about
    ``n / repeats`` distinct images, so the learning-rate schedule is unchanged.
    """

    def __init__(self, size_fn, rank: int = 0, world_size: int = 1, seed: int = 0, repeats: int = 3):
        super().__init__(size_fn, rank, world_size, seed, shuffle=True)
        self.repeats = repeats

    def _order(self) -> list[int]:
        return [i for i in super()._order() for _ in range(self.repeats)]


class ShardShuffleSampler(Sampler[int]):
    """Shuffles only this rank's own indices (zip ``part`` cache: the rank holds just those bytes).

    Shards differ in size by one when ``n % world != 0``; each is padded (wrapping around) to a
    common ``num_samples`` so that every rank runs the same number of steps.
    """

    def __init__(self, indices: Sequence[int], num_samples: int, seed: int = 0, rank: int = 0):
        self.indices, self.num_samples = list(indices), num_samples
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = [self.indices[i] for i in _permutation(len(self.indices), mix_seed(self.seed, self.epoch, self.rank))]
        order = order * math.ceil(self.num_samples / max(len(order), 1))
        return iter(order[:self.num_samples])


class ValShardSampler(Sampler[int]):
    """Rank r evaluates indices r, r + world, r + 2 * world, ... : no padding, no duplicates.

    Strided rather than contiguous so that the zip ``part`` cache (which also keeps ``i % world == r``)
    holds exactly the images its rank evaluates. ``shuffle`` only permutes the order within a shard.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0):
        self.indices = list(range(rank, size, world_size))
        if shuffle:
            self.indices = [self.indices[i] for i in _permutation(len(self.indices), mix_seed(seed, rank))]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SampleKey(NamedTuple):
    """What our batch sampler hands the dataset: the index and the seed for that sample's randomness."""
    index: int
    seed: int


class SeededBatchSampler(Sampler[list]):
    """Groups a sampler's indices into batches of :class:`SampleKey`, optionally skipping a prefix.

    ``set_epoch(epoch, start_step)`` reseeds the index sampler and makes the next pass skip the first
    ``start_step`` batches without loading them; keys keep their absolute position, so the batches
    that follow are those an uninterrupted epoch would have produced. ``len`` is the full epoch.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, seed: int = 0, rank: int = 0):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.seed, self.rank, self.epoch, self.start_step = seed, rank, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list]:
        skip = self.start_step * self.batch_size
        batch: list[SampleKey] = []
        for position, index in enumerate(self.sampler):
            if position < skip:
                continue
            batch.append(SampleKey(index, mix_seed(self.seed, self.epoch, self.rank, position)))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

