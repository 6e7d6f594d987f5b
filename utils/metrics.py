"""Evaluation figures beyond Acc@1/Acc@5: per-class counts and the confusion matrix (single-label data), average
precision and F1 (multi-label data), exact over any number of processes.

* Single-label: :class:`ClassCounter` adds up, on the device, each class's images, correct top-1 predictions and
  predictions, and (up to :data:`MAX_CONFUSION_CLASSES` classes) the confusion matrix; one all-reduce sums them
  over the ranks.
* Multi-label: average precision ranks all the images of a class, so the scores of every rank are gathered
  (:func:`all_gather_rows`: shards of different sizes) and the figures computed from the whole set.
  :func:`average_precision` equals scikit-learn's ``average_precision_score`` per class (ties included);
  :func:`multilabel_metrics` gives mAP (over the classes with a positive image: AP is undefined for the others),
  and the macro and micro F1 of scikit-learn's ``f1_score`` (a class without true or predicted positives
  counts 0 in the macro mean, as scikit-learn's default does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from utils.distributed import all_reduce_sum, get_world_size, is_dist_ready

MAX_CONFUSION_CLASSES = 1000  # beyond, the confusion matrix (classes squared cells) is not kept


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's ``rows`` (same trailing shape, any number of rows), rank 0's first. Uneven
    shards are padded to the longest for the collective, and cut back after it."""
    if not is_dist_ready() or get_world_size() == 1:
        return rows
    world = get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(gathered, counts)])


# ---------------------------------------------------------------------------------------------- single-label

@dataclass
class ClassCounts:
    """Per class (true class for ``images`` and ``correct``, predicted class for ``predicted``); ``matrix[t, p]``:
    images of class t predicted as p (None above MAX_CONFUSION_CLASSES classes)."""
    images: torch.Tensor
    correct: torch.Tensor
    predicted: torch.Tensor
    matrix: Optional[torch.Tensor]

    def accuracy(self) -> torch.Tensor:
        """Top-1 accuracy of each class in percent (NaN for a class without images)."""
        return 100.0 * self.correct.double() / self.images.double()


class ClassCounter:
    """Adds up :class:`ClassCounts` batch by batch on the device (no host read), summed over the ranks by
    :meth:`result`."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)
        keep = num_classes <= MAX_CONFUSION_CLASSES
        self.matrix = torch.zeros(num_classes * num_classes if keep else 0, dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """``predictions``: each image's top-1 class; ``targets``: its true class."""
        ones = torch.ones_like(targets, dtype=torch.int64)
        self.counts[0].index_add_(0, targets, ones)
        self.counts[1].index_add_(0, targets, (predictions == targets).long())
        self.counts[2].index_add_(0, predictions, ones)
        if self.matrix.numel():
            self.matrix.index_add_(0, targets * self.num_classes + predictions, ones)

    def result(self) -> ClassCounts:
        """The counts over all ranks (a collective: every rank calls it)."""
        total = all_reduce_sum(torch.cat([self.counts.flatten(), self.matrix])).cpu()
        images, correct, predicted = total[:3 * self.num_classes].view(3, self.num_classes)
        matrix = total[3 * self.num_classes:].view(self.num_classes, self.num_classes) if self.matrix.numel() else None
        return ClassCounts(images, correct, predicted, matrix)


# ----------------------------------------------------------------------------------------------- multi-label

def average_precision(scores: torch.Tensor, targets: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Average precision of each column of ``scores`` (images, classes) against binary ``targets``, as
    scikit-learn's ``average_precision_score(average=None)``: the sum over the distinct score thresholds of
    (recall gained) x precision. NaN for a class without positives. Columns are done ``chunk`` cells at a time."""
    num, classes = scores.shape
    step = max(1, chunk // max(num, 1))
    out = [_average_precision(scores[:, c:c + step], targets[:, c:c + step]) for c in range(0, classes, step)]
    return torch.cat(out) if out else scores.new_zeros(0, dtype=torch.float64)


def _average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not len(scores):
        return torch.full((scores.shape[1],), float('nan'), dtype=torch.float64, device=scores.device)
    order = scores.double().argsort(dim=0, descending=True, stable=True)
    ranked = scores.double().gather(0, order)
    hits = targets.double().gather(0, order)
    true_pos = hits.cumsum(0)
    # a threshold ends where the next score differs: tied images enter the ranking together
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[:-1] != ranked[1:]
    before = torch.where(last, true_pos, torch.zeros_like(true_pos)).cummax(0).values
    before = torch.cat([torch.zeros_like(before[:1]), before[:-1]])  # true positives at the previous threshold
    seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64, device=ranked.device)[:, None]
    gained = torch.where(last, (true_pos - before) * true_pos / seen, torch.zeros_like(true_pos))
    return gained.sum(0) / true_pos[-1]  # 0 / 0: NaN for a class without positives


@dataclass
class MultiLabelMetrics:
    """mAP, macro and micro F1 in percent; per class: AP (percent, NaN without positives) and counts at the
    threshold."""
    map: float
    f1_macro: float
    f1_micro: float
    ap: torch.Tensor
    positives: torch.Tensor
    predicted: torch.Tensor
    true_positives: torch.Tensor

    def scores(self) -> dict[str, float]:
        return {'map': self.map, 'f1_macro': self.f1_macro, 'f1_micro': self.f1_micro}


def f1_scores(true_pos: torch.Tensor, predicted: torch.Tensor, positives: torch.Tensor) -> tuple[float, float]:
    """Macro and micro F1 (fractions) from per-class counts; a class with no true and no predicted positives has
    F1 0 in the macro mean (scikit-learn's ``zero_division`` default)."""
    denominator = (predicted + positives).double()
    per_class = torch.where(denominator > 0, 2 * true_pos.double() / denominator.clamp(min=1), 0.0)
    micro = 2 * true_pos.sum().double() / denominator.sum() if denominator.sum() > 0 else torch.tensor(0.0)
    return per_class.mean().item(), float(micro)


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> MultiLabelMetrics:
    """The figures of (images, classes) ``logits`` against multi-hot ``targets``; a class is predicted where
    sigmoid(logit) >= ``threshold``. AP ranks the logits (the sigmoid would tie large ones in float32)."""
    truth = targets > 0.5
    ap = average_precision(logits, truth)
    predicted_mask = torch.sigmoid(logits.double()) >= threshold
    positives, predicted = truth.sum(0), predicted_mask.sum(0)
    true_pos = (truth & predicted_mask).sum(0)
    f1_macro, f1_micro = f1_scores(true_pos, predicted, positives)
    defined = ap[~ap.isnan()]
    mean_ap = defined.mean().item() if defined.numel() else float('nan')
    return MultiLabelMetrics(100 * mean_ap, 100 * f1_macro, 100 * f1_micro, (100 * ap).cpu(), positives.cpu(),
                             predicted.cpu(), true_pos.cpu())
