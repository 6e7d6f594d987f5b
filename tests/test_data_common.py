"""Helpers shared by the data tests (tiny layouts written on the fly), plus checks of the helpers' layouts."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from conftest import write_image_folder

from config import get_default_config


def data_config(root, **overrides):
    """A frozen config for tiny images: 32 px, batch 4, no workers, 3 classes; ``overrides`` as 'DATA.X': v."""
    cfg = get_default_config()
    cfg.DATA.DATA_PATH = str(root)
    cfg.DATA.IMG_SIZE = 32
    cfg.DATA.BATCH_SIZE = 4
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.PIN_MEMORY = False
    cfg.MODEL.NUM_CLASSES = 3
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split('.')
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    cfg.freeze()
    return cfg


def jpeg_folder(root, **kwargs) -> Path:
    """root/train/class_c/*.jpg and root/val/class_c/*.jpg (48 px by default)."""
    kwargs.setdefault('size', 48)
    return write_image_folder(root, ext='jpg', **kwargs)


def split_files(root: Path, split: str) -> list[tuple[str, int]]:
    """(path relative to root/split, label) in the order an image folder lists them."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    return [(f'{name}/{f.name}', label) for label, name in enumerate(classes)
            for f in sorted((root / split / name).iterdir())]


def zip_layout(folder_root: Path, out: Path) -> Path:
    """The official zip layout (train.zip + train_map.txt, val.zip + val_map.txt) of an image folder."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ('train', 'val'):
        entries = split_files(folder_root, split)
        with zipfile.ZipFile(out / f'{split}.zip', 'w') as archive:
            for rel, _ in entries:
                archive.write(folder_root / split / rel, rel)
        (out / f'{split}_map.txt').write_text(''.join(f'{rel}\t{label}\n' for rel, label in entries))
    return out


def in22k_layout(folder_root: Path) -> Path:
    """The official ImageNet-22K map files (JSON lists of [path relative to root, label]) next to a folder."""
    for split in ('train', 'val'):
        entries = [[f'{split}/{rel}', label] for rel, label in split_files(folder_root, split)]
        (folder_root / f'ILSVRC2011fall_whole_map_{split}.txt').write_text(json.dumps(entries))
    return folder_root


def test_zip_layout_lists_every_image_of_the_folder(tmp_path):
    root = jpeg_folder(tmp_path / 'folder', num_classes=2, train_per_class=2, val_per_class=1)
    out = zip_layout(root, tmp_path / 'zip')
    assert len(zipfile.ZipFile(out / 'train.zip').namelist()) == 4
    assert (out / 'val_map.txt').read_text().splitlines()[1] == 'class_1/val_1_0.jpg\t1'
    assert os.path.exists(in22k_layout(root) / 'ILSVRC2011fall_whole_map_val.txt')
