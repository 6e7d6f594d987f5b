"""`python main.py` trains, checkpoints, logs, resumes, evaluates and times like the official script."""
from __future__ import annotations

import re

import torch

from cli import run_main, write_tiny_config


def _train(tmp_path, image_folder, *extra):
    cfg = write_tiny_config(tmp_path)
    result = run_main(['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(tmp_path / 'out'),
                       *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, tmp_path / 'out' / 'tiny_test' / 'default'


def test_training_writes_checkpoints_logs_config_and_tensorboard(tmp_path, image_folder):
    result, out = _train(tmp_path, image_folder)
    assert (out / 'ckpt_epoch_0.pth').is_file() and (out / 'ckpt_epoch_1.pth').is_file()
    assert (out / 'log_rank0.txt').is_file() and (out / 'config.json').is_file()
    assert list(out.rglob('events.out.tfevents.*')), 'no TensorBoard event file'
    log = (out / 'log_rank0.txt').read_text()
    assert re.search(r'number of params: \d+', log) and re.search(r'number of GFLOPs: [\d.]+', log)
    assert re.search(r'Train: \[1/2\]\[\d+/6\]\teta \S+ lr \S+\t wd \S+\ttime .*\tloss .*\tgrad_norm .*\tmem \d+MB', log)
    assert re.search(r' \* Acc@1 [\d.]+ Acc@5 [\d.]+', log)
    assert 'Accuracy of the network on the 12 test images' in log
    assert re.search(r'Max accuracy: [\d.]+%', log)
    ckpt = torch.load(out / 'ckpt_epoch_1.pth', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config'} <= set(ckpt)
    assert ckpt['epoch'] == 1 and 'layers.0.blocks.0.attn.relative_position_bias_table' in ckpt['model']


def test_auto_resume_continues_after_the_newest_checkpoint(tmp_path, image_folder):
    _train(tmp_path, image_folder)
    result, out = _train(tmp_path, image_folder, '--opts', 'TRAIN.EPOCHS', '3')
    log = result.stdout + result.stderr
    assert 'ckpt_epoch_1.pth' in log
    assert 'Train: [2/3]' in log and 'Train: [0/3]' not in log and 'Train: [1/3]' not in log
    assert (out / 'ckpt_epoch_2.pth').is_file()


def test_eval_only_evaluates_the_given_checkpoint(tmp_path, image_folder):
    _, out = _train(tmp_path, image_folder)
    result, _ = _train(tmp_path, image_folder, '--eval', '--resume', str(out / 'ckpt_epoch_0.pth'), '--tag', 'ev')
    log = result.stdout + result.stderr
    assert re.search(r' \* Acc@1 [\d.]+ Acc@5 [\d.]+', log) and 'Train:' not in log
    assert 'Accuracy of the network on the 12 test images' in log


def test_throughput_prints_the_official_line(tmp_path, image_folder):
    result, _ = _train(tmp_path, image_folder, '--throughput', '--batch-size', '4', '--disable_amp')
    assert re.search(r'batch_size 4 throughput [\d.]+', result.stdout + result.stderr)


def test_accumulation_full_precision_and_ema_train(tmp_path, image_folder):
    result, out = _train(tmp_path, image_folder, '--accumulation-steps', '2', '--disable_amp',
                         '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.EMA.ENABLE', 'True')
    log = result.stdout + result.stderr
    assert re.search(r' \* EMA Acc@1 [\d.]+ Acc@5 [\d.]+', log) and re.search(r' \* Acc@1 [\d.]+', log)
    ckpt = torch.load(out / 'ckpt_epoch_0.pth', weights_only=True)
    assert set(ckpt['model_ema']) == set(ckpt['model'])
    assert any(not torch.equal(ckpt['model_ema'][k], v) for k, v in ckpt['model'].items() if v.is_floating_point())


def test_an_official_training_checkpoint_resumes_at_the_next_epoch(tmp_path, image_folder):
    """Official checkpoints pickle a yacs CfgNode and timm's CosineLRScheduler state; they load safely."""
    from yacs.config import CfgNode

    _, out = _train(tmp_path, image_folder, '--opts', 'TRAIN.EPOCHS', '1')
    ours = torch.load(out / 'ckpt_epoch_0.pth', weights_only=True)
    official = dict(ours, config=CfgNode({'MODEL': {'NAME': 'tiny_test'}, 'TRAIN': {'EPOCHS': 2}}),
                    max_accuracy=12.5)
    official_path = tmp_path / 'official_ckpt_epoch_0.pth'
    torch.save(official, official_path)  # a full pickle, as the official framework writes
    result, _ = _train(tmp_path, image_folder, '--resume', str(official_path), '--tag', 'from_official')
    log = result.stdout + result.stderr
    assert 'Train: [1/2]' in log and 'Train: [0/2]' not in log
    assert 'Max accuracy' in log
