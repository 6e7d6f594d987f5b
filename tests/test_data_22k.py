"""The official ImageNet-22K layout: JSON lists of [relative_path, label] in DATA_PATH."""
from __future__ import annotations

import json

import pytest
import torch

from data import build_loader
from test_data_common import data_config, in22k_layout, jpeg_folder
from utils.errors import UserError


@pytest.fixture
def root(tmp_path):
    return in22k_layout(jpeg_folder(tmp_path, num_classes=3, train_per_class=3, val_per_class=2))


def test_22k_layout_reads_paths_and_labels_from_the_json_maps(root):
    cfg = data_config(root, **{'DATA.DATASET': 'imagenet22K'})
    dataset_train, dataset_val, loader_train, loader_val, _ = build_loader(cfg)
    assert (len(dataset_train), len(dataset_val), dataset_train.num_classes) == (9, 6, 3)
    assert dataset_train.classes is None  # the JSON layout has labels, not names
    assert torch.cat([y for _, y in loader_val]).tolist() == [0, 0, 1, 1, 2, 2]
    loader_train.set_epoch(0)
    assert [x.shape[0] for x, _ in loader_train] == [4, 4]


def test_22k_labels_beyond_the_model_head_are_a_user_error(root):
    entries = json.loads((root / 'ILSVRC2011fall_whole_map_train.txt').read_text())
    entries[0][1] = 7
    (root / 'ILSVRC2011fall_whole_map_train.txt').write_text(json.dumps(entries))
    with pytest.raises(UserError, match='8 classes but MODEL.NUM_CLASSES is 3'):
        build_loader(data_config(root, **{'DATA.DATASET': 'imagenet22K'}))


@pytest.mark.parametrize('content', [None, '{"not": "a list"}', '[["a.jpg"]]'])
def test_missing_or_malformed_22k_map_is_a_user_error_naming_it(root, content):
    path = root / 'ILSVRC2011fall_whole_map_val.txt'
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(UserError, match=str(path)):
        build_loader(data_config(root, **{'DATA.DATASET': 'imagenet22K'}))
