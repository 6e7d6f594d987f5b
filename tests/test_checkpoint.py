"""Checkpoints: atomic writes, loads that never run code, official files, auto-resume, strict weights, EMA."""
from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from torch import nn
from yacs.config import CfgNode

from config import get_default_config
from lr_scheduler import build_scheduler
from utils import checkpoint as C
from utils.amp import GradScalerWithNorm
from utils.ema import ModelEma
from utils.errors import UserError

LOG = logging.getLogger('test_checkpoint')


class Tiny(nn.Module):
    def __init__(self, dim: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.register_buffer('relative_position_index', torch.arange(dim))
        self.register_buffer('attn_mask', torch.zeros(2, 2))

    def forward(self, x):
        return self.head(self.fc(x))


def _cfg(tmp_path, **kv):
    cfg = get_default_config()
    cfg.OUTPUT = str(tmp_path)
    cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS = 4, 1
    for key, value in kv.items():
        node, name = (cfg.TRAIN, key) if key != 'EVAL_MODE' else (cfg, key)
        setattr(node, name, value)
    cfg.freeze()
    return cfg


def _state(cfg, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, build_scheduler(cfg, opt, 5), GradScalerWithNorm(enabled=False)


def _checkpointer(cfg, model, opt, sched, scaler, ema=None, rank=0) -> C.Checkpointer:
    return C.build_checkpointer(cfg, C.TrainingState(model, opt, sched, scaler, ema), rank, LOG)


# --------------------------------------------------------------------------------------- atomic save

@pytest.mark.parametrize('error, raised', [(OSError(28, 'No space left on device'), UserError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_save_leaves_the_previous_file_loadable_and_no_temp_file(tmp_path, monkeypatch, error, raised):
    path = tmp_path / 'ckpt_epoch_0.pth'
    C.save_file_atomic({'model': {'w': torch.ones(3)}}, path)
    real_save = torch.save

    def partial_then_fail(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise error
    monkeypatch.setattr(torch, 'save', partial_then_fail)
    with pytest.raises(raised):
        C.save_file_atomic({'model': {'w': torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.equal(C.load_file_safe(path)['model']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt_epoch_0.pth']


# ---------------------------------------------------------------------------------------- safe load

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))  # unpickling this would create the marker file


@pytest.mark.parametrize('writer', ['torch', 'pickle'])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, writer):
    marker, path = tmp_path / 'PWNED', tmp_path / 'evil.pth'
    obj = {'model': {'w': torch.ones(1)}, 'x': _Payload(str(marker))}
    if writer == 'torch':
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UserError, match='refused to load') as err:
        C.load_file_safe(path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)
    assert not marker.exists()


def test_an_official_checkpoint_with_a_yacs_config_loads(tmp_path):
    official_cfg = CfgNode({'MODEL': CfgNode({'NAME': 'swin_tiny_patch4_window7_224', 'DEPTHS': [2, 2]}),
                            'TRAIN': CfgNode({'BETAS': (0.9, 0.999), 'QK_SCALE': None})})
    official_cfg.freeze()
    model = Tiny()
    torch.save({'model': model.state_dict(), 'config': official_cfg, 'epoch': 7, 'max_accuracy': 81.2},
               tmp_path / 'official.pth')
    ckpt = C.load_file_safe(tmp_path / 'official.pth')
    assert isinstance(ckpt['config'], CfgNode)
    assert ckpt['config'].MODEL.NAME == 'swin_tiny_patch4_window7_224' and ckpt['config'].TRAIN.BETAS == (0.9, 0.999)
    assert torch.equal(ckpt['model']['fc.weight'], model.fc.weight)


@pytest.mark.parametrize('content', [None, b'', b'\x00garbage' * 50, 'truncated'])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content == 'truncated':
        torch.save({'model': Tiny().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match='bad.pth'):
        C.load_file_safe(path)


# --------------------------------------------------------------------------------- save and resume

def test_save_then_resume_restores_everything(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, sched, scaler = _state(cfg)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ema = ModelEma(model, decay=0.5)
    path = _checkpointer(cfg, model, opt, sched, scaler, ema).save(3, 55.5, extra={'rng': [1, 2]})
    assert path == str(tmp_path / 'ckpt_epoch_3.pth')
    raw = torch.load(path, weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config', 'model_ema',
            'rng'} == set(raw) and raw['epoch'] == 3
    assert CfgNode.load_cfg(raw['config']).OUTPUT == str(tmp_path)  # the config as YAML text

    model2, opt2, sched2, scaler2 = _state(cfg, seed=1)
    ema2 = ModelEma(model2, decay=0.5)
    resumed = _checkpointer(cfg, model2, opt2, sched2, scaler2, ema2).resume(path)
    assert resumed == C.Resumed(max_accuracy=55.5, epoch=4, step=0, extras={'rng': [1, 2]})
    assert torch.equal(model2.fc.weight, model.fc.weight)
    assert torch.equal(opt2.state_dict()['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(ema2.module.head.weight, ema.module.head.weight)


def test_eval_mode_loads_only_the_model(tmp_path):
    cfg = _cfg(tmp_path)
    model, opt, sched, scaler = _state(cfg)
    opt.param_groups[0]['lr'] = 123.0
    path = _checkpointer(cfg, model, opt, sched, scaler).save(0, 1.0)
    model2, opt2, sched2, scaler2 = _state(cfg, seed=1)
    resumed = _checkpointer(cfg, model2, opt2, sched2, scaler2).resume(path, training=False)
    assert (resumed.max_accuracy, resumed.epoch, resumed.step) == (0.0, 0, 0)
    assert torch.equal(model2.fc.weight, model.fc.weight) and opt2.param_groups[0]['lr'] != 123.0


def test_other_architecture_is_named_with_keys_and_shapes(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save({'model': Tiny(classes=5).state_dict()}, path)
    with pytest.raises(UserError) as err:
        C.load_model_state(Tiny(classes=3), C.load_file_safe(path)['model'], str(path))
    assert 'head.weight checkpoint [5, 4] vs model [3, 4]' in str(err.value) and str(path) in str(err.value)
    state = Tiny().state_dict()
    del state['fc.bias']
    with pytest.raises(UserError, match='missing fc.bias'):
        C.load_model_state(Tiny(), state, 'x.pth')


def test_recomputable_buffers_and_wrapper_prefixes_are_tolerated():
    src = Tiny()
    state = {f'module.{k}': v for k, v in src.state_dict().items() if k != 'relative_position_index'}
    state['module.attn_mask'] = torch.ones(7)  # stale shape from another window size
    dst = Tiny()
    C.load_model_state(dst, state, 'x.pth')
    assert torch.equal(dst.fc.weight, src.fc.weight) and dst.attn_mask.shape == (2, 2)


def test_keep_ckpts_prunes_the_oldest_epochs(tmp_path):
    cfg = _cfg(tmp_path, KEEP_CKPTS=2)
    checkpointer = _checkpointer(cfg, *_state(cfg))
    for epoch in range(4):
        checkpointer.save(epoch, 0.0)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_2.pth', 'ckpt_epoch_3.pth']


def test_a_step_checkpoint_replaces_the_one_before_and_an_epoch_checkpoint_replaces_both(tmp_path):
    cfg = _cfg(tmp_path)
    checkpointer = _checkpointer(cfg, *_state(cfg))
    checkpointer.save(0, 0.0)
    checkpointer.save(1, 0.0, step=2)
    checkpointer.save(1, 0.0, step=4)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1_step_4.pth']
    assert C.auto_resume_helper(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_1_step_4.pth')
    assert checkpointer.resume(C.auto_resume_helper(str(tmp_path))).step == 4
    checkpointer.save(1, 0.0)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth']


def _resume_cfg(tmp_path, resume: str, auto: bool, eval_mode: bool = False, moe: bool = False) -> CfgNode:
    cfg = get_default_config()
    cfg.OUTPUT, cfg.MODEL.RESUME, cfg.TRAIN.AUTO_RESUME, cfg.EVAL_MODE = str(tmp_path), resume, auto, eval_mode
    cfg.MODEL.TYPE = 'swin_moe' if moe else 'swin'
    return cfg


def test_the_resume_file_is_the_newest_checkpoint_in_training_and_the_explicit_one_in_evaluation(tmp_path, caplog):
    given = str(tmp_path / 'elsewhere.pth')
    assert C.resume_file(_resume_cfg(tmp_path, given, auto=True), 0, LOG) == given  # no checkpoint in OUTPUT yet
    assert C.resume_file(_resume_cfg(tmp_path, '', auto=True), 0, LOG) == ''
    C.save_file_atomic({'model': {}, 'epoch': 3}, tmp_path / 'ckpt_epoch_3.pth')
    C.save_file_atomic({'model': {}, 'epoch': 2}, tmp_path / 'ckpt_epoch_2.pth.rank0')
    newest = str(tmp_path / 'ckpt_epoch_3.pth')
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert C.resume_file(_resume_cfg(tmp_path, given, auto=True), 0, LOG) == newest  # a requeued job goes on
    assert f'changing resume file from {given} to {newest}' in caplog.text
    assert C.resume_file(_resume_cfg(tmp_path, given, auto=False), 0, LOG) == given
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG.name):  # the official run's line, whatever is evaluated
        assert C.resume_file(_resume_cfg(tmp_path, given, auto=True, eval_mode=True), 0, LOG) == given
    assert f'All checkpoints found in {tmp_path}' in caplog.text
    assert C.resume_file(_resume_cfg(tmp_path, '', auto=True, eval_mode=True), 0, LOG) == newest
    # Swin-MoE's ranks look at the rank-0 files, whatever their own rank
    moe_rank3 = C.resume_file(_resume_cfg(tmp_path, '', auto=True, moe=True), 3, LOG)
    assert moe_rank3 == str(tmp_path / 'ckpt_epoch_2.pth.rank0')


def test_auto_resume_takes_the_highest_epoch_and_skips_an_unreadable_one(tmp_path, caplog):
    assert C.auto_resume_helper(str(tmp_path)) is None
    for epoch in (2, 9, 10):
        C.save_file_atomic({'model': {'w': torch.ones(1)}, 'epoch': epoch}, tmp_path / f'ckpt_epoch_{epoch}.pth')
    (tmp_path / 'other.pth').write_bytes(b'ignored')
    assert C.auto_resume_helper(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_10.pth')  # 10 > 9, not '10' < '9'
    (tmp_path / 'ckpt_epoch_11.pth').write_bytes((tmp_path / 'ckpt_epoch_10.pth').read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert C.auto_resume_helper(str(tmp_path), LOG) == str(tmp_path / 'ckpt_epoch_10.pth')
    assert 'ckpt_epoch_11.pth' in caplog.text


def test_ema_update_averages_and_copies_on_the_first_step():
    model = nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, step=0)  # the first step copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model, step=5)
    assert torch.allclose(ema.module.weight, torch.full((2, 2), 3.0))


def test_swin_moe_ranks_find_and_prune_only_their_own_files(tmp_path):
    from utils.checkpoint import checkpoint_files, checkpoint_tag, prune_checkpoints
    assert checkpoint_tag(moe=True, save_master=False, rank=1) == '.rank1'
    assert checkpoint_tag(moe=True, save_master=True, rank=1) == '.global'
    assert checkpoint_tag(moe=False, save_master=False, rank=1) == ''
    for name in ('ckpt_epoch_0.pth.rank0', 'ckpt_epoch_0.pth.rank1', 'ckpt_epoch_1.pth.rank0',
                 'ckpt_epoch_1.pth.rank1', 'ckpt_epoch_2.pth'):
        (tmp_path / name).write_bytes(b'')
    assert [os.path.basename(p) for _, p in checkpoint_files(str(tmp_path), tag='.rank1')] == [
        'ckpt_epoch_0.pth.rank1', 'ckpt_epoch_1.pth.rank1']
    prune_checkpoints(str(tmp_path), keep=1, tag='.rank1')
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'ckpt_epoch_0.pth.rank0', 'ckpt_epoch_1.pth.rank0', 'ckpt_epoch_1.pth.rank1', 'ckpt_epoch_2.pth']


def test_with_save_master_only_rank_0_writes_swin_moe_checkpoints(tmp_path):
    def writes(rank: int, save_master: bool) -> bool:
        config = get_default_config()
        config.OUTPUT, config.MODEL.TYPE, config.TRAIN.MOE.SAVE_MASTER = str(tmp_path), 'swin_moe', save_master
        return C.build_checkpointer(config, C.TrainingState(Tiny()), rank, LOG).writes
    assert writes(1, save_master=False)
    assert writes(0, save_master=True) and not writes(1, save_master=True)
