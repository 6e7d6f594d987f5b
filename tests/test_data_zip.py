"""The official zip layout (train.zip + train_map.txt, ...) with each cache mode."""
from __future__ import annotations

import pytest
import torch

from data import build_dataset, build_loader
from data.build import build_train_sampler
from test_data_common import data_config, jpeg_folder, zip_layout
from utils.errors import UserError


@pytest.fixture
def layouts(tmp_path):
    folder = jpeg_folder(tmp_path / 'folder', num_classes=3, train_per_class=3, val_per_class=3)
    return folder, zip_layout(folder, tmp_path / 'zip')


@pytest.mark.parametrize('cache_mode', ['no', 'full', 'part'])
def test_zip_layout_trains_in_every_cache_mode(layouts, cache_mode):
    _, zipped = layouts
    cfg = data_config(zipped, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': cache_mode, 'DATA.NUM_WORKERS': 1})
    dataset_train, dataset_val, loader_train, _, _ = build_loader(cfg)
    assert dataset_train.classes == ['class_0', 'class_1', 'class_2']  # from the paths in the map
    assert (len(dataset_train), len(dataset_val), len(loader_train)) == (9, 9, 2)
    loader_train.set_epoch(0)
    targets = torch.cat([y for _, y in loader_train])
    assert len(targets) == 8 and set(targets.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize('fast', [True, False])
def test_zip_and_folder_layouts_give_identical_evaluation_batches(layouts, fast):
    folder, zipped = layouts
    batches = []
    for root, zip_mode in ((folder, False), (zipped, True)):
        cfg = data_config(root, **{'DATA.ZIP_MODE': zip_mode, 'DATA.IMG_SIZE': 40, 'DATA.FAST_LOADER': fast})
        batches.append(list(build_loader(cfg)[3]))
    assert len(batches[0]) == len(batches[1]) == 3
    for (x_folder, y_folder), (x_zip, y_zip) in zip(*batches):
        assert torch.equal(x_folder, x_zip) and torch.equal(y_folder, y_zip)


def test_part_cache_holds_and_samples_only_the_ranks_own_shard(layouts):
    _, zipped = layouts  # 9 training images: shards of 5 (rank 0) and 4 (rank 1)
    cfg = data_config(zipped, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'part'})
    drawn = []
    for rank in (0, 1):
        dataset, _ = build_dataset(True, cfg, rank=rank, world=2)
        assert dataset._cache.cached_indices() == list(range(rank, 9, 2))
        sampler = build_train_sampler(cfg, dataset, rank, 2)
        sampler.set_epoch(3)
        drawn.append(list(sampler))
        assert set(drawn[-1]) == set(range(rank, 9, 2))
    assert len(drawn[0]) == len(drawn[1]) == 5  # equal step counts on every rank


def test_full_cache_serves_every_image_without_the_archive(layouts, tmp_path):
    _, zipped = layouts
    cfg = data_config(zipped, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'full', 'DATA.MAX_BAD_FRACTION': 0.0})
    _, _, loader_train, _, _ = build_loader(cfg)
    (zipped / 'train.zip').rename(tmp_path / 'moved.zip')
    loader_train.set_epoch(0)
    assert sum(len(y) for _, y in loader_train) == 8 and loader_train.bad_images_this_epoch() == 0


def test_eval_mode_does_not_cache_the_training_archive(layouts):
    _, zipped = layouts
    cfg = data_config(zipped, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'full', 'EVAL_MODE': True})
    dataset_train, dataset_val, *_ = build_loader(cfg)
    assert dataset_train.cache_mode == 'no' and dataset_val.cache_mode == 'full'


def test_malformed_map_line_is_a_user_error_naming_file_and_line(layouts):
    _, zipped = layouts
    lines = (zipped / 'train_map.txt').read_text().splitlines()
    lines[2] = lines[2].replace('\t', ' ')
    (zipped / 'train_map.txt').write_text('\n'.join(lines) + '\n')
    with pytest.raises(UserError, match=r'train_map.txt:3'):
        build_loader(data_config(zipped, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'no'}))


def test_missing_archive_is_a_user_error_naming_it(layouts):
    _, zipped = layouts
    (zipped / 'val.zip').unlink()
    with pytest.raises(UserError, match=str(zipped / 'val.zip')):
        build_loader(data_config(zipped, **{'DATA.ZIP_MODE': True}))
