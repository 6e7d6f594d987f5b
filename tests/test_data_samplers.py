"""Samplers and seeding: reproducible epochs, exact resume, exact validation shards, equal steps per rank."""
from __future__ import annotations

import random

import pytest
import torch

from data import build_loader
from data.samplers import (DistributedShuffleSampler, RepeatedAugSampler, ValShardSampler, WorkerSeeder)
from test_data_common import data_config, jpeg_folder
from utils.errors import UserError


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return jpeg_folder(tmp_path_factory.mktemp('seeding'), num_classes=3, train_per_class=4, val_per_class=1)


def _epoch(root, epoch: int, workers: int, start_step: int = 0, **overrides) -> list:
    loader = build_loader(data_config(root, **{'DATA.NUM_WORKERS': workers, **overrides}))[2]
    loader.set_epoch(epoch, start_step)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_same_seed_and_epoch_give_the_same_batches_whatever_ran_before_or_the_worker_count(root):
    first = _epoch(root, 1, workers=2)
    random.random(), torch.rand(3)  # the process's own random streams moved on: no effect
    assert _same(first, _epoch(root, 1, workers=2))
    assert _same(first, _epoch(root, 1, workers=0))  # seeds are per sample, not per worker
    assert not _same(first, _epoch(root, 2, workers=2))
    assert not _same(first, _epoch(root, 1, workers=0, SEED=5))


def test_start_step_skips_batches_and_reproduces_the_rest_of_the_epoch(root):
    full = _epoch(root, 3, workers=0)
    assert _same(full[1:], _epoch(root, 3, workers=0, start_step=1))


def test_loading_in_the_main_process_leaves_its_random_state_alone(root):
    torch.manual_seed(123)
    random.seed(123)
    before = torch.get_rng_state(), random.getstate()
    _epoch(root, 0, workers=0)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_worker_seeds_depend_on_seed_epoch_rank_and_worker_only():
    def draw(*args):
        WorkerSeeder(*args[:3])(args[3])
        return random.random(), torch.rand(1).item()
    assert draw(0, 1, 0, 0) == draw(0, 1, 0, 0)
    assert len({draw(0, 1, 0, 0), draw(0, 1, 0, 1), draw(0, 1, 1, 0), draw(0, 2, 0, 0), draw(1, 1, 0, 0)}) == 5


@pytest.mark.parametrize('world', [1, 2, 3])
@pytest.mark.parametrize('size', [7, 9, 10])
def test_validation_shards_cover_every_index_exactly_once(world, size):
    shards = [list(ValShardSampler(size, rank, world, shuffle=rank == 1, seed=4)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))


def test_training_sampler_gives_every_rank_the_same_count_and_reshuffles_per_epoch():
    samplers = [DistributedShuffleSampler(lambda: 10, rank, 3, seed=0) for rank in range(3)]
    orders = []
    for epoch in (0, 0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        orders.append([list(s) for s in samplers])
    assert [len(o) for o in orders[0]] == [4, 4, 4]
    assert set(sum(orders[0], [])) == set(range(10))
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_repeated_augmentation_sends_the_copies_of_an_image_to_different_ranks():
    shards = [list(RepeatedAugSampler(lambda: 12, rank, 3, seed=0, repeats=3)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # same steps per epoch as without repetition
    assert shards[0] == shards[1] == shards[2]  # 3 copies dealt round-robin over 3 ranks


def test_repeated_augmentation_is_configurable_and_checked(root):
    loader = build_loader(data_config(root, **{'AUG.REPEATED_AUG': 2}))[2]
    assert isinstance(loader.sampler, RepeatedAugSampler) and loader.sampler.repeats == 2
    with pytest.raises(UserError, match='REPEATED_AUG'):
        build_loader(data_config(root, **{'AUG.REPEATED_AUG': 1}))


def test_official_style_sampler_set_epoch_reseeds_the_whole_loader(root):
    loader = build_loader(data_config(root))[2]
    loader.sampler.set_epoch(2)
    assert _same(list(loader), _epoch(root, 2, workers=0))


def test_batches_finished_on_arrival_equal_batches_finished_in_the_workers(root):
    """``finish_on`` (set to the GPU by main.py) moves normalisation and erasing out of the workers:
    the same numbers, only computed elsewhere (here on the CPU, the device these tests have)."""
    runs, calls_here = {}, {}
    for finish_on in (None, torch.device('cpu')):
        loader = build_loader(data_config(root, **{'DATA.NUM_WORKERS': 1}))[2]
        calls, finish = [], loader.finish
        loader.finish = lambda images, seed, out=None: calls.append(images[0].dtype) or finish(images, seed, out)
        loader.finish_on = finish_on
        loader.set_epoch(1)
        runs[finish_on], calls_here[finish_on] = list(loader), calls
    assert _same(runs[None], runs[torch.device('cpu')]) and runs[None][0][0].dtype == torch.float32
    assert calls_here[None] == []  # finished in the worker process
    assert calls_here[torch.device('cpu')] == [torch.uint8] * len(runs[None])  # uint8 batches, finished here
