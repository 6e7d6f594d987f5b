"""Draw a run's training curves and confusion matrices as PNG files, next to the CSV files they come from.

    python -m tools.plot_run output/swin_tiny_patch4_window7_224/default

* ``curves.png`` from ``summary.csv`` (one row per epoch, utils/summary.py): the training and validation loss,
  the learning rate, and Acc@1 / Acc@5 (EMA Acc@1 where kept), or for multi-label runs mAP and the macro / micro
  F1, per epoch.
* ``confusion_matrix*.png`` from each ``confusion_matrix*.csv`` (utils/per_class.py, ``--per-class``): each row
  (true class) coloured by the share of its images predicted as each class, with a colour bar; the counts are
  written in the cells and the class names on the axes when there are few classes, indices otherwise.

Needs matplotlib (drawn off-screen, with the Agg backend: no display needed).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Optional, Sequence

from utils.errors import UserError, exit_status
from utils.per_class import CONFUSION_NAME, read_confusion
from utils.summary import SUMMARY_NAME, read_summary

CURVES_NAME = 'curves.png'
CURVES_SIZE = (15.0, 4.5)  # inches, at DPI dots per inch
CONFUSION_SIZE = (8.0, 7.0)
DPI = 100
NAMES_UP_TO = 30  # classes named on the confusion axes up to this many (indices beyond)
COUNTS_UP_TO = 15  # counts written in the cells up to this many classes

# (column, legend) per panel; a panel's columns without any value are left out
_ACCURACY = (('val_acc1', 'Acc@1'), ('val_acc5', 'Acc@5'), ('ema_acc1', 'EMA Acc@1'))
_MULTILABEL = (('val_map', 'mAP'), ('val_f1_macro', 'F1 macro'), ('val_f1_micro', 'F1 micro'), ('ema_map', 'EMA mAP'))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("tools.plot_run needs matplotlib: pip install matplotlib") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt



def _series(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    """The epochs where ``column`` has a value, and the values."""
    points = [(int(r['epoch']), float(r[column])) for r in rows if r.get(column) not in (None, '')]
    return [e for e, _ in points], [v for _, v in points]


def _panel(axis, rows: list[dict], columns: Sequence[tuple[str, str]], title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported (_pyplot) before any panel is drawn
    drawn = 0
    for column, legend in columns:
        epochs, values = _series(rows, column)
        if epochs:
            axis.plot(epochs, values, marker='o' if len(epochs) < 30 else None, markersize=3, label=legend)
            drawn += 1
    axis.set_title(title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel('epoch')
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if drawn:
        axis.legend()
    else:
        axis.text(0.5, 0.5, 'no values', ha='center', va='center', transform=axis.transAxes)


def plot_curves(summary_path: str, out_path: str) -> str:
    """Draw ``summary_path``'s loss, learning rate and accuracy (or mAP / F1) per epoch into ``out_path``."""
    rows = [r for r in read_summary(summary_path) if r.get('epoch', '').isdigit()]
    if not rows:
        raise UserError(f"{summary_path}: no epochs recorded yet")
    plt = _pyplot()
    figure, (loss, lr, score) = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=DPI)
    _panel(loss, rows, (('train_loss', 'training'), ('val_loss', 'validation')), 'Loss', 'loss')
    _panel(lr, rows, (('lr', 'largest of the parameter groups'),), 'Learning rate (end of epoch)', 'learning rate')
    multilabel = bool(_series(rows, 'val_map')[0])
    _panel(score, rows, _MULTILABEL if multilabel else _ACCURACY,
           'Validation mAP and F1' if multilabel else 'Validation accuracy', 'percent')
    run = os.path.dirname(os.path.abspath(summary_path))
    figure.suptitle(f"{os.path.basename(os.path.dirname(run))}/{os.path.basename(run)}: {len(rows)} epochs")
    figure.tight_layout()
    figure.savefig(out_path, dpi=DPI)
    plt.close(figure)
    return out_path


def plot_confusion(csv_path: str, out_path: str) -> str:
    """Draw the confusion matrix of ``csv_path`` into ``out_path`` (see the module docstring)."""
    names, matrix = read_confusion(csv_path)
    count = len(names)
    shares = [[v / max(sum(row), 1) for v in row] for row in matrix]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=CONFUSION_SIZE, dpi=DPI)
    image = axis.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
    figure.colorbar(image, ax=axis, label='share of the true class')
    if count <= NAMES_UP_TO:
        long_names = max(map(len, names)) > 3
        axis.set_xticks(range(count), names, rotation=45 if long_names else 0, ha='right' if long_names else 'center')
        axis.set_yticks(range(count), names)
    if count <= COUNTS_UP_TO:
        for t, row in enumerate(matrix):
            for p, value in enumerate(row):
                axis.text(p, t, str(value), ha='center', va='center', fontsize=10,
                          color='white' if shares[t][p] > 0.5 else 'black')
    total, correct = sum(map(sum, matrix)), sum(matrix[i][i] for i in range(count))
    axis.set_xlabel('predicted class' + ('' if count <= NAMES_UP_TO else ' (index)'))
    axis.set_ylabel('true class' + ('' if count <= NAMES_UP_TO else ' (index)'))
    accuracy = f"{100 * correct / total:.1f}%" if total else 'n/a'
    axis.set_title(f"Confusion matrix: {count} classes, {total} images, accuracy {accuracy}")
    figure.tight_layout()
    figure.savefig(out_path, dpi=DPI)
    plt.close(figure)
    return out_path


def plot_run(output_dir: str) -> list[str]:
    """Every plot ``output_dir``'s CSV files allow; returns the PNG paths written."""
    if not os.path.isdir(output_dir):
        raise UserError(f"run folder not found: {output_dir}")
    written = []
    summary = os.path.join(output_dir, SUMMARY_NAME)
    if os.path.isfile(summary):
        written.append(plot_curves(summary, os.path.join(output_dir, CURVES_NAME)))
    stem = os.path.splitext(CONFUSION_NAME)[0]
    for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), f'{stem}*.csv'))):
        try:
            written.append(plot_confusion(path, os.path.splitext(path)[0] + '.png'))
        except ValueError as e:
            raise UserError(str(e)) from None
    if not written:
        raise UserError(f"{output_dir}: nothing to plot (no {SUMMARY_NAME} or {CONFUSION_NAME})")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser('Plot a run: training curves and confusion matrices as PNG files')
    parser.add_argument('output_dir', help="a run's output folder (with summary.csv, confusion_matrix.csv)")
    args = parser.parse_args(argv)
    return exit_status(lambda: print('\n'.join(plot_run(args.output_dir))))


if __name__ == '__main__':
    sys.exit(main())
