"""A small real photo set as an ImageFolder, cut from the photos bundled inside scikit-image.

Each class is one real photograph (astronaut, cat, coffee cup, rocket, motorcycle, ...); its samples
are square crops of that photograph at varied scale and position, lightly flipped and re-coloured,
resized to ``size`` pixels and saved as JPEG. Every photograph is divided into a 3 x 3 grid of cells
and two cells (chosen by the seed) are kept for validation only, so a validation image never shares
a pixel with a training image: the task is to recognise *unseen parts* of a scene, which a small
network learns well but not perfectly in a few dozen epochs.

    python benchmarks/photo_set.py OUT_DIR [--classes 5] [--train-per-class 80] [--val-per-class 40]

The photographs ship inside the scikit-image wheel (``skimage/data/*.png|jpg``) and are read
straight from there: nothing is downloaded, at install or at run time.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Bundled files, colour photographs first; class folder name -> file under skimage/data.
PHOTOS: tuple[tuple[str, str], ...] = (
    ('astronaut', 'astronaut.png'), ('cat', 'chelsea.png'), ('coffee', 'coffee.png'),
    ('rocket', 'rocket.jpg'), ('motorcycle', 'motorcycle_left.png'), ('tissue', 'ihc.png'),
    ('galaxies', 'hubble_deep_field.jpg'), ('retina', 'retina.jpg'), ('cameraman', 'camera.png'),
    ('brick', 'brick.png'), ('grass', 'grass.png'), ('gravel', 'gravel.png'), ('coins', 'coins.png'),
    ('moon', 'moon.png'),
)
GRID = 3       # the photo is cut into GRID x GRID cells ...
VAL_CELLS = 2  # ... of which this many are validation-only


def skimage_data_dir() -> Path:
    """The folder of photographs inside the installed scikit-image package."""
    spec = importlib.util.find_spec('skimage')
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the photo set needs scikit-image (pip install scikit-image); "
                          "its photographs ship inside the package")
    return Path(list(spec.submodule_search_locations)[0]) / 'data'


def load_photo(name: str) -> Image.Image:
    """One bundled photograph as an RGB image (grey ones are replicated to three channels)."""
    path = skimage_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in this scikit-image install")
    with Image.open(path) as img:
        return img.convert('RGB')


def split_cells(rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """Grid cells (row, col) of one photograph, split into disjoint train and val sets."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = rng.permutation(len(cells))
    return {'val': [cells[i] for i in order[:VAL_CELLS]], 'train': [cells[i] for i in order[VAL_CELLS:]]}


def crop_box(width: int, height: int, cell: tuple[int, int],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square lying entirely inside one grid cell of a ``width`` x
    ``height`` photo, its side 50-100% of the cell's short side."""
    cell_w, cell_h = width // GRID, height // GRID
    side = max(8, int(min(cell_w, cell_h) * rng.uniform(0.5, 1.0)))
    left = cell[1] * cell_w + int(rng.integers(0, cell_w - side + 1))
    top = cell[0] * cell_h + int(rng.integers(0, cell_h - side + 1))
    return left, top, left + side, top + side


def jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild photometric variety (flip, brightness, contrast, saturation, sometimes grey) so that a
    class is not identified by one exact colour histogram."""
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.15:
        img = ImageOps.grayscale(img).convert('RGB')
    return img


def write_photo_set(out_dir: str | os.PathLike, classes: int = 5, train_per_class: int = 80,
                    val_per_class: int = 40, size: int = 64, seed: int = 0) -> dict[str, int]:
    """Write ``out_dir/{train,val}/<class>/*.jpg``; returns the number of images written per split.

    The same arguments always give the same files. Train and val crops come from disjoint grid cells
    of each photograph, so validation measures generalisation, not memorisation.
    """
    if not 1 <= classes <= len(PHOTOS):
        raise ValueError(f"classes must be between 1 and {len(PHOTOS)}, got {classes}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = {'train': 0, 'val': 0}
    for label, file_name in PHOTOS[:classes]:
        photo = load_photo(file_name)
        cells = split_cells(rng)
        for split, count in (('train', train_per_class), ('val', val_per_class)):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                cell = cells[split][i % len(cells[split])]  # cycle so every cell is used evenly
                img = jitter(photo.crop(crop_box(photo.width, photo.height, cell, rng)), rng)
                img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
                img.save(folder / f'{label}_{split}_{i:04d}.jpg', quality=90)
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir')
    parser.add_argument('--classes', type=int, default=5)
    parser.add_argument('--train-per-class', type=int, default=80)
    parser.add_argument('--val-per-class', type=int, default=40)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    counts = write_photo_set(args.out_dir, args.classes, args.train_per_class, args.val_per_class,
                             args.size, args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out_dir}")


if __name__ == '__main__':
    main()
