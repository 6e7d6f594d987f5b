"""Runs as a cluster delivers failures, on 2 processes under torchrun: a job stopped by SIGTERM to its whole
process group (launcher, ranks, loader workers) and requeued on 1 process resumes from its step checkpoint and
finishes; a worker killed with SIGKILL under ``--max-restarts 1`` is restarted with its peer, both resume from
the newest step checkpoint, and the run ends with the weights of an uninterrupted one."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from cli import run_main, start_torchrun, torchrun, write_tiny_config
from conftest import write_image_folder

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
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.01
  SAVE_STEPS: 1
PRINT_FREQ: 1
"""


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    """Data and config of a 2-process job (48 images, batch 4 per process: 6 steps per epoch)."""
    root = tmp_path_factory.mktemp('cluster')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=16, val_per_class=2)
    cfg = write_tiny_config(root, CONFIG)
    return root, cfg, data


def _args(cfg: Path, data: Path, out: Path) -> list[str]:
    return ['--cfg', str(cfg), '--data-path', str(data), '--output', str(out)]


def _wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, 'timed out waiting for the run'
        time.sleep(0.05)


def test_a_job_stopped_on_2_processes_and_requeued_on_1_resumes_and_finishes(job):
    root, cfg, data = job
    out = root / 'requeue'
    run_dir = out / 'cluster_test' / 'default'
    proc = start_torchrun(['--standalone', '--nproc_per_node=2'], _args(cfg, data, out), root, new_group=True)
    _wait_for(lambda: list(run_dir.glob('ckpt_epoch_1_step_*.pth')))
    os.killpg(proc.pid, signal.SIGTERM)  # the scheduler ends the job: the launcher, both ranks, their workers
    proc.communicate(timeout=120)
    step_files = list(run_dir.glob('ckpt_epoch_1_step_*.pth'))
    assert step_files and not (run_dir / 'ckpt_epoch_1.pth').exists()
    requeued = run_main(_args(cfg, data, out), cwd=root)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'resuming a checkpoint of 2 processes on 1' in log
    assert (run_dir / 'ckpt_epoch_1.pth').exists() and not list(run_dir.glob('ckpt_epoch_1_step_*.pth'))


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK ``rank``."""
    children = Path(f'/proc/{launcher_pid}/task/{launcher_pid}/children').read_text().split()
    for pid in children:
        with contextlib.suppress(OSError):
            if f'RANK={rank}'.encode() in Path(f'/proc/{pid}/environ').read_bytes().split(b'\0'):
                return int(pid)
    raise AssertionError(f'no worker of rank {rank} among {children}')


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)


def test_a_worker_killed_under_max_restarts_is_restarted_and_the_run_ends_as_an_uninterrupted_one(job):
    root, cfg, data = job
    launch = ['--standalone', '--nproc_per_node=2']
    ref = torchrun(launch, _args(cfg, data, root / 'uninterrupted'), root)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    out = root / 'elastic'
    run_dir = out / 'cluster_test' / 'default'
    proc = start_torchrun(launch + ['--max-restarts', '1'], _args(cfg, data, out), root, new_group=True)
    try:
        _wait_for(lambda: list(run_dir.glob('ckpt_epoch_1_step_*.pth')))
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGKILL)
        output = proc.communicate(timeout=300)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, output[-4000:]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert re.search(r'Resuming from \S*ckpt_epoch_1_step_\d+\.pth', log), 'the restarted group resumes mid-epoch'
    expected, got = _weights(root / 'uninterrupted' / 'cluster_test' / 'default'), _weights(run_dir)
    for key, value in expected['model'].items():
        assert torch.equal(value, got['model'][key]), key
    for pid, state in expected['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, got['optimizer']['state'][pid][name]), (pid, name)
