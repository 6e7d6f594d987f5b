"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and restarted ends bit-identical."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli import run_main, start_main, write_tiny_config
from conftest import write_image_folder

# The official recipe's random parts on: RandAugment, mixup/cutmix, random erasing, drop path.
RECIPE = """\
MODEL:
  TYPE: swin
  NAME: resume_test
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.2
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
  AUTO_AUGMENT: rand-m9-mstd0.5-inc1
  REPROB: 0.25
  MIXUP: 0.8
  CUTMIX: 1.0
TRAIN:
  EPOCHS: 3
  WARMUP_EPOCHS: 1
  BASE_LR: 0.01
PRINT_FREQ: 1
"""


def _args(cfg: Path, data: Path, out: Path) -> list[str]:
    return ['--cfg', str(cfg), '--data-path', str(data), '--output', str(out)]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f'run ended before the event: {proc.stderr.read()[-2000:]}'
        assert time.time() < deadline, 'timed out waiting for the run'
        time.sleep(0.05)


def _final_state(out: Path) -> dict:
    return torch.load(out / 'resume_test' / 'default' / 'ckpt_epoch_2.pth', weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    for pid, state in a['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, b['optimizer']['state'][pid][name]), (pid, name)
    assert a['max_accuracy'] == b['max_accuracy']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run of the recipe: its data, config and final checkpoint."""
    root = tmp_path_factory.mktemp('resume')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=8, val_per_class=3)
    cfg = write_tiny_config(root, RECIPE)
    result = run_main(_args(cfg, data, root / 'ref'), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, cfg, data, _final_state(root / 'ref')


def test_sigkill_after_a_checkpoint_then_restart_ends_bit_identical(reference):
    root, cfg, data, expected = reference
    out = root / 'killed'
    args = _args(cfg, data, out)
    proc = start_main(args, root)
    _wait_for(lambda: (out / 'resume_test' / 'default' / 'ckpt_epoch_0.pth').exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / 'resume_test' / 'default' / 'ckpt_epoch_2.pth').exists()
    restarted = run_main(args, cwd=root)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    _assert_identical(expected, _final_state(out))


def test_sigterm_mid_epoch_writes_a_step_checkpoint_exits_0_and_resumes_bit_identical(reference):
    root, cfg, data, expected = reference
    out = root / 'stopped'
    run_dir = out / 'resume_test' / 'default'
    args = _args(cfg, data, out)
    proc = start_main(args, root)
    _wait_for(lambda: (run_dir / 'log_rank0.txt').exists() and 'Train: [1/3][2/6]' in
              (run_dir / 'log_rank0.txt').read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    step_files = list(run_dir.glob('ckpt_epoch_*_step_*.pth'))
    assert step_files, sorted(p.name for p in run_dir.iterdir())
    restarted = run_main(args, cwd=root)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    _assert_identical(expected, _final_state(out))
    assert not list(run_dir.glob('ckpt_epoch_*_step_*.pth')), 'step checkpoints are superseded'


def test_sigterm_to_the_whole_process_group_with_loader_workers_exits_0_and_resumes_bit_identical(reference):
    """As SLURM's scancel or time limit deliver it: every process of the job, the 2 loader workers included."""
    root, cfg, data, expected = reference
    out = root / 'group'
    run_dir = out / 'resume_test' / 'default'
    args = _args(cfg, data, out)
    proc = start_main(args, root, new_group=True)
    _wait_for(lambda: (run_dir / 'log_rank0.txt').exists() and 'Train: [1/3][2/6]' in
              (run_dir / 'log_rank0.txt').read_text(), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    # (on a loaded machine the run may be a few steps further on when the signal lands)
    assert list(run_dir.glob('ckpt_epoch_*_step_*.pth')), sorted(p.name for p in run_dir.iterdir())
    restarted = run_main(args, cwd=root)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    _assert_identical(expected, _final_state(out))


def test_save_steps_keeps_one_step_checkpoint_and_a_sigkill_after_it_loses_nothing(reference):
    """A node that dies without warning: TRAIN.SAVE_STEPS 2 writes mid-epoch checkpoints (at batches 2 and 4 of
    every 6-batch epoch), each replacing the one before; a restart resumes from the newest."""
    root, cfg, data, expected = reference
    out = root / 'save_steps'
    run_dir = out / 'resume_test' / 'default'
    args = _args(cfg, data, out) + ['--opts', 'TRAIN.SAVE_STEPS', '2']
    proc = start_main(args, root, new_group=True)
    _wait_for(lambda: list(run_dir.glob('ckpt_epoch_1_step_*.pth')), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # two only when the kill fell between writing the new one and removing the one before
    step_files = [p.name for p in run_dir.glob('ckpt_epoch_*_step_*.pth')]
    assert 1 <= len(step_files) <= 2 and not (run_dir / 'ckpt_epoch_2.pth').exists(), step_files
    restarted = run_main(args, cwd=root)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    _assert_identical(expected, _final_state(out))
