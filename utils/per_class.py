"""Per-class results as CSV files in the output folder (TEST.PER_CLASS, ``--per-class``), read back by
``tools.plot_run``.

* ``per_class.csv``, single-label data: ``index,class,images,correct,accuracy,predicted`` (accuracy: top-1, in
  percent, of the images of that class; predicted: images predicted as it). Multi-label data:
  ``index,class,positives,predicted,true_positives,ap,precision,recall,f1`` (percent; predictions at
  TEST.THRESHOLD; an empty cell where a figure is undefined, e.g. AP without positives).
* ``confusion_matrix.csv``, single-label data up to utils.metrics.MAX_CONFUSION_CLASSES classes: a header
  ``true\\predicted,<class>,...``, then one row per true class: its name and how many of its images were
  predicted as each class.

A name ``suffix`` (validate.py with several checkpoints) gives ``per_class-<suffix>.csv`` and
``confusion_matrix-<suffix>.csv``. Each file is replaced atomically.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Optional, Sequence, Union

from utils.metrics import ClassCounts, MultiLabelMetrics

PER_CLASS_NAME = 'per_class.csv'
CONFUSION_NAME = 'confusion_matrix.csv'
CONFUSION_CORNER = 'true\\predicted'


def class_names(classes: Optional[Sequence[str]], count: int) -> list[str]:
    """A name for each of ``count`` model outputs: the data's class name, else the index."""
    classes = list(classes or [])
    return [classes[i] if i < len(classes) else str(i) for i in range(count)]


def _file(output_dir: str, name: str, suffix: str) -> str:
    stem, ext = os.path.splitext(name)
    return os.path.join(output_dir, f'{stem}-{suffix}{ext}' if suffix else name)


def _write_rows(path: str, rows: list[list]) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def _cell(value: float) -> str:
    return '' if math.isnan(value) else f'{value:.4f}'


def _ratio(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else float('nan')


def single_label_rows(counts: ClassCounts, names: Sequence[str]) -> list[list]:
    rows = [['index', 'class', 'images', 'correct', 'accuracy', 'predicted']]
    for i, name in enumerate(names):
        images, correct = int(counts.images[i]), int(counts.correct[i])
        rows.append([i, name, images, correct, _cell(_ratio(correct, images)), int(counts.predicted[i])])
    return rows


def multi_label_rows(metrics: MultiLabelMetrics, names: Sequence[str]) -> list[list]:
    rows = [['index', 'class', 'positives', 'predicted', 'true_positives', 'ap', 'precision', 'recall', 'f1']]
    for i, name in enumerate(names):
        pos, pred, tp = int(metrics.positives[i]), int(metrics.predicted[i]), int(metrics.true_positives[i])
        rows.append([i, name, pos, pred, tp, _cell(float(metrics.ap[i])), _cell(_ratio(tp, pred)),
                     _cell(_ratio(tp, pos)), _cell(_ratio(2 * tp, pos + pred))])
    return rows


def write_per_class(output_dir: str, result: Union[ClassCounts, MultiLabelMetrics], classes: Optional[Sequence[str]],
                    suffix: str = '') -> list[str]:
    """Write ``result``'s per-class CSV (and the confusion matrix where kept); returns the paths written."""
    if isinstance(result, MultiLabelMetrics):
        names = class_names(classes, len(result.ap))
        paths = [_file(output_dir, PER_CLASS_NAME, suffix)]
        _write_rows(paths[0], multi_label_rows(result, names))
        return paths
    names = class_names(classes, len(result.images))
    paths = [_file(output_dir, PER_CLASS_NAME, suffix)]
    _write_rows(paths[0], single_label_rows(result, names))
    if result.matrix is not None:
        paths.append(_file(output_dir, CONFUSION_NAME, suffix))
        _write_rows(paths[1], [[CONFUSION_CORNER, *names]] +
                    [[name, *row] for name, row in zip(names, result.matrix.tolist())])
    return paths


def read_confusion(path: str) -> tuple[list[str], list[list[int]]]:
    """``(class names, matrix rows)`` of a confusion_matrix CSV."""
    with open(path, newline='') as f:
        header, *rows = list(csv.reader(f))
    if not header or header[0] != CONFUSION_CORNER or any(len(row) != len(header) for row in rows) or \
            len(rows) != len(header) - 1:
        raise ValueError(f"{path}: not a confusion matrix written by utils/per_class.py")
    return header[1:], [[int(v) for v in row[1:]] for row in rows]
