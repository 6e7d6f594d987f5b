"""Parquet files of images and labels, read by random access through Arrow (``pyarrow``), one row group at a time.

A file holds an image column (``DATA.PARQUET_IMAGE_COLUMN``, default ``image``): the encoded bytes, or a struct
with a ``bytes`` field (Hugging Face's ``Image`` feature, as the published ImageNet Parquet sets store it), and
an integer label column (``DATA.PARQUET_LABEL_COLUMN``, default ``label``). Sample i is row i of the files in
order, so a set written from a folder in the folder's order gives the folder's samples at the same indices.
Class names come from the files' Hugging Face metadata (``info.features.<label>.names``) where present.

Listing reads each file's footer and its label column (the images are not read). Parquet cannot read one row
alone: a row group is decoded from its start, a few rows at a time, up to the row wanted (local files are
memory-mapped, so only those pages are read). Each process keeps the rows decoded so far of its last few row
groups (:attr:`ParquetDataset.row_groups_kept`), so sequential reads (evaluation in order, filling a
``DATA.CACHE_MODE`` cache) decode every row once, and a random read decodes half a group on average: keep row
groups small (Hugging Face writes 100 images a group) or cache the bytes (``DATA.CACHE_MODE full|part``).

A missing file or column, or a label column that is not integers, is one ``UserError`` naming the file while
the dataset is built; an image that does not decode (or is null) is an unreadable image, as in a folder.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np

from utils.errors import UserError

from .datasets import ArchiveDataset
from .shards import check_labels
from .storage import is_url, storage_for


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError('DATA.FORMAT parquet needs the pyarrow package (pip install pyarrow)') from None
    return pyarrow


def hf_class_names(metadata: Optional[dict], label_column: str) -> Optional[list[str]]:
    """Class names from a file's ``huggingface`` schema metadata (``info.features.<label>.names``), or None."""
    raw = (metadata or {}).get(b'huggingface')
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    features = (info.get('info') or info).get('features') or {}
    names = (features.get(label_column) or {}).get('names')
    return [str(name) for name in names] if isinstance(names, list) else None


class _GroupReader:
    """The image column of one row group, decoded a few rows at a time and only as far as a read needs: a random
    row costs on average half the group, and the rows decoded on the way are kept for later reads."""

    def __init__(self, parquet, group: int, column: str, rows_per_batch: int):
        self._batches = parquet.iter_batches(batch_size=rows_per_batch, row_groups=[group], columns=[column],
                                             use_threads=False)
        self.starts: list[int] = []
        self.arrays: list = []
        self.done = 0

    def value(self, row: int):
        while row >= self.done:
            batch = next(self._batches, None)
            if batch is None:
                raise IndexError(f'row {row} is past the end of its row group')
            array = batch.column(0)
            if array.type.num_fields:  # Hugging Face's struct of bytes and path
                array = array.flatten()[array.type.get_field_index('bytes')]
            self.starts.append(self.done)
            self.arrays.append(array)
            self.done += len(array)
        k = bisect.bisect_right(self.starts, row) - 1
        return self.arrays[k][row - self.starts[k]]


class ParquetDataset(ArchiveDataset):
    """The rows of Parquet files, in file order; see the module docstring.

    Args:
        files: paths or URLs of the files, in order.
        columns: ``(image column, label column)``.
        classes: class names to use where the files' metadata has none (``classes.txt``), or None.
        cache_mode, rank, world_size: see :class:`~data.datasets.ArchiveDataset`.
    """

    row_groups_kept = 4  # row groups whose decoded batches each process keeps
    rows_per_batch = 8  # rows decoded at a time within a row group

    def __init__(self, files: Sequence[str], columns: tuple[str, str] = ('image', 'label'),
                 classes: Optional[Sequence[str]] = None, cache_mode: str = 'no', rank: int = 0,
                 world_size: int = 1, **kwargs):
        self.pa = _import_pyarrow()
        self.files = list(files)
        self.image_column, self.label_column = columns
        self.storage = storage_for(self.files[0])
        self._fallback_classes = list(classes) if classes is not None else None
        self._state: Optional[dict] = None
        super().__init__(cache_mode, rank, world_size, **kwargs)

    def __getstate__(self):  # open files and decoded row groups stay with the process that made them
        state = dict(self.__dict__, _state=None)
        state.pop('pa')
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.pa = _import_pyarrow()

    # -- per-process readers ---------------------------------------------------------------------
    def _process_state(self) -> dict:
        if self._state is None or self._state['pid'] != os.getpid():
            self._state = {'pid': os.getpid(), 'files': OrderedDict(), 'groups': OrderedDict()}
        return self._state

    def _file(self, i: int):
        files = self._process_state()['files']
        if i not in files:
            path = self.files[i]
            # memory-mapped: decoding copies straight from the page cache, not through a read buffer first
            source = self.storage.open(path) if is_url(path) else self.pa.memory_map(path)
            files[i] = self.pa.parquet.ParquetFile(source)
            while len(files) > 16:
                files.popitem(last=False)
        files.move_to_end(i)
        return files[i]

    def _value(self, i: int, group: int, row: int):
        """Row ``row`` of row group ``group`` of file ``i``, as an Arrow scalar of the image bytes."""
        groups = self._process_state()['groups']
        key = (i, group)
        reader = groups.get(key)
        if reader is None:
            reader = groups[key] = _GroupReader(self._file(i), group, self.image_column, self.rows_per_batch)
            while len(groups) > self.row_groups_kept:
                groups.popitem(last=False)
        groups.move_to_end(key)
        return reader.value(row)

    # -- listing ---------------------------------------------------------------------------------
    def _check_schema(self, path: str, schema) -> None:
        pa = self.pa
        names = schema.names
        for role, column in (('image', self.image_column), ('label', self.label_column)):
            if column not in names:
                key = f'DATA.PARQUET_{role.upper()}_COLUMN'
                raise UserError(f'{path}: no column {column!r} (columns: {", ".join(names)}; set {key})')
        image = schema.field(self.image_column).type
        if pa.types.is_struct(image):
            image = image.field('bytes').type if image.get_field_index('bytes') >= 0 else None
        if image is None or not (pa.types.is_binary(image) or pa.types.is_large_binary(image)):
            raise UserError(f'{path}: column {self.image_column!r} is {schema.field(self.image_column).type}, '
                            'not bytes or a struct with a bytes field')
        if not pa.types.is_integer(schema.field(self.label_column).type):
            raise UserError(f'{path}: label column {self.label_column!r} is '
                            f'{schema.field(self.label_column).type}, not integers')

    def _list_file(self, i: int) -> tuple[np.ndarray, list[int], list[int], Optional[list[str]]]:
        """Labels, rows per row group, image bytes per row group and class names of file ``i``."""
        path = self.files[i]
        try:
            parquet = self._file(i)
            self._check_schema(path, parquet.schema_arrow)
            labels = parquet.read(columns=[self.label_column]).column(0)
        except FileNotFoundError:
            raise UserError(f'Parquet file not found: {path}') from None
        except (OSError, self.pa.ArrowException) as err:
            raise UserError(f'{path}: not a readable Parquet file ({str(err).splitlines()[0]})') from None
        if labels.null_count:
            raise UserError(f'{path}: {labels.null_count} rows without a label')
        meta = parquet.metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        nbytes = []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            nbytes.append(sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                              if group.column(c).path_in_schema.split('.')[0] == self.image_column))
        classes = hf_class_names(parquet.schema_arrow.metadata, self.label_column)
        return labels.to_numpy().astype(np.int64), rows, nbytes, classes

    def _list(self):
        labels, rows, nbytes, group_file, group_index, classes = [], [], [], [], [], None
        for i in range(len(self.files)):
            file_labels, file_rows, file_bytes, names = self._list_file(i)
            labels.append(file_labels)
            rows += file_rows
            nbytes += file_bytes
            group_file += [i] * len(file_rows)
            group_index += list(range(len(file_rows)))
            classes = classes or names
        self._group_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._group_file = np.array(group_file, dtype=np.int64)
        self._group_index = np.array(group_index, dtype=np.int64)
        self._group_bytes = np.array(nbytes, dtype=np.float64) / np.maximum(rows, 1)  # per image
        all_labels = np.concatenate(labels)
        classes = classes or self._fallback_classes
        check_labels(all_labels, classes, self.files[0].rsplit('/', 1)[0])
        if not len(all_labels):
            raise UserError(f'no rows in the Parquet files {self.files[0]}, ...')
        samples = [(f'row {row}', int(label)) for file_labels in labels for row, label in enumerate(file_labels)]
        return samples, classes

    # -- reading ---------------------------------------------------------------------------------
    def _locate(self, index: int) -> tuple[int, int, int]:
        """``(file, row group, row within the group)`` of sample ``index``."""
        self._ensure_listed()
        k = int(np.searchsorted(self._group_start, index, side='right')) - 1
        return int(self._group_file[k]), int(self._group_index[k]), index - int(self._group_start[k])

    def describe(self) -> str:
        return f'{len(self.files)} Parquet files ({self.files[0]}, ...)'

    def location(self, index: int) -> str:
        file, _, _ = self._locate(index)
        return f'{self.files[file]}@{self.samples[index][0]}'

    def _stored_size(self, indices: Sequence[int]) -> int:
        if not len(indices):
            return 0
        groups = np.searchsorted(self._group_start, np.asarray(indices, dtype=np.int64), side='right') - 1
        return int(self._group_bytes[groups].sum())

    def _read_stored(self, index: int) -> Any:
        file, group, row = self._locate(index)
        value = self._value(file, group, row)
        if not value.is_valid:
            raise ValueError('the image is null')
        return value.as_py()
