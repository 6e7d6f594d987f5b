"""Shared test fixtures: tiny image folders written on the fly (no downloads)."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# Processes the tests start with multiprocessing (cli.fork_ranks, the benchmarks' workers) fork from a server that
# imported these once: a spawned process imports torch again (seconds each), and forking the test process itself is
# unsafe once it has run autograd or OpenMP.
multiprocessing.set_forkserver_preload(['torch', 'torch.distributed', 'timm'])

# Under pytest-xdist every core already runs a test worker: one torch (OpenMP) thread each, and in the processes
# they start. OpenMP threads spin while they wait for each other, so two workers' two-thread pools on two cores made
# in-process model tests 10 to 40 times slower than alone.
if os.environ.get('PYTEST_XDIST_WORKER'):
    import torch
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)


# The files that take longest (seconds of one worker, idle 2-core machine), slowest first. `make test` runs the
# files in this order and the rest after them, most tests first: a slow file handed out last would leave the
# other worker idle at the end (xdist gives a worker its next file when it is almost done with its current one).
SLOWEST_FILES = ('test_benchmarks_gpu_check.py', 'test_main_sharding.py', 'test_peers.py', 'test_cluster.py',
                 'test_main_moe.py', 'test_multilabel.py', 'test_resume.py', 'test_main_train.py',
                 'test_main_distributed.py')


def pytest_collection_modifyitems(items: list) -> None:
    """Slowest files first (:data:`SLOWEST_FILES`), then the others by their number of tests; a file's tests
    keep their order. Every xdist worker sorts its collection the same way, as xdist requires."""
    counts: dict = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def rank(name: str) -> tuple:
        slow = SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
        return slow, -counts[name], name
    order = {name: i for i, name in enumerate(sorted(counts, key=rank))}
    items.sort(key=lambda item: order[item.path.name])  # stable: the order inside a file stays


def _fsdp_runs_on_cpu() -> bool:
    from utils.sharding import fsdp_runs_on_cpu
    return fsdp_runs_on_cpu()


# FSDP2 runs on CPU tensors from torch 2.7 on (main.py refuses it on 2.6 with one line, tested in test_main_errors)
needs_cpu_fsdp = pytest.mark.skipif(not _fsdp_runs_on_cpu(), reason='FSDP2 on the CPU needs torch 2.7 or newer')


def write_image_folder(root: str | os.PathLike, num_classes: int = 3, train_per_class: int = 8,
                       val_per_class: int = 4, size: int = 32, seed: int = 0, ext: str = 'png') -> Path:
    """Write root/train/<class>/* and root/val/<class>/*: each class a distinct colour plus noise."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            base[(c // 3) % 3] += 55
            for i in range(count):
                noise = rng.normal(0, 25, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{split}_{c}_{i}.{ext}')
    return root


def write_image_folder_with_val(root: str | os.PathLike, num_val: int, num_classes: int = 3,
                                train_per_class: int = 8) -> Path:
    """:func:`write_image_folder` with exactly ``num_val`` validation images (the last classes one image short
    where ``num_val`` is not a multiple of ``num_classes``), for set sizes that do not split evenly over ranks.
    The same ``root`` arguments give the same training images whatever ``num_val``."""
    per_class = -(-num_val // num_classes)
    root = write_image_folder(root, num_classes, train_per_class, per_class)
    for c in range(num_classes - (per_class * num_classes - num_val), num_classes):
        (root / 'val' / f'class_{c}' / f'val_{c}_{per_class - 1}.png').unlink()
    return root


@pytest.fixture
def one_torch_thread():
    """In-process training tests: one torch thread is faster than two threads fighting over busy cores."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / 'data')
