"""summary.csv: one row per epoch with the epoch's figures; a resume replaces the epochs it redoes."""
from __future__ import annotations

import re

import pytest
import torch

from cli import run_main, write_tiny_config
from utils.summary import COLUMNS, read_summary, write_summary_row


def test_a_row_per_epoch_and_a_redone_epoch_replaces_its_row_and_later_ones(tmp_path):
    for epoch in range(4):
        write_summary_row(str(tmp_path), {'epoch': epoch, 'train_loss': 1.0 / (epoch + 1)})
    write_summary_row(str(tmp_path), {'epoch': 2, 'train_loss': 0.25, 'val_acc1': 71.5})  # resumed from epoch 1
    rows = read_summary(str(tmp_path / 'summary.csv'))
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert rows[2]['train_loss'] == '0.25' and rows[2]['val_acc1'] == '71.5' and rows[2]['ema_acc1'] == ''
    assert tuple(rows[0]) == COLUMNS


def test_main_writes_the_summary_and_a_resume_keeps_one_row_per_epoch(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    common = ['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(tmp_path / 'out'), '--opts',
              'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.5', 'TRAIN.BEST_METRIC', 'ema_acc1']
    first = run_main([*common, 'TRAIN.EPOCHS', '2'], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / 'out' / 'tiny_test' / 'default'
    (out / 'ckpt_epoch_1.pth').unlink()  # the newest checkpoint lost: epoch 1 is trained again
    resumed = run_main([*common, 'TRAIN.EPOCHS', '3'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_summary(str(out / 'summary.csv'))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    log = (out / 'log_rank0.txt').read_text().split('Resuming from')[-1]
    accs = [float(a) for a in re.findall(r' \* Acc@1 ([\d.]+)', log)]
    ema_accs = [float(a) for a in re.findall(r' \* EMA Acc@1 ([\d.]+)', log)]
    # after the resume: the checkpoint's re-validation, then epochs 1 and 2
    assert [float(r['val_acc1']) for r in rows[1:]] == pytest.approx(accs[1:], abs=1e-3)
    assert [float(r['ema_acc1']) for r in rows[1:]] == pytest.approx(ema_accs, abs=1e-3)
    assert all(float(r['lr']) > 0 and float(r['train_loss']) > 0 and float(r['images_per_second']) > 0
               and float(r['val_loss']) > 0 for r in rows)
    best = torch.load(out / 'model_best.pth', weights_only=True)
    every_ema = [float(r['ema_acc1']) for r in rows]
    assert best['max_accuracy'] == pytest.approx(max(every_ema), abs=1e-3)
    assert every_ema[best['epoch']] == pytest.approx(max(every_ema), abs=1e-3)
