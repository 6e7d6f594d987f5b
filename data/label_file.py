"""Multi-label annotations: one CSV file (DATA.LABEL_FILE) for the folder and zip layouts.

Each row is ``path,labels``::

    path,labels
    train/beach_0001.jpg,sea sky
    train/city_0002.jpg,building;sky
    val/beach_0103.jpg,sea
    val/night_0104.jpg,

* ``path`` is relative to DATA_PATH and starts with the split: ``train/...`` or ``val/...`` (the folder layout's
  ``DATA_PATH/train/...``; for the zip layout, ``train/a/b.jpg`` is the member ``a/b.jpg`` of ``train.zip``).
  Rows of other splits are ignored.
* ``labels``: class names separated by spaces or ``;``; an empty cell is an image of none of the classes.
* The first line is a header when its first cell is not an image file name. Its second cell may list the class
  names (in model output order), like a labels cell; a single word (``labels``) names none.
* The classes, in order: DATA.CLASSES_FILE (one name a line) if given, else the header's, else the sorted names
  found in the file (numerically when all are integers, then ``0`` to the largest).

A label missing from a given class list is an error naming the file and line.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError

from .datasets import IMG_EXTENSIONS

SPLITS = ('train', 'val')
_SEPARATORS = re.compile(r'[;\s]+')


@dataclass
class LabelTable:
    """The parsed label file: class names and, per split, (path inside the split, class indices) rows."""
    path: str
    classes: list[str]
    splits: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)

    def rows(self, split: str, required: bool = True) -> list[tuple[str, tuple[int, ...]]]:
        """The rows of ``split``; a UserError when it has none and they are ``required``."""
        rows = self.splits.get(split, [])
        if not rows and required:
            raise UserError(f"{self.path}: no rows of the {split} split (paths starting with '{split}/')")
        return rows


def _names(cell: str) -> list[str]:
    return [name for name in _SEPARATORS.split(cell.strip()) if name]


def read_classes_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"DATA.CLASSES_FILE not found: {path}")
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: expected one distinct class name a line")
    return names


def _is_header(row: list[str]) -> bool:
    return not row[0].strip().lower().endswith(IMG_EXTENSIONS)


def _sorted_names(found: set[str]) -> list[str]:
    if found and all(name.isdigit() for name in found):
        return [str(i) for i in range(max(int(name) for name in found) + 1)]
    return sorted(found)


def resolve(path: str, data_path: str) -> str:
    """A key's file: absolute, or relative to DATA_PATH (then to the working folder)."""
    if not path or os.path.isabs(path):
        return path
    inside = os.path.join(data_path, path)
    return inside if os.path.exists(inside) or not os.path.exists(path) else path


def read_label_file(path: str, classes_file: str = '') -> LabelTable:
    """Parse ``path`` (see the module docstring); ``classes_file`` fixes the class list."""
    if not os.path.isfile(path):
        raise UserError(f"DATA.LABEL_FILE not found: {path}")
    with open(path, newline='', encoding='utf-8') as f:
        rows = [(number, row) for number, row in enumerate(csv.reader(f), 1) if row and any(c.strip() for c in row)]
    classes = read_classes_file(classes_file) if classes_file else None
    if rows and _is_header(rows[0][1]):
        header = _names(rows[0][1][1]) if len(rows[0][1]) > 1 else []
        if classes is None and len(header) > 1:
            classes = header
        rows = rows[1:]
    parsed = []
    for number, row in rows:
        if len(row) > 2:
            raise UserError(f"{path}:{number}: expected 'path,labels', got {len(row)} cells (a path with a comma "
                            f"must be quoted)")
        split, _, inner = row[0].strip().replace('\\', '/').lstrip('/').partition('/')
        if not inner:
            raise UserError(f"{path}:{number}: the path {row[0]!r} must start with the split (train/ or val/)")
        parsed.append((number, split, inner, _names(row[1]) if len(row) > 1 else []))
    if not parsed:
        raise UserError(f"{path}: no rows")
    if classes is None:
        classes = _sorted_names({name for *_, names in parsed for name in names})
    index = {name: i for i, name in enumerate(classes)}
    table = LabelTable(path, classes)
    for number, split, inner, names in parsed:
        unknown = [name for name in names if name not in index]
        if unknown:
            raise UserError(f"{path}:{number}: label {unknown[0]!r} is not one of the {len(classes)} classes")
        if split in SPLITS:
            table.splits.setdefault(split, []).append((inner, tuple(sorted({index[n] for n in names}))))
    return table


def load_label_table(label_file: str, classes_file: str, data_path: str) -> Optional[LabelTable]:
    """The label table of DATA.LABEL_FILE / DATA.CLASSES_FILE values, or None for single-label data."""
    if not label_file:
        return None
    return read_label_file(resolve(label_file, data_path), resolve(classes_file, data_path))


def run_classes(classes_file: str, label_file: str, data_path: str) -> list[str]:
    """A multi-label run's class names in its output order, from its DATA.CLASSES_FILE / DATA.LABEL_FILE values
    (relative to ``data_path``): the classes file when the run had one (the label file's own names may be in
    another order), else the label file's. UserError (naming the file) when it is missing or does not read."""
    if classes_file:
        return read_classes_file(resolve(classes_file, data_path))
    return read_label_file(resolve(label_file, data_path)).classes
