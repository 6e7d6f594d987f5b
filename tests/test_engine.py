"""engine.py: non-finite steps are skipped and too many stop the run; validation counts exactly."""
from __future__ import annotations

import logging

import pytest
import torch

from config import get_default_config
from engine import TrainContext, train_one_epoch, validate
from utils.amp import GradScalerWithNorm
from utils.errors import UserError


class _Scheduler:
    def step_update(self, num_updates: int) -> None:
        pass


def _ctx(model: torch.nn.Module) -> TrainContext:
    return TrainContext(model=model, criterion=torch.nn.CrossEntropyLoss(),
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr_scheduler=_Scheduler(),
                        loss_scaler=GradScalerWithNorm(enabled=False), device=torch.device('cpu'), amp_dtype=None)


def _config(max_nonfinite: int = 2):
    cfg = get_default_config()
    cfg.TRAIN.MAX_NONFINITE_STEPS = max_nonfinite
    cfg.PRINT_FREQ = 100
    cfg.freeze()
    return cfg


def _batches(n: int, poison: set[int]) -> list:
    out = []
    for i in range(n):
        x = torch.randn(4, 3)
        if i in poison:
            x[0, 0] = float('nan')
        out.append((x, torch.tensor([0, 1, 2, 0])))
    return out


def test_a_nan_batch_is_skipped_and_leaves_the_weights_finite():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    stats = train_one_epoch(_config(), _ctx(model), _batches(4, poison={1}), 0, logging.getLogger('t'))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert stats['stopped_at'] is None and torch.isfinite(torch.tensor(stats['grad_norm']))


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(UserError, match='epoch 0 step 2.*TRAIN.MAX_NONFINITE_STEPS=2'):
        train_one_epoch(_config(2), _ctx(model), _batches(5, poison={0, 1, 2}), 0, logging.getLogger('t'))


def test_validate_returns_exact_percentages_and_loss():
    model = torch.nn.Identity()
    logits = torch.tensor([[3., 2., 1.], [1., 3., 2.], [1., 2., 3.]])
    targets = torch.tensor([0, 2, 1])  # top-1 right once; top-2 right for all
    acc1, acc5, loss = validate(_config(), [(logits, targets)], model, torch.device('cpu'), None,
                                logging.getLogger('t'))
    assert acc1 == pytest.approx(100 / 3) and acc5 == pytest.approx(100.0)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())


def _count_host_reads(monkeypatch, with_copies_in: bool = False) -> list:
    """Every read of a tensor's value on the host (each one waits for the device on a GPU), by name; with
    ``with_copies_in``, also every ``torch.tensor(...)`` made from host values (a blocking copy to a GPU)."""
    reads = []
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    if with_copies_in:
        original_tensor = torch.tensor
        monkeypatch.setattr(torch, 'tensor', lambda *a, **k: reads.append('tensor') or original_tensor(*a, **k))
    return reads


def test_validation_reads_the_device_at_its_log_steps_only(monkeypatch):
    """Seven batches, a log line at batches 0, 3 and 6: three reads, then the image count joins the sums and they
    are read once for the final figures; nothing per batch."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 3, (4,))) for _ in range(6)] + [(torch.randn(2, 3),
                                                                                      torch.tensor([0, 1]))]
    expected = validate(_config(), batches, torch.nn.Identity(), torch.device('cpu'), None, logging.getLogger('t'))
    reads = _count_host_reads(monkeypatch, with_copies_in=True)
    config = _config()
    config.defrost()
    config.PRINT_FREQ = 3
    got = validate(config, batches, torch.nn.Identity(), torch.device('cpu'), None, logging.getLogger('t'))
    monkeypatch.undo()
    assert reads == ['tolist'] * 3 + ['tensor', 'tolist'] and got == expected


def test_steps_between_log_steps_do_not_wait_for_the_host(monkeypatch):
    """With a fused optimizer the only device-to-host reads are the log steps' (here batches 0 and 5)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ctx = _ctx(model)
    ctx.optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    reads = _count_host_reads(monkeypatch)
    stats = train_one_epoch(_config(), ctx, _batches(6, poison={2}), 0, logging.getLogger('t'))
    monkeypatch.undo()
    assert reads == ['tolist', 'tolist']
    assert stats['skipped_steps'] == 1 and ctx.optimizer.state[model.weight]['step'].item() == 5
