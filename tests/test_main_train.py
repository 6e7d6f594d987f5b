"""`python main.py` trains, checkpoints, logs, resumes, evaluates and times like the official script."""
from __future__ import annotations

import re

import pytest
import torch

from cli import run_main, torchrun, write_tiny_config


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


def test_eval_only_evaluates_the_given_checkpoint_with_any_batch_size(tmp_path, image_folder):
    """Evaluation never mixes: an odd --batch-size is fine with the official recipe's mixup/cutmix on."""
    _, out = _train(tmp_path, image_folder)
    result, _ = _train(tmp_path, image_folder, '--eval', '--resume', str(out / 'ckpt_epoch_0.pth'), '--tag', 'ev',
                       '--batch-size', '7', '--opts', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0')
    log = result.stdout + result.stderr
    assert re.search(r' \* Acc@1 [\d.]+ Acc@5 [\d.]+', log) and 'Train:' not in log
    assert 'Accuracy of the network on the 12 test images' in log
    assert re.search(r'Test: \[1/2\]', log)  # 12 images in batches of 7


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


def _official_optimizer_state(ours: dict) -> dict:
    """The optimizer entry as the official framework's plain AdamW (torch 1.x) wrote it: no kernel settings in
    the groups, integer step counters."""
    groups = [{k: g[k] for k in ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'initial_lr', 'params') if k in g}
              for g in ours['param_groups']]
    state = {i: {**s, 'step': int(s['step'])} for i, s in ours['state'].items()}
    return {'state': state, 'param_groups': groups}


def _plain_adamw_optimizer_state(ours: dict) -> dict:
    """The optimizer entry written by ``torch.optim.AdamW(fused=False, foreach=False)`` (timm, our older releases)."""
    params = {i: torch.zeros_like(s['exp_avg']) for i, s in ours['state'].items()}
    groups = [{**{k: v for k, v in g.items() if k not in ('params', 'fused', 'foreach')},
               'params': [params[i] for i in g['params']]} for g in ours['param_groups']]
    plain = torch.optim.AdamW(groups, fused=False, foreach=False)
    plain.load_state_dict({**ours, 'param_groups': [{**g, 'fused': False, 'foreach': False}
                                                    for g in ours['param_groups']]})
    for p in params.values():  # one step of its own, so that what it writes is its own state
        p.grad = torch.full_like(p, 1e-3)
    plain.step()
    written = plain.state_dict()
    assert all(g['fused'] is False and g['foreach'] is False for g in written['param_groups'])
    return written


@pytest.mark.parametrize('writer', [_official_optimizer_state, _plain_adamw_optimizer_state])
@pytest.mark.parametrize('processes', [1, 2])
def test_a_non_fused_training_checkpoint_resumes_and_trains_on(tmp_path, image_folder, writer, processes):
    """Official checkpoints pickle a yacs CfgNode and timm's CosineLRScheduler state, and their optimizer state
    says it was written by a plain AdamW: they load safely and our fused AdamW steps on (it used to fall back to
    the single-tensor kernel, which refuses the skip flag, and crash at the first step)."""
    from yacs.config import CfgNode

    _, out = _train(tmp_path, image_folder, '--opts', 'TRAIN.EPOCHS', '1')
    ours = torch.load(out / 'ckpt_epoch_0.pth', weights_only=True)
    official = dict(ours, optimizer=writer(ours['optimizer']), max_accuracy=12.5,
                    config=CfgNode({'MODEL': {'NAME': 'tiny_test'}, 'TRAIN': {'EPOCHS': 2}}))
    official_path = tmp_path / 'official_ckpt_epoch_0.pth'
    torch.save(official, official_path)  # a full pickle, as the official framework writes
    args = ['--cfg', str(write_tiny_config(tmp_path)), '--data-path', str(image_folder), '--output',
            str(tmp_path / 'out'), '--resume', str(official_path), '--tag', 'from_official']
    if processes == 1:
        result = run_main(args, cwd=tmp_path)
    else:
        result = torchrun(['--standalone', '--nproc_per_node', '2'], args, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = (tmp_path / 'out' / 'tiny_test' / 'from_official' / 'log_rank0.txt').read_text()
    assert 'Train: [1/2]' in log and 'Train: [0/2]' not in log
    assert 'Max accuracy' in log
    resumed = torch.load(tmp_path / 'out' / 'tiny_test' / 'from_official' / 'ckpt_epoch_1.pth', weights_only=True)
    assert all(g['fused'] for g in resumed['optimizer']['param_groups'])
    assert any(not torch.equal(resumed['model'][k], v) for k, v in ours['model'].items() if v.is_floating_point())
