"""build_scheduler: per-iteration warm-up then cosine / linear / step / multistep, as the official schedules."""
from __future__ import annotations

import math

import pytest
import torch

from config import get_default_config
from lr_scheduler import build_scheduler
from utils.errors import UserError

BASE, WARM, MIN = 1e-3, 1e-6, 1e-5
N_ITER = 10  # updates per epoch


def _cfg(name='cosine', epochs=10, warmup=2, **sched):
    cfg = get_default_config()
    cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR = BASE, WARM, MIN
    cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS = epochs, warmup
    cfg.TRAIN.LR_SCHEDULER.NAME = name
    for key, value in sched.items():
        setattr(cfg.TRAIN.LR_SCHEDULER, key, value)
    cfg.freeze()
    return cfg


def _lr_at(cfg, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.BASE_LR)
    sched = build_scheduler(cfg, opt, N_ITER)
    out = [opt.param_groups[0]['lr']]  # before the first update
    for t in steps:
        sched.step_update(t)
        out.append(opt.param_groups[0]['lr'])
    return out


def test_cosine_with_warmup_prefix():
    start, *lrs = _lr_at(_cfg(), [0, 10, 20, 60, 100])
    assert start == pytest.approx(WARM)
    assert lrs[0] == pytest.approx(WARM)
    assert lrs[1] == pytest.approx(WARM + (BASE - WARM) / 2)  # halfway through the 20 warm-up steps
    assert lrs[2] == pytest.approx(BASE)  # the cosine starts at its top after the warm-up
    assert lrs[3] == pytest.approx(MIN + (BASE - MIN) / 2)  # halfway through the 80 cosine steps
    assert lrs[4] == pytest.approx(MIN)


def test_cosine_without_prefix_counts_from_step_zero():
    _, lr = _lr_at(_cfg(WARMUP_PREFIX=False), [20])
    assert lr == pytest.approx(MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi * 20 / 100)))


def test_linear_decays_to_min_lr_at_the_last_step():
    _, mid, end, after = _lr_at(_cfg('linear'), [60, 100, 120])
    assert mid == pytest.approx(BASE + (MIN - BASE) / 2)
    assert end == pytest.approx(MIN) and after == pytest.approx(MIN)


def test_step_decays_every_decay_epochs_counted_from_zero():
    warm, before, after, twice = _lr_at(_cfg('step', DECAY_EPOCHS=3, DECAY_RATE=0.1), [10, 29, 30, 60])[1:]
    assert warm == pytest.approx(WARM + (BASE - WARM) / 2)
    assert before == pytest.approx(BASE) and after == pytest.approx(BASE * 0.1)
    assert twice == pytest.approx(BASE * 0.01)


def test_multistep_decays_at_each_milestone_epoch():
    lrs = _lr_at(_cfg('multistep', MULTISTEPS=[4, 7], GAMMA=0.5), [39, 40, 69, 70])[1:]
    assert lrs == pytest.approx([BASE, BASE * 0.5, BASE * 0.5, BASE * 0.25])


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step', 'multistep'])
def test_state_dict_round_trips_through_a_weights_only_file(tmp_path, name):
    cfg = _cfg(name, DECAY_EPOCHS=3, MULTISTEPS=[4])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    sched = build_scheduler(cfg, opt, N_ITER)
    torch.save(sched.state_dict(), tmp_path / 's.pth')
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    fresh = build_scheduler(_cfg(name, epochs=50, DECAY_EPOCHS=3, MULTISTEPS=[4]), fresh_opt, N_ITER)
    fresh.load_state_dict(torch.load(tmp_path / 's.pth', weights_only=True))
    for t in (5, 45, 95):  # the saved schedule (10 epochs) wins over the new config's 50
        sched.step_update(t)
        fresh.step_update(t)
        assert fresh_opt.param_groups[0]['lr'] == pytest.approx(opt.param_groups[0]['lr'])


def test_unknown_schedule_is_named():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    with pytest.raises(UserError, match='poly'):
        build_scheduler(_cfg('poly'), opt, N_ITER)
