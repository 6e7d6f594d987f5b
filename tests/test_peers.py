"""One rank's failure ends every rank promptly with that rank's message (utils/peers.py), for ranks started
without an agent that would notice (srun starts each rank on its own): a UserError on rank 1 (its share of
unreadable images), and a rank that stops answering (SIGSTOP) or dies (SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli import start_ranks, write_tiny_config
from config import get_default_config, merge_yaml
from conftest import write_image_folder
from data.build import build_dataset, build_train_sampler

CONFIG = """\
MODEL:
  TYPE: swin
  NAME: peers_test
  NUM_CLASSES: 3
  SWIN:
    PATCH_SIZE: 4
    EMBED_DIM: 16
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 4
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 2
  NUM_WORKERS: 0
  MAX_BAD_FRACTION: 0.2
AUG:
  AUTO_AUGMENT: none
  MIXUP: 0.0
  CUTMIX: 0.0
TRAIN:
  EPOCHS: 30
  WARMUP_EPOCHS: 0
PRINT_FREQ: 1
PEER_TIMEOUT: 6
"""
BOUND = 6 + 10  # PEER_TIMEOUT plus a start-up and reporting margin on a loaded 2-core machine


@pytest.fixture
def job(tmp_path):
    data = write_image_folder(tmp_path / 'data', num_classes=3, train_per_class=8, val_per_class=1)
    cfg = write_tiny_config(tmp_path, CONFIG)
    return tmp_path, cfg, data


def _args(root: Path, cfg: Path, data: Path) -> list[str]:
    return ['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'out')]


def _break_images_of_rank_1(cfg: Path, data: Path) -> None:
    """Corrupt half of the images rank 1 of 2 reads in epoch 0 (none that rank 0 reads)."""
    config = get_default_config()
    merge_yaml(config, str(cfg))
    config.DATA.DATA_PATH = str(data)
    dataset, _ = build_dataset(True, config)
    own = [list(build_train_sampler(config, dataset, rank, 2)) for rank in (0, 1)]
    for index in [i for i in own[1] if i not in own[0]][::2]:
        Path(dataset.samples[index][0]).write_bytes(b'not an image')


def _training_started(root: Path) -> bool:
    log = root / 'out' / 'peers_test' / 'default' / 'log_rank1.txt'
    return log.exists() and 'Train: [0/' in log.read_text()


def test_a_user_error_on_rank_1_ends_rank_0_with_its_message(job):
    root, cfg, data = job
    _break_images_of_rank_1(cfg, data)
    procs = start_ranks(_args(root, cfg, data), root, world_size=2)
    try:
        rank1_err = procs[1].communicate(timeout=240)[1]
        failed_at = time.time()
        rank0_err = procs[0].communicate(timeout=BOUND)[1]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 2 and 'DATA.MAX_BAD_FRACTION' in rank1_err
    assert procs[0].returncode == 2, rank0_err[-2000:]
    assert time.time() - failed_at < BOUND
    last = rank0_err.strip().splitlines()[-1]
    assert last.startswith('error: rank 1 failed: ') and 'DATA.MAX_BAD_FRACTION' in last
    assert 'Traceback' not in rank0_err


@pytest.mark.parametrize('sig', [signal.SIGSTOP, signal.SIGKILL])
def test_a_rank_that_stops_answering_or_dies_ends_the_other_within_the_timeout(job, sig):
    root, cfg, data = job
    procs = start_ranks(_args(root, cfg, data), root, world_size=2, warm=sig != signal.SIGSTOP)
    try:
        deadline = time.time() + 240
        while not _training_started(root):
            assert time.time() < deadline and procs[0].poll() is None, 'training did not start'
            time.sleep(0.1)
        os.kill(procs[1].pid, sig)
        stopped_at = time.time()
        rank0_err = procs[0].communicate(timeout=BOUND)[1]
        assert time.time() - stopped_at < BOUND
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1
    assert 'a peer process stopped answering' in rank0_err.strip().splitlines()[-1]
    assert 'Traceback' not in rank0_err
