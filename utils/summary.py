"""summary.csv in the output folder: one row per finished epoch, to plot or compare runs without a log parser.

A resumed run replaces the rows of the epochs it redoes (the file keeps one row per epoch), and every
write replaces the whole file atomically, so a kill mid-write leaves the previous version.
"""
from __future__ import annotations

import csv
import os
from typing import Mapping, Optional

SUMMARY_NAME = 'summary.csv'
# multi-label runs (DATA.LABEL_FILE) fill val_map, val_f1_macro, val_f1_micro and ema_map instead of the accuracies
COLUMNS = ('epoch', 'lr', 'train_loss', 'val_loss', 'val_acc1', 'val_acc5', 'ema_acc1', 'images_per_second',
           'epoch_seconds', 'val_map', 'val_f1_macro', 'val_f1_micro', 'ema_map')


def read_summary(path: str) -> list[dict]:
    """The rows of a summary.csv (as strings); [] when there is none yet."""
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _cell(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.6g}'
    return str(value)


def write_summary_row(output_dir: str, row: Mapping[str, Optional[float]]) -> str:
    """Record epoch ``row['epoch']``: rows of that epoch and later ones (from a run that went further before
    it was resumed from an older checkpoint) are replaced. Missing columns stay empty. Returns the path."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"summary.csv has no column {sorted(unknown)}")
    path = os.path.join(output_dir, SUMMARY_NAME)
    epoch = int(row['epoch'])
    kept = [r for r in read_summary(path) if r.get('epoch', '').isdigit() and int(r['epoch']) < epoch]
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(kept)
        writer.writerow({name: _cell(row.get(name)) for name in COLUMNS})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
