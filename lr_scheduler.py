"""Per-iteration learning-rate schedules with linear warm-up, built on timm's ``Scheduler``.

The engine calls ``scheduler.step_update(num_updates)`` after every optimizer step. Schedules, as
the official framework (all lengths in optimizer steps: epochs * n_iter_per_epoch):

* ``cosine``: timm ``CosineLRScheduler``; with WARMUP_PREFIX the cosine starts after the warm-up.
* ``linear``: ours; after the warm-up, a straight line from the base lr to MIN_LR at the last step.
* ``step``: timm ``StepLRScheduler``; lr * DECAY_RATE every DECAY_EPOCHS, counted from step 0.
* ``multistep``: ours; lr * GAMMA ** (number of MULTISTEPS epochs already reached), counted from step 0.

The two of ours keep the official classes' attribute names (t_initial, warmup_t, milestones,
gamma, ...), and every schedule's ``state_dict`` is timm's plain ``__dict__`` copy, so the
'lr_scheduler' entry of an official checkpoint loads. Parameter groups with an ``lr_scale`` (layer
decay) get value * lr_scale: timm's ``update_groups`` applies it.
"""
from __future__ import annotations

import bisect
from typing import List, Sequence

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.step_lr import StepLRScheduler

from utils.errors import UserError

SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')


class _WarmupScheduler(Scheduler):
    """A timm Scheduler stepped per update, with a linear warm-up from ``warmup_lr_init`` over ``warmup_t``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_t: int = 0, warmup_lr_init: float = 0.0,
                 t_in_epochs: bool = False) -> None:
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=t_in_epochs)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            self.update_groups(warmup_lr_init)  # the first steps run at the warm-up start value
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        return self._after_warmup(t)

    def _after_warmup(self, t: int) -> List[float]:
        raise NotImplementedError


class LinearLRScheduler(_WarmupScheduler):
    """Linear decay from each group's base lr to ``lr_min`` at step ``t_initial``, after the warm-up."""

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min: float = 0.0,
                 warmup_t: int = 0, warmup_lr_init: float = 0.0, t_in_epochs: bool = False) -> None:
        super().__init__(optimizer, warmup_t=warmup_t, warmup_lr_init=warmup_lr_init, t_in_epochs=t_in_epochs)
        self.t_initial = t_initial
        self.lr_min = lr_min

    def _after_warmup(self, t: int) -> List[float]:
        span = max(self.t_initial - self.warmup_t, 1)
        frac = min(max(t - self.warmup_t, 0) / span, 1.0)
        return [v + (self.lr_min - v) * frac for v in self.base_values]


class MultiStepLRScheduler(_WarmupScheduler):
    """lr * gamma ** k, where k counts the ``milestones`` (absolute steps) already reached.

    timm's class of the same name applies each milestone one step early and, with its default
    warmup_prefix, counts from the end of the warm-up; the official one (and this) does neither.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_t: int = 0, warmup_lr_init: float = 0.0, t_in_epochs: bool = False) -> None:
        super().__init__(optimizer, warmup_t=warmup_t, warmup_lr_init=warmup_lr_init, t_in_epochs=t_in_epochs)
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def _after_warmup(self, t: int) -> List[float]:
        factor = self.gamma ** bisect.bisect_right(self.milestones, t)
        return [v * factor for v in self.base_values]


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int) -> Scheduler:
    """The schedule named by TRAIN.LR_SCHEDULER.NAME, in optimizer steps (call ``step_update`` per step)."""
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    num_steps = int(train.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * n_iter_per_epoch)
    name = sched.NAME.lower()
    if name == 'cosine':
        return CosineLRScheduler(
            optimizer, t_initial=max((num_steps - warmup_steps) if sched.WARMUP_PREFIX else num_steps, 1),
            lr_min=train.MIN_LR, warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps, cycle_limit=1,
            t_in_epochs=False, warmup_prefix=sched.WARMUP_PREFIX)
    if name == 'linear':
        return LinearLRScheduler(optimizer, t_initial=num_steps, lr_min=train.MIN_LR,
                                 warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps)
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=max(int(sched.DECAY_EPOCHS * n_iter_per_epoch), 1),
                               decay_rate=sched.DECAY_RATE, warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                               warmup_prefix=False, t_in_epochs=False)
    if name == 'multistep':
        milestones = [int(m * n_iter_per_epoch) for m in sched.MULTISTEPS]
        return MultiStepLRScheduler(optimizer, milestones=milestones, gamma=sched.GAMMA,
                                    warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps)
    raise UserError(f"TRAIN.LR_SCHEDULER.NAME {sched.NAME!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
