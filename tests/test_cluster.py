"""Runs as a cluster delivers failures, on 2 processes under torchrun with 2 loader workers each: SIGTERM to
every process of the job (launcher, ranks, loader workers) mid-epoch ends it with exit 0, and the same command
ends with the weights of an uninterrupted run (the job reads the images as WebDataset tar shards, the
uninterrupted run as a folder: shards train and resume exactly as the folder); a job stopped so and requeued on
1 process resumes and finishes; a worker killed with SIGKILL under ``--max-restarts 1`` is restarted with its
peer, both resume from the newest step checkpoint, and the run ends with the uninterrupted run's weights."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from cli import run_main, signal_whole_job, start_torchrun, torchrun, torchrun_workers, write_tiny_config
from conftest import write_image_folder

from tools.make_dataset import main as make_dataset

CONFIG = """\
MODEL:
  TYPE: swin
  NAME: cluster_test
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.1
  SWIN:
    PATCH_SIZE: 4
    EMBED_DIM: 16
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 4
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 2
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.25
  MIXUP: 0.8
  CUTMIX: 1.0
TRAIN:
  EPOCHS: 3
  WARMUP_EPOCHS: 1
  BASE_LR: 0.01
  SAVE_STEPS: 1
PRINT_FREQ: 1
"""


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    """Data and config of a 2-process job (48 images, batch 4 per process: 6 steps per epoch), and the final
    checkpoint of its uninterrupted run."""
    root = tmp_path_factory.mktemp('cluster')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=16, val_per_class=2)
    assert make_dataset(['--format', 'wds', '--shard-samples', '10', '--workers', '0', str(data), str(root / 'shards')]) == 0
    cfg = write_tiny_config(root, CONFIG)
    ref = torchrun(LAUNCH, _args(cfg, data, root / 'uninterrupted'), root)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return root, cfg, data, _final(root / 'uninterrupted' / 'cluster_test' / 'default')


LAUNCH = ['--standalone', '--nproc_per_node=2']


def _args(cfg: Path, data: Path, out: Path) -> list[str]:
    return ['--cfg', str(cfg), '--data-path', str(data), '--output', str(out)]


def _shard_args(cfg: Path, root: Path, out: Path) -> list[str]:
    """The same images as tar shards (no byte cache: the folder's sampler)."""
    return _args(cfg, root / 'shards', out) + ['--data-format', 'wds', '--cache-mode', 'no']


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / 'ckpt_epoch_2.pth', weights_only=True)


def _assert_same_weights(expected: dict, got: dict) -> None:
    for key, value in expected['model'].items():
        assert torch.equal(value, got['model'][key]), key
    for pid, state in expected['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, got['optimizer']['state'][pid][name]), (pid, name)


def _wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, 'timed out waiting for the run'
        time.sleep(0.05)


def _stop_mid_epoch(args: list[str], out: Path, root: Path) -> Path:
    """Start the 2-process job, SIGTERM every process of it in epoch 1: every rank ends by writing (rank 0) a step
    checkpoint and saying so. (torchrun itself, signalled, exits 1 with its SignalException whatever its workers
    did, so only the ranks' own logs tell.)"""
    run_dir = out / 'cluster_test' / 'default'
    proc = start_torchrun(LAUNCH, args, root, new_group=True)
    try:
        _wait_for(lambda: list(run_dir.glob('ckpt_epoch_1_step_*.pth')))
        signal_whole_job(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for rank in (0, 1):
        assert 'stopped by a signal after writing a checkpoint' in (run_dir / f'log_rank{rank}.txt').read_text(), \
            output[-4000:]
    assert 'Traceback' not in output.split('Received 15 death signal')[0]  # nothing failed before the stop
    # (on a loaded machine the run may be a few steps further on when the signal lands)
    assert list(run_dir.glob('ckpt_epoch_*_step_*.pth')) and not (run_dir / 'ckpt_epoch_2.pth').exists()
    return run_dir


def test_sigterm_to_every_process_of_a_2_process_job_on_shards_exits_0_and_the_same_command_ends_identical(job):
    root, cfg, _, expected = job
    out = root / 'stopped'
    run_dir = _stop_mid_epoch(_shard_args(cfg, root, out), out, root)
    again = torchrun(LAUNCH, _shard_args(cfg, root, out), root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _assert_same_weights(expected, _final(run_dir))


def test_a_job_stopped_on_2_processes_and_requeued_on_1_resumes_and_finishes(job):
    root, cfg, data, _ = job
    out = root / 'requeue'
    run_dir = _stop_mid_epoch(_args(cfg, data, out), out, root)
    requeued = run_main(_args(cfg, data, out), cwd=root)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'resuming a checkpoint of 2 processes on 1' in log
    assert (run_dir / 'ckpt_epoch_2.pth').exists() and not list(run_dir.glob('ckpt_epoch_*_step_*.pth'))


def test_a_worker_killed_under_max_restarts_is_restarted_and_the_run_ends_as_an_uninterrupted_one(job):
    root, cfg, data, expected = job
    out = root / 'elastic'
    run_dir = out / 'cluster_test' / 'default'
    proc = start_torchrun(LAUNCH + ['--max-restarts', '1'], _args(cfg, data, out), root, new_group=True)
    try:
        _wait_for(lambda: list(run_dir.glob('ckpt_epoch_1_step_*.pth')))
        os.kill(torchrun_workers(proc.pid)[1], signal.SIGKILL)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert re.search(r'Resuming from \S*ckpt_epoch_\d+_step_\d+\.pth', log), 'the restarted group resumes mid-epoch'
    _assert_same_weights(expected, _final(run_dir))
