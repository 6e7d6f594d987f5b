"""TRAIN.SAVE_BEST: model_best.pth holds the best validation epoch, survives pruning, and is never auto-resumed."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from cli import run_main, train_tiny
from trainer import BestTracker, initial_best
from utils.checkpoint import Resumed
from utils.checkpoint import auto_resume_helper
from utils.errors import UserError


def test_model_best_is_the_best_epoch_survives_pruning_and_evaluates(tmp_path, image_folder):
    common, out, log = train_tiny(tmp_path, image_folder, 'TRAIN.EPOCHS', '3', 'TRAIN.KEEP_CKPTS', '1')
    accs = [float(a) for a in re.findall(r' \* Acc@1 ([\d.]+)', log)]
    best = torch.load(out / 'model_best.pth', weights_only=True)
    first_best = accs.index(max(accs))
    assert best['epoch'] == first_best and abs(best['max_accuracy'] - max(accs)) < 1e-3
    assert sorted(p.name for p in out.glob('*.pth')) == ['ckpt_epoch_2.pth', 'model_best.pth']
    again = run_main([*common, '--eval', '--resume', str(out / 'model_best.pth'), '--tag', 'best'], cwd=tmp_path)
    evaluated = float(re.search(r' \* Acc@1 ([\d.]+)', again.stdout + again.stderr).group(1))
    assert again.returncode == 0 and abs(evaluated - max(accs)) < 1e-3
    assert auto_resume_helper(str(out)) == str(out / 'ckpt_epoch_2.pth')  # a rerun continues, never from the best


def _tracker(tmp_path, best_score=None, max_accuracy=0.0, save_best=True, metric='acc1'):
    extras = {} if best_score is None else {'best_score': best_score}
    best = initial_best(Resumed(max_accuracy=max_accuracy, extras=extras), metric)
    return BestTracker(save_best, str(tmp_path / 'model_best.pth'), torch.device('cpu'), best)


def test_a_worse_score_after_resume_does_not_replace_the_best(tmp_path):
    (tmp_path / 'model_best.pth').write_bytes(b'x')
    best = _tracker(tmp_path, best_score=50.0)
    assert not best.is_new_best(40.0)
    assert best.is_new_best(60.0) and best.extra() == {'best_score': 60.0}


def test_an_older_checkpoint_without_best_score_uses_its_max_accuracy_for_acc1_only(tmp_path):
    (tmp_path / 'model_best.pth').write_bytes(b'x')
    assert not _tracker(tmp_path, max_accuracy=50.0).is_new_best(40.0)
    assert _tracker(tmp_path, max_accuracy=50.0, metric='ema_acc1').is_new_best(40.0)


def test_the_first_validation_writes_one_unless_save_best_is_off(tmp_path):
    assert _tracker(tmp_path, best_score=90.0).is_new_best(10.0)  # no file yet
    assert not _tracker(tmp_path, save_best=False).is_new_best(60.0)


def test_best_metric_ema_acc1_needs_ema():
    from config import get_config
    with pytest.raises(UserError, match='TRAIN.BEST_METRIC ema_acc1 needs TRAIN.EMA.ENABLE'):
        get_config(SimpleNamespace(cfg=None, opts=['TRAIN.BEST_METRIC', 'ema_acc1']))
