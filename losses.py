"""Training losses beyond timm's: binary cross-entropy for single- and multi-label targets.

:class:`BinaryCrossEntropy` has the semantics of timm's ``timm.loss.BinaryCrossEntropy`` (1.0.31, with
``smooth_dense=True``), whatever the installed timm release:

* class-index targets (single-label data without mixup) become one-hot vectors smoothed as timm does:
  ``smoothing / C`` off, ``1 - smoothing + smoothing / C`` on;
* dense targets (mixup/cutmix soft targets, multi-hot vectors) are used as they are, except that a
  ``smoothing`` moves each towards 0.5 (mixup already smoothed its targets: the loss then gets 0);
* ``target_threshold`` turns targets above it into 1, the others into 0;
* the mean over the batch and the classes of ``binary_cross_entropy_with_logits``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class BinaryCrossEntropy(torch.nn.Module):
    """Binary cross-entropy over the classes, on class indices or dense targets (see the module docstring)."""

    def __init__(self, smoothing: float = 0.0, target_threshold: Optional[float] = None):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing, self.target_threshold = smoothing, target_threshold

    def dense_targets(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The (batch, classes) targets the loss compares ``logits`` with."""
        if target.shape != logits.shape:
            off = self.smoothing / logits.shape[-1]
            target = torch.full_like(logits, off).scatter_(1, target.long().view(-1, 1), 1.0 - self.smoothing + off)
        elif self.smoothing:
            target = target * (1.0 - self.smoothing) + 0.5 * self.smoothing
        if self.target_threshold is not None:
            target = target.gt(self.target_threshold).to(target.dtype)
        return target

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, self.dense_targets(logits, target).to(logits.dtype))
