"""benchmarks/photo_set.py writes a small, reproducible ImageFolder of real photos with a leak-free val split."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
pytest.importorskip('skimage', reason='the photo set is cut from the photos bundled with scikit-image')

from benchmarks.photo_set import GRID, PHOTOS, crop_box, split_cells, write_photo_set  # noqa: E402


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*.jpg'))}


def test_writes_train_and_val_folders_of_rgb_squares_per_class(tmp_path):
    counts = write_photo_set(tmp_path, classes=3, train_per_class=4, val_per_class=2, size=32)
    assert counts == {'train': 12, 'val': 6}
    for split, per_class in (('train', 4), ('val', 2)):
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == sorted(name for name, _ in PHOTOS[:3])
        for name in classes:
            files = list((tmp_path / split / name).glob('*.jpg'))
            assert len(files) == per_class
            with Image.open(files[0]) as img:
                assert img.size == (32, 32) and img.mode == 'RGB'


def test_same_seed_gives_identical_files_and_another_seed_different_ones(tmp_path):
    args = dict(classes=2, train_per_class=3, val_per_class=2, size=24)
    write_photo_set(tmp_path / 'a', seed=0, **args)
    write_photo_set(tmp_path / 'b', seed=0, **args)
    write_photo_set(tmp_path / 'c', seed=1, **args)
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')


def test_val_crops_lie_in_cells_that_training_crops_never_touch():
    rng = np.random.default_rng(0)
    cells = split_cells(rng)
    assert not set(cells['train']) & set(cells['val'])
    assert len(cells['train']) + len(cells['val']) == GRID * GRID
    width, height = 451, 300  # chelsea.png, the least square photo
    cell_w, cell_h = width // GRID, height // GRID
    for cell in cells['train'] + cells['val']:
        for _ in range(50):
            left, top, right, bottom = crop_box(width, height, cell, rng)
            assert right - left == bottom - top > 0
            assert cell[1] * cell_w <= left and right <= (cell[1] + 1) * cell_w
            assert cell[0] * cell_h <= top and bottom <= (cell[0] + 1) * cell_h


def test_asking_for_more_classes_than_bundled_photos_is_refused(tmp_path):
    with pytest.raises(ValueError, match='classes must be between'):
        write_photo_set(tmp_path, classes=len(PHOTOS) + 1)
