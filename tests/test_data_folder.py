"""build_loader on the image-folder layout: batches, classes, and the errors a user can fix."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from data import build_loader
from test_data_common import data_config, jpeg_folder
from utils.errors import UserError


def test_folder_layout_yields_normalised_training_batches_without_a_partial_one(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=3, val_per_class=2)  # 9 train images
    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(data_config(root))
    assert dataset_train.classes == ['class_0', 'class_1', 'class_2']
    assert (len(dataset_train), len(dataset_val), len(loader_train)) == (9, 6, 2)
    loader_train.set_epoch(0)
    batches = list(loader_train)
    assert [x.shape for x, _ in batches] == [torch.Size([4, 3, 32, 32])] * 2
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert -3 < float(batches[0][0].mean()) < 3 and float(batches[0][0].min()) < 0  # normalised, not 0..255
    assert mixup_fn is not None  # the official recipe has mixup and cutmix on


def test_validation_keeps_the_last_partial_batch_and_the_folder_order(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=2)
    _, dataset_val, _, loader_val, _ = build_loader(data_config(root))
    targets = torch.cat([y for _, y in loader_val])
    assert targets.tolist() == [0, 0, 1, 1, 2, 2] == dataset_val.targets
    assert [len(y) for _, y in loader_val] == [4, 2]


def test_mixup_is_none_when_mixup_and_cutmix_are_off(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    assert build_loader(data_config(root, **{'AUG.MIXUP': 0.0, 'AUG.CUTMIX': 0.0}))[4] is None


def test_odd_batch_size_with_mixup_is_a_user_error(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    with pytest.raises(UserError, match='BATCH_SIZE'):
        build_loader(data_config(root, **{'DATA.BATCH_SIZE': 3}))


def test_odd_batch_size_with_mixup_is_fine_when_not_training(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    for mode in ('EVAL_MODE', 'THROUGHPUT_MODE'):
        *_, loader_val, mixup_fn = build_loader(data_config(root, **{'DATA.BATCH_SIZE': 3, mode: True}))
        assert mixup_fn is None and [len(y) for _, y in loader_val] == [3]


def test_more_classes_than_the_model_has_is_a_user_error(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=4, train_per_class=2, val_per_class=1)
    with pytest.raises(UserError, match='4 classes but MODEL.NUM_CLASSES is 3'):
        build_loader(data_config(root))


def test_fewer_classes_than_the_model_has_is_a_warning(tmp_path, caplog):
    root = jpeg_folder(tmp_path, num_classes=2, train_per_class=4, val_per_class=1)
    with caplog.at_level(logging.WARNING, logger='data.build'):
        build_loader(data_config(root))
    assert 'has 2 classes, fewer than MODEL.NUM_CLASSES=3' in caplog.text


def test_validation_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    shutil.rmtree(root / 'val' / 'class_1')
    _, dataset_val, *_ = build_loader(data_config(root))
    assert dataset_val.targets == [0, 2]


@pytest.mark.parametrize('case', ['unset', 'missing', 'empty', 'no_train', 'no_val', 'no_images'])
def test_unusable_data_path_is_a_user_error_naming_the_path(tmp_path, case):
    root = jpeg_folder(tmp_path / 'data', num_classes=3, train_per_class=2, val_per_class=1)
    expected = str(root)
    if case == 'unset':
        root, expected = '', 'DATA.DATA_PATH is not set'
    elif case == 'missing':
        root = expected = str(tmp_path / 'nowhere')
    elif case == 'empty':
        (tmp_path / 'empty').mkdir()
        root = expected = str(tmp_path / 'empty')
    elif case in ('no_train', 'no_val'):
        split = case[3:]
        shutil.rmtree(root / split)
        expected = str(root / split)
    else:
        for image in (root / 'train').rglob('*.jpg'):
            image.unlink()
        expected = str(root / 'train')
    with pytest.raises(UserError) as info:
        build_loader(data_config(root))
    assert expected in str(info.value)


def test_eval_mode_builds_the_training_set_without_listing_its_files(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    dataset_train, dataset_val, loader_train, _, _ = build_loader(data_config(root, EVAL_MODE=True))
    assert dataset_train.known_num_classes() == 3 and dataset_train._samples is None
    assert len(dataset_val) == 3 and len(dataset_train) == 6  # listed on first use
