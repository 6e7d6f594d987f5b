"""Launchers: torchrun on one machine, two loopback "nodes", and evaluation independent of world size."""
from __future__ import annotations

import argparse
import re

import torch

from cli import free_port, run_main, start_torchrun, torchrun, write_tiny_config
from conftest import write_image_folder
from config import get_config
from models import build_model


def _acc1(text: str) -> str:
    found = re.findall(r' \* Acc@1 ([\d.]+) Acc@5 ([\d.]+)', text)
    assert found, text[-3000:]
    return found[-1]


def test_torchrun_two_processes_trains_on_cpu(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    out = tmp_path / 'out'
    result = torchrun(['--standalone', '--nproc_per_node=2'],
                      ['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(out),
                       '--opts', 'TRAIN.EPOCHS', '1'], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run_dir = out / 'tiny_test' / 'default'
    assert (run_dir / 'ckpt_epoch_0.pth').is_file()
    assert (run_dir / 'log_rank0.txt').is_file() and (run_dir / 'log_rank1.txt').is_file()
    # 24 training images, batch 4 per process, 2 processes: 3 steps per epoch on each rank.
    assert 'Train: [0/1][2/3]' in (run_dir / 'log_rank1.txt').read_text()


def test_evaluation_counts_every_image_once_for_1_2_3_processes(tmp_path):
    # 11 validation images: neither 2 nor 3 divides it, so a padded sampler would count some twice.
    data = write_image_folder(tmp_path / 'data', num_classes=3, train_per_class=4, val_per_class=4)
    (next((data / 'val' / 'class_2').iterdir())).unlink()
    cfg = write_tiny_config(tmp_path)
    out = tmp_path / 'out'
    ckpt = tmp_path / 'weights.pth'
    torch.manual_seed(0)
    torch.save({'model': build_model(get_config(argparse.Namespace(cfg=str(cfg), opts=None))).state_dict()}, ckpt)
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(out), '--eval', '--resume', str(ckpt),
            '--tag', 'eval']
    single = run_main(args, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    results = {1: _acc1(single.stdout + single.stderr)}
    assert 'Accuracy of the network on the 11 test images' in single.stdout + single.stderr
    for n in (2, 3):
        multi = torchrun(['--standalone', f'--nproc_per_node={n}'], args, cwd=tmp_path)
        assert multi.returncode == 0, (multi.stdout + multi.stderr)[-3000:]
        results[n] = _acc1(multi.stdout + multi.stderr)
    assert results[1] == results[2] == results[3]


def test_two_nodes_on_loopback_both_finish(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    port = free_port()
    procs = []
    for node in range(2):
        launch = ['--nnodes=2', '--nproc_per_node=1', f'--node_rank={node}', '--rdzv_backend=c10d',
                  f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=swintest']
        args = ['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(tmp_path / f'out{node}'),
                '--opts', 'TRAIN.EPOCHS', '1']
        procs.append(start_torchrun(launch, args, cwd=tmp_path))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    # c10d rendezvous gives global rank 0 to whichever node it admits first, not to --node_rank 0
    written = [(tmp_path / f'out{n}' / 'tiny_test' / 'default' / 'ckpt_epoch_0.pth').is_file() for n in range(2)]
    assert sorted(written) == [False, True], written
