"""Distillation (--teacher-cfg / --teacher-weights, DISTILL.*): the loss is DeiT's soft or hard mix, the teacher is
frozen, sees the student's mixed batch, stays out of checkpoints, and a distilled run resumes exactly."""
from __future__ import annotations

import logging

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

import main
from cli import write_tiny_config
from config import parse_command_line
from conftest import write_image_folder
from distillation import DistillationLoss, build_teacher
from engine import TrainContext
from models import build_model
from trainer import SIMMIM, SWIN_MOE, with_distillation
from utils.errors import UserError
from utils.weight_layouts import from_official

LOG = logging.getLogger('test_distillation')
pytestmark = pytest.mark.usefixtures('one_torch_thread')


class Recording(nn.Module):
    """A teacher that remembers what it was shown."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.inner(x)


def _mix(x, y):
    """A fixed stand-in for mixup: 70 % of each sample and 30 % of the batch reversed, with soft targets."""
    one_hot = nn.functional.one_hot(y, 4).float()
    return 0.7 * x + 0.3 * x.flip(0), 0.7 * one_hot + 0.3 * one_hot.flip(0)


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    return z - z.exp().sum(dim=1, keepdim=True).log()


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_a_distilled_students_loss_equals_a_hand_computation(kind):
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), Recording(nn.Linear(6, 4)).eval().requires_grad_(False)
    x, y = torch.randn(5, 6), torch.tensor([0, 3, 1, 2, 0])
    ctx = TrainContext(model=student, criterion=SoftTargetCrossEntropy(), optimizer=None, lr_scheduler=None,
                       loss_scaler=None, device=torch.device('cpu'), amp_dtype=None, mixup_fn=_mix)
    tau, alpha = 2.0, 0.3
    loss, batch_size = DistillationLoss(teacher, kind, tau, alpha)(ctx, (x, y))

    mixed, targets = _mix(x, y)
    s, t = student(mixed).double(), teacher.inner(mixed).double()
    base = -(targets.double() * _log_softmax(s)).sum(dim=1).mean()
    if kind == 'soft':  # KL(p_teacher || p_student) at temperature tau, per image, times tau^2
        p_t = _log_softmax(t / tau).exp()
        term = (p_t * (_log_softmax(t / tau) - _log_softmax(s / tau))).sum(dim=1).mean() * tau ** 2
    else:  # cross-entropy on the teacher's top class
        term = -_log_softmax(s)[torch.arange(5), t.argmax(dim=1)].mean()
    assert batch_size == 5 and loss.item() == pytest.approx(((1 - alpha) * base + alpha * term).item(), rel=1e-6)
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], mixed)  # the student's mixed batch
    loss.backward()
    assert student.weight.grad is not None and all(p.grad is None for p in teacher.parameters())


def _tiny_config(tmp_path, *flags):
    return parse_command_line(['--cfg', str(write_tiny_config(tmp_path)), '--output', str(tmp_path / 'out'),
                               *flags])[1]


def test_the_teacher_is_built_from_timm_weights_and_its_config_frozen_in_eval_mode(tmp_path):
    config = _tiny_config(tmp_path)
    torch.manual_seed(1)
    source = build_model(config).eval()
    torch.save(from_official(source.state_dict(), 'timm'), tmp_path / 'teacher_timm.pth')
    config = _tiny_config(tmp_path, '--teacher-cfg', str(tmp_path / 'tiny.yaml'),
                          '--teacher-weights', str(tmp_path / 'teacher_timm.pth'))
    teacher = build_teacher(config, torch.device('cpu'), LOG)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), source(x), atol=1e-5)


def test_a_teacher_of_another_class_count_or_without_weights_is_one_error_line(tmp_path):
    torch.save({'model': build_model(_tiny_config(tmp_path)).state_dict(), 'config': _tiny_config(tmp_path).dump()},
               tmp_path / 'teacher.pth')
    config = _tiny_config(tmp_path, '--teacher-weights', str(tmp_path / 'teacher.pth'), '--opts',
                          'MODEL.NUM_CLASSES', '5')
    with pytest.raises(UserError, match='the teacher has 3 classes .*the student 5'):
        build_teacher(config, torch.device('cpu'), LOG)
    with pytest.raises(UserError, match='--teacher-cfg.* needs the teacher.s weights'):
        _tiny_config(tmp_path, '--teacher-cfg', str(tmp_path / 'tiny.yaml'))


@pytest.mark.parametrize('variant', [SWIN_MOE, SIMMIM], ids=['swin_moe', 'simmim'])
def test_only_classifiers_take_a_teacher(tmp_path, variant):
    config = _tiny_config(tmp_path, '--teacher-weights', 'any.pth')
    with pytest.raises(UserError, match=f'a {variant.name} run cannot take a teacher'):
        with_distillation(config, variant, torch.device('cpu'), LOG)


def test_a_distilled_run_saves_no_teacher_and_resumes_bit_identical(tmp_path, monkeypatch):
    """In process: a 2-epoch run with a teacher and mixup/cutmix; its last checkpoint removed, the restart resumes
    from epoch 0's and writes the same epoch-1 checkpoint."""
    monkeypatch.chdir(tmp_path)
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=2)
    config = _tiny_config(tmp_path)
    torch.manual_seed(2)
    student_keys = set(build_model(config).state_dict())
    torch.save({'model': build_model(config).state_dict(), 'config': config.dump()}, tmp_path / 'teacher.pth')
    argv = ['--cfg', str(tmp_path / 'tiny.yaml'), '--data-path', str(data), '--output', str(tmp_path / 'out'),
            '--teacher-weights', str(tmp_path / 'teacher.pth'),
            '--opts', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'DISTILL.TAU', '2.0']
    run_dir = tmp_path / 'out' / 'tiny_test' / 'default'
    assert main.run(argv) == 0
    first = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    assert set(first) == {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config',
                          'best_score'}
    assert set(first['model']) == student_keys  # the student's weights only: no teacher
    (run_dir / 'ckpt_epoch_1.pth').unlink()
    assert main.run(argv) == 0
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'distillation: soft, loss = 0.5 * base + 0.5 * distillation (tau 2)' in log
    assert 'ckpt_epoch_0.pth' in log.split('Resuming from')[-1].splitlines()[0]
    again = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    for key, value in first['model'].items():
        assert torch.equal(value, again['model'][key]), key
    for pid, state in first['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, again['optimizer']['state'][pid][name]), (pid, name)
