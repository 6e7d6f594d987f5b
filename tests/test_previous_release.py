"""Checkpoints written by the previous release resume here: a single-file checkpoint, a sharded ``.dcp`` folder
(FSDP, TRAIN.SHARDED_CKPT) and Swin-MoE's per-rank files, each saved after epoch 0 of a 2-epoch run by that
release's own code (tests/previous_release/, how they were made in its expected.json). Put in an output folder as
a requeued job finds them, the same command continues: the loaded weights give the release's validation after
epoch 0, and the resumed epoch 1 ends at the release's own validation after epoch 1 (to 1e-5 on the torch that
wrote them, where resuming gives its epoch-1 weights bit for bit; within 1 % on other torch releases, whose
kernels differ)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from cli import run_main, torchrun
from conftest import needs_cpu_fsdp, write_image_folder

RELEASE = Path(__file__).resolve().parent / 'previous_release'
WRITTEN = json.loads((RELEASE / 'expected.json').read_text())
EXPECTED = WRITTEN['runs']
# Another torch release loads the same weights (the first validation, exactly) but trains with its own kernels
SAME_TORCH = torch.__version__.startswith(WRITTEN['torch'] + '.')
# (files, model name, config, script, processes, extra options)
RUNS = {'plain': (['ckpt_epoch_0.pth'], 'tiny_test', 'tiny.yaml', 'main.py', 1, []),
        'fsdp': (['ckpt_epoch_0.dcp'], 'tiny_test', 'tiny.yaml', 'main.py', 2,
                 ['TRAIN.SHARDING', 'fsdp', 'TRAIN.SHARDED_CKPT', 'True']),
        'moe': (['ckpt_epoch_0.pth.rank0', 'ckpt_epoch_0.pth.rank1'], 'moe_test', 'moe.yaml', 'main_moe.py', 2, [])}
VALIDATION = re.compile(r'\* Acc@1 ([\d.]+) Acc@5 [\d.]+\n.*validation over \d+ images: mean loss ([\d.]+)')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('release') / 'data', num_classes=3, train_per_class=8,
                              val_per_class=4)


@pytest.mark.parametrize('layout', [pytest.param('plain'), pytest.param('fsdp', marks=needs_cpu_fsdp),
                                    pytest.param('moe')])
def test_the_previous_releases_checkpoint_after_epoch_0_resumes_to_its_own_epoch_1(tmp_path, data, layout):
    files, name, config, script, processes, extra = RUNS[layout]
    folder = tmp_path / 'out' / name / layout
    folder.mkdir(parents=True)
    for file in files:
        copy = shutil.copytree if (RELEASE / layout / file).is_dir() else shutil.copy
        copy(RELEASE / layout / file, folder / file)
    args = ['--cfg', str(RELEASE / config), '--data-path', str(data), '--output', str(tmp_path / 'out'),
            '--tag', layout, '--disable_amp', '--opts', 'TRAIN.EPOCHS', '2', *extra]
    if processes == 1:
        result = run_main(args, cwd=tmp_path, script=script)
    else:
        result = torchrun(['--standalone', f'--nproc_per_node={processes}'], args, cwd=tmp_path, script=script)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = (folder / 'log_rank0.txt').read_text()
    assert 'Train: [1/2]' in log and 'Train: [0/2]' not in log  # epoch 0 came from the release's file
    (loaded, trained) = [(float(acc), float(loss)) for acc, loss in VALIDATION.findall(log)]
    (loaded_then, trained_then) = EXPECTED[layout]['validation']
    assert loaded == pytest.approx(tuple(loaded_then), abs=1e-5)
    assert trained == pytest.approx(tuple(trained_then), abs=1e-5 if SAME_TORCH else 1e-2)
