"""Finding the shard files of a split, the class names beside them, and where per-shard indexes are cached.

Shared by the tar shards (``data.wds``) and the Parquet files (``data.parquet``). A split's files, in order:

1. named by ``pattern`` (``DATA.TRAIN_SHARDS`` / ``DATA.VAL_SHARDS``): comma-separated entries, each a brace
   pattern (``train/train-{000000..000146}.tar``), a glob or a name, relative to the root unless a URL;
2. the files ``<root>/<split>/*<ext>`` (for ``val`` also ``<root>/validation/``): our canonical layout;
3. the files ``<root>/*<name>*<ext>`` and ``<root>/data/*<name>*<ext>`` with name ``train``, or ``val`` /
   ``validation``: how published sets are named (``imagenet1k-train-0000.tar``, Hugging Face's
   ``data/train-00000-of-00294.parquet``);
4. the split's ``filenames`` in ``<root>/_info.json`` (timm's wds info file).

Files found by listing (2, 3) are sorted by name; named ones keep their order. Steps 2 and 3 need a listing,
which HTTP does not have: there, name the files or ship ``_info.json``.

Class names (line i of ``<root>/classes.txt`` names class i, else a list in ``_info.json``) are optional: without
them the number of classes is the largest label plus one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from typing import Optional

import numpy as np

from utils.errors import UserError

from .storage import Storage, basename, expand_braces, has_wildcards, is_url, join

_logger = logging.getLogger(__name__)

SPLIT_NAMES = {'train': ('train',), 'val': ('val', 'validation')}
INFO_FILE = '_info.json'
CLASSES_FILE = 'classes.txt'


def find_shards(storage: Storage, root: str, split: str, ext: str, pattern: str = '') -> list[str]:
    """The paths of ``split``'s files with extension ``ext`` (``'.tar'``, ``'.parquet'``); see the module doc."""
    if pattern:
        return _named(storage, root, pattern)
    names = SPLIT_NAMES[split]
    if storage.can_list:
        for name in names:
            folder = join(root, name)
            if storage.isdir(folder):
                found = [join(folder, f) for f in storage.listdir(folder) if f.lower().endswith(ext)]
                if found:
                    return found
        for folder in (root, join(root, 'data')):
            if storage.isdir(folder):
                found = [join(folder, f) for f in storage.listdir(folder)
                         if f.lower().endswith(ext) and any(n in f.lower() for n in names)]
                if found:
                    return found
    listed = _info_filenames(storage, root, names)
    if listed:
        return _named(storage, root, ','.join(listed))
    key = 'DATA.TRAIN_SHARDS' if split == 'train' else 'DATA.VAL_SHARDS'
    where = (f'{join(root, names[0])}/*{ext}, {join(root, "*" + names[0] + "*" + ext)}, ' if storage.can_list
             else '(HTTP cannot list folders) ')
    raise UserError(f'no {split} shards found: looked for {where}the {split} files of {join(root, INFO_FILE)}; '
                    f'name them with {key}')


def _named(storage: Storage, root: str, pattern: str) -> list[str]:
    paths = []
    for entry in (e.strip() for e in pattern.split(',')):
        for name in expand_braces(entry) if entry else ():
            path = join(root, name)
            if has_wildcards(name):
                if not storage.can_list:
                    raise UserError(f'{path}: HTTP cannot list folders, so a glob cannot match: name the files '
                                    '(a list or a brace pattern {000000..000146})')
                matched = storage.glob(path)
                if not matched:
                    raise UserError(f'no file matches {path}')
                paths += matched
            else:
                paths.append(path)
    if not paths:
        raise UserError(f'no shard named in {pattern!r}')
    return paths


def _read_json(storage: Storage, path: str) -> Optional[dict]:
    try:
        if not storage.exists(path):
            return None
        return json.loads(storage.read_all(path))
    except (OSError, ValueError) as err:
        raise UserError(f'{path}: cannot read it as JSON ({err})') from None


def _info_filenames(storage: Storage, root: str, names: tuple[str, ...]) -> list[str]:
    info = _read_json(storage, join(root, INFO_FILE)) or {}
    splits = info.get('splits') or {}
    for name in names:
        filenames = (splits.get(name) or {}).get('filenames')
        if filenames:
            return [filenames] if isinstance(filenames, str) else list(filenames)
    return []


def read_class_names(storage: Storage, root: str) -> Optional[list[str]]:
    """Class names from ``<root>/classes.txt`` (one a line), else from ``<root>/_info.json`` (a list under
    ``classes``, ``class_names`` or ``label_names``, or Hugging Face's ``features.label.names``), else None."""
    path = join(root, CLASSES_FILE)
    if storage.exists(path):
        try:
            lines = storage.read_all(path).decode('utf-8').splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f'{path}: cannot read the class names ({err})') from None
        while lines and not lines[-1].strip():
            lines.pop()
        return [line.strip() for line in lines]
    info = _read_json(storage, join(root, INFO_FILE)) or {}
    for key in ('classes', 'class_names', 'label_names'):
        if isinstance(info.get(key), list):
            return [str(name) for name in info[key]]
    names = ((info.get('features') or {}).get('label') or {}).get('names')
    return [str(name) for name in names] if isinstance(names, list) else None


def check_labels(labels: np.ndarray, classes: Optional[list[str]], where: str) -> None:
    """Labels are class indices: non-negative, and below the number of named classes where there are names."""
    if len(labels) and labels.min() < 0:
        raise UserError(f'{where}: negative label {int(labels.min())} (labels are class indices 0, 1, ...)')
    if classes is not None and len(labels) and labels.max() >= len(classes):
        raise UserError(f'{where}: label {int(labels.max())} but only {len(classes)} class names')


class IndexStore:
    """Where per-shard indexes are cached: ``<shard folder>/.index/<shard>.npz`` beside a local shard when that
    folder can be written, else ``<fallback>/<hash of the shard folder>/<shard>.npz`` (the run's output
    folder: remote shards, read-only data). An index is valid while the shard's size and modification time
    (or ETag) are those it was built from; writes are atomic, so ranks indexing at once never see a half file.
    """

    VERSION = 1

    def __init__(self, fallback: Optional[str] = None):
        self.fallback = fallback

    def _places(self, shard: str) -> list[str]:
        places = []
        if not is_url(shard):
            folder = os.path.dirname(os.path.abspath(shard))
            places.append(os.path.join(folder, '.index', basename(shard) + '.npz'))
        if self.fallback:
            folder = shard[:-len(basename(shard))]
            digest = hashlib.sha1(folder.encode()).hexdigest()[:12]
            places.append(os.path.join(self.fallback, 'data_index', digest, basename(shard) + '.npz'))
        return places

    def _meta(self, shard: str, signature: tuple[int, str]) -> np.ndarray:
        text = json.dumps({'version': self.VERSION, 'shard': basename(shard), 'size': signature[0],
                           'modified': signature[1]})
        return np.frombuffer(text.encode(), dtype=np.uint8)

    def load(self, shard: str, signature: tuple[int, str]) -> Optional[dict[str, np.ndarray]]:
        """The arrays saved for ``shard`` at this signature, or None."""
        meta = self._meta(shard, signature)
        for place in self._places(shard):
            try:
                with np.load(place, allow_pickle=False) as saved:
                    if np.array_equal(saved['meta'], meta):
                        return {key: saved[key] for key in saved.files if key != 'meta'}
            except (OSError, ValueError, KeyError):
                continue  # absent, or unreadable: rebuilt
        return None

    def save(self, shard: str, signature: tuple[int, str], arrays: dict[str, np.ndarray]) -> None:
        """Write the index to the first place that takes it; none taking it only costs a rebuild next time."""
        buffer = io.BytesIO()
        np.savez(buffer, meta=self._meta(shard, signature), **arrays)
        for place in self._places(shard):
            tmp = f'{place}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
            try:
                os.makedirs(os.path.dirname(place), exist_ok=True)
                with open(tmp, 'wb') as f:
                    f.write(buffer.getvalue())
                os.replace(tmp, place)
                return
            except OSError:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
        _logger.warning(f'could not cache the index of {shard} (no writable place): it is rebuilt next run')
