"""Unreadable images never kill a run: skipped, replaced, named once, counted, bounded by MAX_BAD_FRACTION."""
from __future__ import annotations

import logging

import pytest
import torch

from data import build_loader
from test_data_common import data_config, jpeg_folder
from utils.errors import UserError


def _break(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if how == 'truncated' else data[:20] + b'\x00garbage' * 40)


@pytest.fixture
def damaged(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=4, val_per_class=2)  # 12 train images
    bad = [root / 'train' / 'class_0' / 'train_0_1.jpg', root / 'train' / 'class_2' / 'train_2_3.jpg']
    _break(bad[0], 'corrupt')
    _break(bad[1], 'truncated')
    return root, bad


@pytest.mark.parametrize('fast', [True, False])
def test_corrupt_and_truncated_training_images_are_replaced_named_once_and_counted(damaged, caplog, fast):
    root, bad = damaged
    cfg = data_config(root, **{'DATA.NUM_WORKERS': 2, 'DATA.MAX_BAD_FRACTION': 0.5, 'DATA.FAST_LOADER': fast})
    _, _, loader_train, _, _ = build_loader(cfg)
    with caplog.at_level(logging.WARNING, logger='data.loader'):
        for epoch in (0, 1):
            loader_train.set_epoch(epoch)
            batches = list(loader_train)
            assert [len(y) for _, y in batches] == [4, 4, 4]
            assert all(torch.isfinite(x).all() for x, _ in batches)
            assert loader_train.bad_images_this_epoch() >= 2  # each file is met at least once per epoch
    for path in bad:
        assert caplog.text.count(f'unreadable image skipped: {path}') == 1
    assert 'epoch 1:' in caplog.text and 'unreadable images were skipped' in caplog.text
    assert loader_train.bad_files == {str(p) for p in bad}


def test_more_unreadable_images_than_the_allowed_fraction_stop_the_run(damaged):
    root, _ = damaged  # 2 of 12 unreadable: more than 10%
    _, _, loader_train, _, _ = build_loader(data_config(root, **{'DATA.MAX_BAD_FRACTION': 0.1}))
    loader_train.set_epoch(0)
    with pytest.raises(UserError, match='DATA.MAX_BAD_FRACTION=0.1'):
        list(loader_train)


def test_a_training_set_with_nothing_readable_is_a_user_error(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    for path in (root / 'train').rglob('*.jpg'):
        _break(path, 'corrupt')
    _, _, loader_train, _, _ = build_loader(data_config(root, **{'DATA.MAX_BAD_FRACTION': 1.0}))
    loader_train.set_epoch(0)
    with pytest.raises(UserError, match='too many unreadable images'):
        list(loader_train)


def test_unreadable_validation_image_is_evaluated_once_as_black_with_its_label(tmp_path, caplog):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=2, size=32)
    _break(root / 'val' / 'class_1' / 'val_1_0.jpg', 'truncated')
    _, _, _, loader_val, _ = build_loader(data_config(root))
    with caplog.at_level(logging.WARNING, logger='data.loader'):
        batches = list(loader_val)
    samples, targets = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert targets.tolist() == [0, 0, 1, 1, 2, 2]
    black = (torch.zeros(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(samples[2], black.view(3, 1, 1).expand(3, 32, 32))
    assert caplog.text.count('val_1_0.jpg') == 1
