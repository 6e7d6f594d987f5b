"""Mixup/CutMix of multi-label batches: timm's image mixing, with dense multi-hot targets.

timm's :class:`~timm.data.Mixup` one-hot encodes class indices; multi-label targets are already multi-hot
vectors. :class:`MultiLabelMixup` mixes the images as timm does (the same random draws) and the targets as timm
1.0.31 does with ``multi_label=True`` (older timm releases lack it): each label smoothed towards 0.5, then
``lam * y + (1 - lam) * y.flip(0)``.
"""
from __future__ import annotations

import torch
from timm.data import Mixup


def mix_multilabel_targets(targets: torch.Tensor, lam, smoothing: float = 0.0) -> torch.Tensor:
    """Multi-hot ``targets`` (batch, classes) smoothed towards 0.5 by ``smoothing`` and mixed with the batch
    reversed; ``lam`` is a float or a (batch, 1) tensor (timm's 'elem' and 'pair' modes)."""
    smoothed = targets.float() * (1.0 - smoothing) + 0.5 * smoothing
    return smoothed * lam + smoothed.flip(0) * (1.0 - lam)


class MultiLabelMixup(Mixup):
    """timm's Mixup for batches with multi-hot targets (see the module docstring)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(x) % 2 == 0, 'the batch size must be even with mixup/cutmix'
        if self.mode == 'elem':
            lam = self._mix_elem(x)
        elif self.mode == 'pair':
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        return x, mix_multilabel_targets(target, lam, self.label_smoothing)
