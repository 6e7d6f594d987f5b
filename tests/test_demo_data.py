"""The demo's data: scikit-learn's digits written as a reproducible ImageFolder split."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tools.prepare_digits import write_digits


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob('*.png')}


def test_digits_split_is_complete_disjoint_and_reproducible(tmp_path):
    counts = write_digits(str(tmp_path / 'a'), size=16, val_fraction=0.2, seed=0)
    write_digits(str(tmp_path / 'b'), size=16, val_fraction=0.2, seed=0)
    assert counts['train'] + counts['val'] == 1797 and 330 < counts['val'] < 390
    train = {Path(p).name for p in _files(tmp_path / 'a' / 'train')}
    val = {Path(p).name for p in _files(tmp_path / 'a' / 'val')}
    assert not train & val
    assert _files(tmp_path / 'a') == _files(tmp_path / 'b')
    assert sorted(p.name for p in (tmp_path / 'a' / 'train').iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / 'a' / 'val' / '3').iterdir()))
    assert image.size == (16, 16) and image.mode == 'RGB'
