"""WebDataset tar shards read by random access: every sample's image is a byte range of its shard.

A shard is a plain tar file. A sample is a run of adjacent members sharing a key: the member's path up to the
first dot of its file name (webdataset's rule: ``a/b/n0144_10.jpg`` has key ``a/b/n0144_10``, extension
``jpg``). Of its members we use the image (the last part of the extension one of ``jpg``, ``jpeg``, ``png``,
``webp``, any case) and the label (``cls``: a decimal integer); others (``json``, ``txt``, ...) are skipped.

Each shard is indexed once, by reading its tar headers with the standard ``tarfile`` module: the offset and
size of each image and its label, cached by :class:`~data.shards.IndexStore` and rebuilt when the shard's size
or modification time changes. Sample i is the i-th image of the shards in order, so a set written from a folder
in the folder's order (sorted classes, sorted files) gives the same samples at the same indices as the folder,
and every sampler, exact evaluation, repeated augmentation and resume work on it unchanged.

A truncated or damaged shard, a sample without image or label, or a label that is not a number is one
``UserError`` naming the shard while the dataset is built; an image whose bytes do not decode is an unreadable
image like a bad file in a folder (replaced in training, black in validation, named once in the log).
"""
from __future__ import annotations

import logging
import tarfile
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np

from utils.errors import UserError

from .datasets import ArchiveDataset
from .shards import IndexStore, check_labels
from .storage import Storage, storage_for

_logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
LABEL_EXT = 'cls'


def split_key(name: str) -> tuple[str, str]:
    """``'a/b/x.y.jpg'`` -> ``('a/b/x', 'y.jpg')``: the sample key and the member's extension."""
    folder, _, base = name.rpartition('/')
    stem, _, ext = base.partition('.')
    return (f'{folder}/{stem}' if folder else stem), ext


class ShardIndex(NamedTuple):
    """The samples of one shard: image member names, data offsets and sizes, labels."""
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        names = np.frombuffer('\n'.join(self.names).encode('utf-8'), dtype=np.uint8)
        return dict(names=names, offsets=self.offsets, sizes=self.sizes, labels=self.labels)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> 'ShardIndex':
        text = arrays['names'].tobytes().decode('utf-8')
        return cls(text.split('\n') if text else [], arrays['offsets'], arrays['sizes'], arrays['labels'])


class _Sample:
    """The members of one key met so far while scanning a shard."""

    def __init__(self, key: str):
        self.key, self.image, self.label = key, None, None


def index_tar(storage: Storage, path: str, size: int) -> ShardIndex:
    """Scan the tar headers of the shard at ``path`` (``size`` bytes long) into a :class:`ShardIndex`."""
    names, offsets, sizes, labels = [], [], [], []

    def close(sample: Optional[_Sample]) -> None:
        if sample is None or (sample.image is None and sample.label is None):
            return
        if sample.image is None:
            raise UserError(f'{path}: sample {sample.key!r} has a .{LABEL_EXT} label but no image '
                            f'({"/".join(IMAGE_EXTS)})')
        if sample.label is None:
            raise UserError(f'{path}: sample {sample.key!r} has an image but no .{LABEL_EXT} label')
        names.append(sample.image[0]), offsets.append(sample.image[1]), sizes.append(sample.image[2])
        labels.append(sample.label)

    try:
        with storage.open(path) as f:
            with tarfile.open(fileobj=f, mode='r:') as tar:
                sample = None
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f'{member.name} ends past the end of the file')
                    key, ext = split_key(member.name)
                    if sample is None or key != sample.key:
                        close(sample)
                        sample = _Sample(key)
                    ext = ext.lower()
                    if ext == LABEL_EXT:
                        sample.label = _parse_label(tar.extractfile(member).read(), path, member.name)
                    elif ext.rsplit('.', 1)[-1] in IMAGE_EXTS and sample.image is None:
                        sample.image = (member.name, member.offset_data, member.size)
                end = tar.offset
            # tarfile ends quietly at a header it cannot read: only the end-of-archive block tells the shard is whole
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f'no end-of-archive marker at byte {end}')
            close(sample)
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f'{path}: truncated or damaged tar shard ({err})') from None
    except OSError as err:
        raise UserError(f'{path}: cannot read the shard ({err})') from None
    if not names:
        raise UserError(f'{path}: no samples (an image member with a .{LABEL_EXT} label) in the shard')
    return ShardIndex(names, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                      np.array(labels, dtype=np.int64))


def _parse_label(data: bytes, path: str, member: str) -> int:
    try:
        return int(data.decode('ascii').strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f'{path}: {member}: the label is not a decimal integer ({data[:20]!r})') from None


class TarShardDataset(ArchiveDataset):
    """The samples of WebDataset tar shards, in shard order; see the module docstring.

    Args:
        shards: paths or URLs of the shards, in order.
        classes: class names (``classes.txt``), or None.
        index_store: where shard indexes are cached (default: beside the shards only).
        cache_mode, rank, world_size: see :class:`~data.datasets.ArchiveDataset`; rank and world size also
            spread the indexing of new shards over the ranks (each starts at its own place in the list).
    """

    def __init__(self, shards: Sequence[str], classes: Optional[Sequence[str]] = None,
                 index_store: Optional[IndexStore] = None, cache_mode: str = 'no', rank: int = 0,
                 world_size: int = 1, **kwargs):
        self.shards = list(shards)
        self.storage = storage_for(self.shards[0])
        self.index_store = index_store or IndexStore()
        self._given_classes = list(classes) if classes is not None else None
        super().__init__(cache_mode, rank, world_size, **kwargs)
        self._classes = self._given_classes  # known before listing (a lazy set's class count)

    def _shard_index(self, path: str) -> tuple[ShardIndex, bool]:
        try:
            signature = self.storage.signature(path)
        except (OSError, ValueError) as err:
            raise UserError(f'shard not found or unreadable: {path} ({err})') from None
        cached = self.index_store.load(path, signature)
        if cached is not None:
            return ShardIndex.from_arrays(cached), False
        index = index_tar(self.storage, path, signature[0])
        self.index_store.save(path, signature, index.arrays())
        return index, True

    def _list(self):
        start, n = time.time(), len(self.shards)
        first = self.rank * n // max(self.world_size, 1)  # ranks indexing new shards at once start apart
        indexes: list[Optional[ShardIndex]] = [None] * n
        built = 0
        for i in [*range(first, n), *range(first)]:
            indexes[i], new = self._shard_index(self.shards[i])
            built += new
        counts = [len(index.names) for index in indexes]
        self._shard_of = np.repeat(np.arange(n, dtype=np.int32), counts)
        self._offsets = np.concatenate([index.offsets for index in indexes])
        self._sizes = np.concatenate([index.sizes for index in indexes])
        labels = np.concatenate([index.labels for index in indexes])
        check_labels(labels, self._given_classes, self.shards[0].rsplit('/', 1)[0])
        if built:
            _logger.info(f'indexed {built} of {n} shards ({sum(counts)} samples) in {time.time() - start:.1f}s')
        samples = [(name, int(label)) for index in indexes for name, label in zip(index.names, index.labels)]
        return samples, self._given_classes

    def describe(self) -> str:
        return f'{len(self.shards)} tar shards ({self.shards[0]}, ...)'

    def location(self, index: int) -> str:
        return f'{self.shards[self._shard_of[index]]}@/{self.samples[index][0]}'

    def _stored_size(self, indices: Sequence[int]) -> int:
        return int(self._sizes[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def _read_stored(self, index: int) -> bytes:
        self._ensure_listed()
        path = self.shards[self._shard_of[index]]
        size = int(self._sizes[index])
        data = self.storage.read(path, int(self._offsets[index]), size)
        if len(data) != size:
            raise OSError(f'short read: {len(data)} of {size} bytes (the shard changed since it was indexed?)')
        return data
