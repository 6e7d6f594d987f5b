"""Reused shared-memory batch buffers: a worker writes into a buffer again only once the main process has freed it."""
from __future__ import annotations

import gc
import os
import types

import pytest
import torch

import data.loader as loader_module
from data import build_loader
from data.datasets import LoadedSample
from data.loader import BatchBuffers, KeyedCollate
from test_data_common import data_config, jpeg_folder


@pytest.fixture
def as_worker_0(monkeypatch):
    """Runs the collate in this process as if it were loader worker 0 (shared memory, the pool's slots)."""
    monkeypatch.setattr(loader_module, 'get_worker_info', lambda: types.SimpleNamespace(id=0))


def _items(value: int, count: int = 2) -> list[LoadedSample]:
    return [LoadedSample(torch.full((3, 4, 4), value, dtype=torch.uint8), 0, [], i) for i in range(count)]


def _collate_in_worker(collate: KeyedCollate, buffers: BatchBuffers, value: int,
                       count: int = 2) -> tuple[torch.Tensor, int, int]:
    """``(batch as the main process sees it, its slot, the address of the worker's buffer)``: the main
    process maps the worker's shared memory anew, as torch's queues do between processes."""
    in_worker, *_, slot = collate(_items(value, count))
    fd, size = in_worker.untyped_storage()._share_fd_cpu_()
    received = torch.UntypedStorage._new_shared_fd_cpu(fd, size)
    batch = torch.empty(0, dtype=in_worker.dtype).set_(received).view(in_worker.shape)
    buffers.release_when_freed(batch, slot)
    return batch, slot, in_worker.untyped_storage().data_ptr()


def test_a_freed_batch_buffer_is_written_again_and_a_held_one_is_not(as_worker_0):
    buffers = BatchBuffers(workers=1, per_worker=2)
    collate = KeyedCollate(buffers=buffers)
    first, slot_a, address_a = _collate_in_worker(collate, buffers, 1)
    view = first[0]  # a view keeps the buffer taken after the batch itself is gone
    del first
    gc.collect()
    second, slot_b, _ = _collate_in_worker(collate, buffers, 2)
    assert (slot_a, slot_b) == (0, 1)
    third, slot_c, _ = _collate_in_worker(collate, buffers, 3)
    assert slot_c == -1  # both slots taken: fresh memory, nothing waits and nothing is overwritten
    assert (view == 1).all() and (second == 2).all() and (third == 3).all()
    del view
    gc.collect()
    fourth, slot_d, address_d = _collate_in_worker(collate, buffers, 4)
    assert (slot_d, address_d) == (0, address_a)  # the freed buffer itself, written again
    assert (fourth == 4).all() and (second == 2).all()


def test_a_free_slot_of_another_size_gets_a_new_buffer(as_worker_0):
    buffers = BatchBuffers(workers=1, per_worker=1)
    collate = KeyedCollate(buffers=buffers)
    full, slot, _ = _collate_in_worker(collate, buffers, 1)
    del full
    gc.collect()
    last, slot_last, _ = _collate_in_worker(collate, buffers, 5, count=1)  # an epoch's shorter last batch
    assert (slot, slot_last) == (0, 0) and last.shape == (1, 3, 4, 4) and (last == 5).all()


def test_batches_kept_by_the_loop_stay_intact_while_workers_reuse_buffers(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=8, val_per_class=1)
    config = data_config(root, **{'DATA.BATCH_SIZE': 2, 'AUG.AUTO_AUGMENT': 'none'})
    expected = list(build_loader(config)[2])  # no workers: no shared memory
    loader = build_loader(data_config(root, **{'DATA.BATCH_SIZE': 2, 'AUG.AUTO_AUGMENT': 'none',
                                               'DATA.NUM_WORKERS': 2}))[2]
    kept = {}
    for step, (images, targets) in enumerate(loader):
        assert torch.equal(images, expected[step][0])
        if step % 3 == 0:  # keep some, drop the rest (their buffers go back to the workers)
            kept[step] = images
        del images
    assert len(kept) >= 4 and all(torch.equal(images, expected[step][0]) for step, images in kept.items())


# torch 2.6 lets go of a batch's storage object later than the newer releases: its pool mostly falls back to fresh
# shared memory (slower, the same data) and, under the 'file_system' strategy, leaves the buffers in /dev/shm
# until the main process exits. Checked on 2.11 and 2.14.
_REUSES_BUFFERS = tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 11)
needs_buffer_reuse = pytest.mark.skipif(not _REUSES_BUFFERS, reason='torch before 2.11 does not give the buffers back')


@needs_buffer_reuse
def test_the_loader_hands_freed_buffers_back_to_its_workers(tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=8, val_per_class=1)
    loader = build_loader(data_config(root, **{'DATA.BATCH_SIZE': 2, 'DATA.NUM_WORKERS': 2}))[2]
    slots = []
    release = BatchBuffers.release_when_freed
    monkeypatch.setattr(BatchBuffers, 'release_when_freed',
                        lambda self, batch, slot: (slots.append(slot), release(self, batch, slot)))
    for _ in loader:
        pass
    assert len(slots) == len(loader) and -1 not in slots
    assert len(set(slots)) < len(slots)  # a slot taken again: its buffer came back from the main process


def _torch_shm_files() -> int:
    return sum(1 for name in os.listdir('/dev/shm') if name.startswith('torch_'))


@needs_buffer_reuse
@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='needs /dev/shm')
def test_workers_free_their_buffers_on_exit_under_the_file_system_sharing_strategy(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=8, val_per_class=1)
    loader = build_loader(data_config(root, **{'DATA.BATCH_SIZE': 2, 'DATA.NUM_WORKERS': 2}))[2]
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy('file_system')
    try:
        counts = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
            gc.collect()
            counts.append(_torch_shm_files())
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    assert counts[2] <= counts[0]  # nothing piles up in /dev/shm from epoch to epoch
