"""Per-class results: the CSV files (accuracy and confusion matrix, or AP) on hand-checked cases, validate.py
--per-class, and tools.plot_run's PNG files."""
from __future__ import annotations

import csv
import logging

import pytest
import torch
from PIL import Image

from cli import write_tiny_config
from conftest import write_image_folder
from config import build_arg_parser, get_config, get_default_config
from engine import EvalOptions, evaluate
from utils.errors import UserError
from utils.metrics import MAX_CONFUSION_CLASSES, ClassCounter, ClassCounts
from utils.per_class import read_confusion, write_per_class
from utils.summary import write_summary_row


def _config(**keys):
    cfg = get_default_config()
    cfg.MODEL.NUM_CLASSES, cfg.PRINT_FREQ = 3, 10
    for key, value in keys.items():
        section, name = key.split('.')
        cfg[section][name] = value
    cfg.freeze()
    return cfg


def test_single_label_per_class_accuracy_and_confusion_matrix_by_hand(tmp_path):
    logits = torch.tensor([[3., 1., 0.], [1., 3., 0.], [0., 3., 1.], [0., 1., 3.], [3., 0., 1.]])
    targets = torch.tensor([0, 0, 1, 2, 2])  # predicted 0, 1, 1, 2, 0
    result = evaluate(_config(), [(logits, targets)], torch.nn.Identity(), torch.device('cpu'), None,
                      logging.getLogger('t'), EvalOptions.per_class(3, torch.device('cpu')))
    assert result.metrics['acc1'] == pytest.approx(60.0)
    paths = write_per_class(str(tmp_path), result.per_class, ['cat', 'dog'])  # the third output has no name
    assert paths == [str(tmp_path / 'per_class.csv'), str(tmp_path / 'confusion_matrix.csv')]
    assert (tmp_path / 'per_class.csv').read_text().splitlines() == [
        'index,class,images,correct,accuracy,predicted',
        '0,cat,2,1,50.0000,2',
        '1,dog,1,1,100.0000,2',
        '2,2,2,1,50.0000,1']
    assert (tmp_path / 'confusion_matrix.csv').read_text().splitlines() == [
        'true\\predicted,cat,dog,2', 'cat,1,1,0', 'dog,0,1,0', '2,1,0,1']
    assert read_confusion(paths[1]) == (['cat', 'dog', '2'], [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


def test_multilabel_per_class_ap_and_counts_by_hand(tmp_path):
    # class a: ranked T F T F -> AP = (1/1 + 2/3) / 2; predicted (logit >= 0) the first two: 1 true positive
    # class b: no positives and none predicted -> AP, precision, recall and F1 undefined (empty cells)
    logits = torch.tensor([[2., -1.], [1., -1.], [-1., -1.], [-2., -1.]])
    targets = torch.tensor([[1., 0.], [0., 0.], [1., 0.], [0., 0.]])
    cfg = _config(**{'MODEL.NUM_CLASSES': 2, 'DATA.LABEL_FILE': 'l.csv'})
    result = evaluate(cfg, [(logits, targets)], torch.nn.Identity(), torch.device('cpu'), None, logging.getLogger('t'))
    assert result.metrics['map'] == pytest.approx(100 * 5 / 6) and result.metrics['f1_macro'] == pytest.approx(25.0)
    write_per_class(str(tmp_path), result.per_class, ['a', 'b'])
    assert (tmp_path / 'per_class.csv').read_text().splitlines() == [
        'index,class,positives,predicted,true_positives,ap,precision,recall,f1',
        '0,a,2,2,1,83.3333,50.0000,50.0000,50.0000',
        '1,b,0,0,0,,,,']


def test_beyond_the_confusion_limit_only_the_per_class_counts_are_kept(tmp_path):
    counter = ClassCounter(MAX_CONFUSION_CLASSES + 1, torch.device('cpu'))
    counter.update(torch.tensor([0, 0]), torch.tensor([0, 2]))
    counts = counter.result()
    assert counts.matrix is None and counts.images[:3].tolist() == [1, 0, 1] and counts.predicted[0] == 2
    assert write_per_class(str(tmp_path), counts, None) == [str(tmp_path / 'per_class.csv')]
    assert (tmp_path / 'per_class.csv').read_text().splitlines()[2:4] == ['1,1,0,0,,0', '2,2,1,0,0.0000,0']


def test_validate_py_per_class_writes_each_checkpoints_files(tmp_path, one_torch_thread):
    from models import build_model
    from validate import cli
    data = write_image_folder(tmp_path / 'data', num_classes=3, train_per_class=1, val_per_class=3)
    cfg = write_tiny_config(tmp_path)
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(tmp_path / 'eval'), '--per-class']
    model_config = get_config(build_arg_parser().parse_args(args[:2]))
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save({'model': build_model(model_config).state_dict(), 'epoch': seed}, tmp_path / f'w{seed}.pth')
    assert cli([*args, '--checkpoints', str(tmp_path / 'w*.pth'), '--results-file', str(tmp_path / 'r.csv')]) == 0
    out = tmp_path / 'eval' / 'tiny_test' / 'default'
    with open(tmp_path / 'r.csv', newline='') as f:
        acc1 = {row['checkpoint'].split('/')[-1]: float(row['acc1']) for row in csv.DictReader(f)}
    for name in ('w0', 'w1'):
        with open(out / f'per_class-{name}.csv', newline='') as f:
            rows = list(csv.DictReader(f))
        assert [r['class'] for r in rows] == ['class_0', 'class_1', 'class_2'] and all(r['images'] == '3' for r in rows)
        assert 100 * sum(int(r['correct']) for r in rows) / 9 == pytest.approx(acc1[f'{name}.pth'], abs=1e-3)
        _, matrix = read_confusion(str(out / f'confusion_matrix-{name}.csv'))
        assert [sum(row) for row in matrix] == [3, 3, 3]
        assert [matrix[i][i] for i in range(3)] == [int(r['correct']) for r in rows]
    assert cli([*args, '--checkpoints', str(tmp_path / 'w0.pth')]) == 0  # one checkpoint: the plain names
    assert (out / 'per_class.csv').read_text() == (out / 'per_class-w0.csv').read_text()


def test_per_class_file_names_tell_checkpoints_of_the_same_name_apart():
    from validate import per_class_names
    assert per_class_names(['out/a.pth']) == {'out/a.pth': ''}
    assert per_class_names(['out/a.pth', 'out/b.pth']) == {'out/a.pth': 'a', 'out/b.pth': 'b'}
    assert per_class_names(['runs/x/model_best.pth', 'runs/y/model_best.pth']) == {
        'runs/x/model_best.pth': 'x_model_best', 'runs/y/model_best.pth': 'y_model_best'}


def test_plot_run_draws_the_curves_and_the_confusion_matrices_as_pngs(tmp_path, capsys):
    from tools.plot_run import CONFUSION_SIZE, CURVES_SIZE, DPI, main
    for epoch in range(3):
        write_summary_row(str(tmp_path), {'epoch': epoch, 'lr': 1e-3 / (epoch + 1), 'train_loss': 2.0 - epoch / 2,
                                          'val_loss': 2.1 - epoch / 2, 'val_acc1': 30.0 + 10 * epoch,
                                          'val_acc5': 70.0 + 10 * epoch})
    few = ClassCounts(torch.tensor([2, 2]), torch.tensor([2, 1]), torch.tensor([3, 1]), torch.tensor([[2, 0], [1, 1]]))
    write_per_class(str(tmp_path), few, ['cat', 'dog'])
    many = torch.eye(40, dtype=torch.int64) * 3  # 40 classes: indices on the axes
    write_per_class(str(tmp_path), ClassCounts(many.sum(1), many.diagonal(), many.sum(0), many), None, suffix='big')
    assert main([str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / name) for name in ('curves.png', 'confusion_matrix-big.png',
                                                         'confusion_matrix.png')]
    sizes = [CURVES_SIZE, CONFUSION_SIZE, CONFUSION_SIZE]
    for path, size in zip(written, sizes):
        with Image.open(path) as image:
            assert image.format == 'PNG' and image.size == (int(size[0] * DPI), int(size[1] * DPI))
            image.load()


def test_plot_run_with_nothing_to_plot_is_one_clear_error(tmp_path):
    from tools.plot_run import plot_run
    with pytest.raises(UserError, match='nothing to plot'):
        plot_run(str(tmp_path))
