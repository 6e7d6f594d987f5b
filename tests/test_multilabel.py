"""Multi-label data: the label file, multi-hot targets in both layouts, the binary cross-entropy (timm's on mixup
targets), and mAP / F1 equal to scikit-learn's on one process and on two with an uneven split."""
from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cli import fork_ranks, free_port, run_main, write_tiny_config
from config import get_default_config
from data import build_loader
from data.label_file import read_label_file
from data.mixup import MultiLabelMixup, mix_multilabel_targets
from engine import EvalOptions, validate, validate_multilabel
from losses import BinaryCrossEntropy
from test_data_common import data_config
from utils.distributed import cleanup
from utils.errors import UserError
from utils.metrics import ClassCounter
from utils.summary import read_summary

CLASSES = ('red', 'green', 'blue')


def write_multilabel_folder(root: Path, train: int = 8, val: int = 7, seed: int = 0, header: str = 'path,labels'):
    """root/train/*.png and root/val/*.png, each colour channel lit for the classes the image has, and
    root/labels.csv; returns (root, {split: multi-hot rows in file order})."""
    rng = np.random.default_rng(seed)
    lines, truth = [header], {}
    for split, count in (('train', train), ('val', val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        truth[split] = []
        for i in range(count):
            on = rng.random(3) < 0.5
            on[i % 3] = True  # every class has positives
            pixels = np.clip(np.where(on, 200, 20) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / f'{i}.png')
            lines.append(f'{split}/{i}.png,' + ';'.join(c for c, o in zip(CLASSES, on) if o))
            truth[split].append([float(o) for o in on])
    (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
    return root, truth


# ------------------------------------------------------------------------------------------ the label file

def test_classes_come_from_the_classes_file_else_the_header_else_the_sorted_labels(tmp_path):
    path = tmp_path / 'l.csv'
    path.write_text('image,cat dog bird\ntrain/a.jpg,dog;bird\nval/b.jpg,\ntest/c.jpg,cat\n')
    table = read_label_file(str(path))
    assert table.classes == ['cat', 'dog', 'bird']  # the header's order
    assert table.splits == {'train': [('a.jpg', (1, 2))], 'val': [('b.jpg', ())]}  # test/ rows ignored
    (tmp_path / 'classes.txt').write_text('bird\ndog\ncat\n')
    assert read_label_file(str(path), str(tmp_path / 'classes.txt')).splits['train'] == [('a.jpg', (0, 1))]
    path.write_text('path,labels\ntrain/a.jpg,dog cat\nval/b.jpg,cat\n')
    assert read_label_file(str(path)).classes == ['cat', 'dog']
    path.write_text('train/a.jpg,2 10\nval/b.jpg,0\n')  # no header, integer labels: classes 0..10
    table = read_label_file(str(path))
    assert len(table.classes) == 11 and table.splits['train'] == [('a.jpg', (2, 10))]


@pytest.mark.parametrize('text, message', [
    ('path,cat dog\ntrain/a.jpg,cow\n', r"l.csv:2: label 'cow' is not one of the 2 classes"),
    ('path,labels\na.jpg,cat\n', r"l.csv:2: the path 'a.jpg' must start with the split"),
    ('path,labels\ntrain/a.jpg,cat\n', r"l.csv: no rows of the val split"),
], ids=['unknown label', 'no split in the path', 'no validation rows'])
def test_a_bad_label_file_is_one_clear_error(tmp_path, text, message):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'l.csv').write_text(text)
    with pytest.raises(UserError, match=message):
        build_loader(data_config(tmp_path, **{'DATA.LABEL_FILE': 'l.csv'}))


def test_an_evaluation_needs_no_training_rows_or_images(tmp_path):
    import shutil
    root, _ = write_multilabel_folder(tmp_path, train=2, val=3)
    shutil.rmtree(root / 'train')
    lines = (root / 'labels.csv').read_text().splitlines()
    (root / 'labels.csv').write_text('\n'.join(line for line in lines if not line.startswith('train/')))
    _, dataset_val, _, loader_val, _ = build_loader(data_config(root, **{'DATA.LABEL_FILE': 'labels.csv',
                                                                         'EVAL_MODE': True}))
    assert len(dataset_val) == 3 and next(iter(loader_val))[1].shape == (3, 3)


def test_multilabel_data_refuse_the_single_label_loss():
    from config import _check_values
    cfg = get_default_config()
    cfg.DATA.LABEL_FILE, cfg.TRAIN.LOSS = 'labels.csv', 'ce'
    with pytest.raises(UserError, match='TRAIN.LOSS bce'):
        _check_values(cfg)


def test_folder_and_zip_layouts_give_the_same_multi_hot_targets(tmp_path):
    root, truth = write_multilabel_folder(tmp_path / 'folder')
    zipped = tmp_path / 'zip'
    zipped.mkdir()
    for split in ('train', 'val'):
        with zipfile.ZipFile(zipped / f'{split}.zip', 'w') as archive:
            for image in sorted((root / split).iterdir()):
                archive.write(image, image.name)
    batches = []
    for data, zip_mode in ((root, False), (zipped, True)):
        cfg = data_config(data, **{'DATA.LABEL_FILE': str(root / 'labels.csv'), 'DATA.ZIP_MODE': zip_mode,
                                   'TEST.SHUFFLE': False})
        dataset_train, dataset_val, _, loader_val, mixup_fn = build_loader(cfg)
        assert dataset_train.classes == sorted(CLASSES) and isinstance(mixup_fn, MultiLabelMixup)
        batches.append(list(loader_val))
    order = [sorted(CLASSES).index(c) for c in CLASSES]  # truth columns are in CLASSES order
    expected = torch.tensor(truth['val'])[:, order]
    for (x_folder, y_folder), (x_zip, y_zip) in zip(*batches):
        assert torch.equal(x_folder, x_zip) and torch.equal(y_folder, y_zip)
    targets = torch.cat([y for _, y in batches[0]])
    assert targets.dtype == torch.float32 and torch.equal(targets, expected)


# ------------------------------------------------------------------------------------------ the loss

def test_the_bce_loss_equals_timms_on_mixup_targets_and_on_smoothed_class_indices():
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy as TimmBCE
    torch.manual_seed(0)
    logits, images = torch.randn(8, 5), torch.randn(8, 3, 16, 16)
    np.random.seed(0)
    # single-label data: timm's Mixup smooths and mixes, the loss then gets smoothing 0 (timm's train.py)
    _, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)(
        images.clone(), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    assert torch.allclose(BinaryCrossEntropy()(logits, soft), TimmBCE(smoothing=0.0)(logits, soft))
    # multi-label data: our mixup of multi-hot targets, in each of timm's modes
    multi_hot = (torch.rand(8, 5) < 0.4).float()
    for mode in ('batch', 'pair', 'elem'):
        np.random.seed(1)
        _, mixed = MultiLabelMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5,
                                   mode=mode)(images.clone(), multi_hot)
        assert torch.allclose(BinaryCrossEntropy()(logits, mixed), TimmBCE(smoothing=0.0)(logits, mixed))
        assert mixed.min() >= 0.05 - 1e-6 and mixed.max() <= 0.95 + 1e-6  # smoothed towards 0.5
    # class indices smoothed (and a target threshold) as timm does
    indices = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for threshold in (None, 0.2):
        ours = BinaryCrossEntropy(smoothing=0.1, target_threshold=threshold)(logits, indices)
        assert torch.allclose(ours, TimmBCE(smoothing=0.1, target_threshold=threshold)(logits, indices))


def test_multilabel_mixup_targets_are_timms_where_timm_has_them():
    import inspect
    from timm.data.mixup import mixup_target
    if 'multi_label' not in inspect.signature(mixup_target).parameters:
        pytest.skip('this timm release has no multi-label mixup (added after 1.0.14)')
    multi_hot = (torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    for lam in (0.3, torch.rand(6, 1)):
        assert torch.allclose(mix_multilabel_targets(multi_hot, lam, 0.1),
                              mixup_target(multi_hot, 4, lam, 0.1, multi_label=True))


def test_train_loss_auto_is_bce_for_multilabel_data_and_the_official_loss_otherwise():
    from timm.loss import LabelSmoothingCrossEntropy
    from classification import build_criterion
    cfg = get_default_config()
    assert isinstance(build_criterion(cfg, None), LabelSmoothingCrossEntropy)
    cfg.DATA.LABEL_FILE = 'labels.csv'
    loss = build_criterion(cfg, None)
    assert isinstance(loss, BinaryCrossEntropy) and loss.smoothing == cfg.MODEL.LABEL_SMOOTHING
    assert build_criterion(cfg, object()).smoothing == 0.0  # mixup smooths its targets


# ------------------------------------------------------------------------------------------ the metrics

def _scores(n: int = 7, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, classes, generator=g) < 0.4).float()
    targets[torch.arange(classes) % n, torch.arange(classes)] = 1.0  # a positive in every class
    logits = torch.randint(-3, 4, (n, classes), generator=g).float() / 2  # ties included
    return logits, targets


def _sklearn(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict:
    from sklearn.metrics import average_precision_score, f1_score  # here: spawned ranks need not import it
    y, predicted = targets.numpy(), (torch.sigmoid(logits.double()) >= threshold).numpy()
    return {'map': 100 * average_precision_score(y, logits.numpy(), average='macro'),
            **{f'ap{i}': 100 * ap for i, ap in enumerate(average_precision_score(y, logits.numpy(), average=None))},
            'f1_macro': 100 * f1_score(y, predicted, average='macro', zero_division=0),
            'f1_micro': 100 * f1_score(y, predicted, average='micro', zero_division=0)}


def _multilabel_config(classes: int = 4, threshold: float = 0.5):
    cfg = get_default_config()
    cfg.MODEL.NUM_CLASSES, cfg.DATA.LABEL_FILE, cfg.TEST.THRESHOLD, cfg.PRINT_FREQ = classes, 'l.csv', threshold, 2
    cfg.freeze()
    return cfg


def _figures(metrics) -> dict:
    return {'map': metrics.map, 'f1_macro': metrics.f1_macro, 'f1_micro': metrics.f1_micro,
            **{f'ap{i}': ap for i, ap in enumerate(metrics.ap.tolist())}}


@pytest.mark.parametrize('threshold', [0.5, 0.3])
def test_map_and_f1_equal_scikit_learns_on_one_process(threshold):
    logits, targets = _scores(n=9)
    batches = [(logits[i:i + 4], targets[i:i + 4]) for i in range(0, 9, 4)]
    metrics, loss = validate_multilabel(_multilabel_config(threshold=threshold), batches, torch.nn.Identity(),
                                        torch.device('cpu'), None, logging.getLogger('t'))
    assert _figures(metrics) == pytest.approx(_sklearn(logits, targets, threshold), abs=1e-9)
    assert loss == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())


def test_map_averages_the_classes_with_positives_only():
    logits, targets = _scores()
    targets[:, 3] = 0.0
    metrics, _ = validate_multilabel(_multilabel_config(), [(logits, targets)], torch.nn.Identity(),
                                     torch.device('cpu'), None, logging.getLogger('t'))
    assert np.isnan(metrics.ap[3].item())
    assert metrics.map == pytest.approx(_sklearn(logits[:, :3], targets[:, :3])['map'])


def _single_label(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tie-free logits and class indices for the single-label counts."""
    return logits + 0.001 * torch.arange(logits.shape[1]), targets.argmax(1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Rank r evaluates images r, r + 2, ... of 7 (as ValShardSampler shards): 4 on rank 0, 3 on rank 1."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    logits, targets = _scores()
    mine = slice(rank, None, 2)
    metrics, loss = validate_multilabel(_multilabel_config(), [(logits[mine], targets[mine])], torch.nn.Identity(),
                                        torch.device('cpu'), None, logging.getLogger(f'rank{rank}'))
    counter, single = ClassCounter(4, torch.device('cpu')), _single_label(logits, targets)
    validate(_multilabel_config(), [(single[0][mine], single[1][mine])], torch.nn.Identity(), torch.device('cpu'),
             None, logging.getLogger(f"rank{rank}"), EvalOptions(class_counter=counter))
    counts = counter.result()
    with open(f'{out_dir}/{rank}.json', 'w') as f:
        json.dump({**_figures(metrics), 'loss': loss, 'matrix': counts.matrix.tolist(),
                   'correct': counts.correct.tolist()}, f)
    cleanup()


def test_two_processes_with_an_uneven_split_give_scikit_learns_figures_and_exact_counts(tmp_path):
    fork_ranks(_worker, (free_port(), str(tmp_path)))
    logits, targets = _scores()
    expected = _sklearn(logits, targets)
    single, truth = _single_label(logits, targets)
    predicted = single.argmax(1)
    matrix = torch.zeros(4, 4, dtype=torch.int64).index_put_((truth, predicted), torch.tensor(1), accumulate=True)
    for rank in (0, 1):  # every rank has the whole set's figures
        got = json.loads((tmp_path / f'{rank}.json').read_text())
        assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9)
        assert got['loss'] == pytest.approx(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())
        assert got['matrix'] == matrix.tolist() and got['correct'] == matrix.diagonal().tolist()


# ------------------------------------------------------------------------------------------ a whole run

@pytest.fixture(scope='module')
def multilabel_run(tmp_path_factory):
    """main.py on multi-label data with mixup and --per-class, 2 epochs: (its output folder, its log)."""
    root = tmp_path_factory.mktemp('multilabel')
    data, _ = write_multilabel_folder(root / 'data')
    result = run_main(['--cfg', str(write_tiny_config(root)), '--data-path', str(data), '--output', str(root / 'out'),
                       '--per-class', '--opts', 'DATA.LABEL_FILE', 'labels.csv', 'AUG.MIXUP', '0.8'], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / 'out' / 'tiny_test' / 'default'
    return out, (out / 'log_rank0.txt').read_text()


def test_main_trains_on_multilabel_data_and_writes_map_f1_and_per_class_ap(multilabel_run):
    out, log = multilabel_run
    lines = re.findall(r' \* mAP ([\d.]+) F1-macro ([\d.]+) F1-micro ([\d.]+) \(threshold 0.5\)', log)
    assert len(lines) == 2 and 'Acc@1' not in log
    assert 'mAP of the network on the 7 test images' in log and 'Max mAP' in log
    rows = read_summary(str(out / 'summary.csv'))
    assert [float(r['val_map']) for r in rows] == pytest.approx([float(m) for m, _, _ in lines], abs=1e-3)
    assert all(r['val_acc1'] == '' and r['val_f1_micro'] != '' for r in rows)
    per_class = (out / 'per_class.csv').read_text().splitlines()
    assert per_class[0] == 'index,class,positives,predicted,true_positives,ap,precision,recall,f1'
    assert [line.split(',')[1] for line in per_class[1:]] == sorted(CLASSES)
    assert not (out / 'confusion_matrix.csv').exists()  # single-label data only
    assert torch.load(out / 'ckpt_epoch_1.pth', weights_only=False)['max_accuracy'] == pytest.approx(
        max(float(m) for m, _, _ in lines), abs=1e-3)


def test_plot_run_draws_the_multilabel_curves(multilabel_run):
    from tools.plot_run import CURVES_SIZE, DPI, plot_run
    out, _ = multilabel_run
    assert plot_run(str(out)) == [str(out / 'curves.png')]
    with Image.open(out / 'curves.png') as image:
        assert image.size == (int(CURVES_SIZE[0] * DPI), int(CURVES_SIZE[1] * DPI))
