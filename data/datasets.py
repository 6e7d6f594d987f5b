"""The three on-disk layouts of the official framework, as datasets of (image, target) pairs.

* :class:`ImageFolderDataset`: ``root/<class>/<image>``; classes are the sorted sub-folder names.
* :class:`ZipMapDataset`: ``<split>.zip`` with ``<split>_map.txt`` (``relative/path<TAB>label``
  per line), optionally with the compressed bytes cached in memory (``full``, or ``part``: only the
  indices ``i % world == rank``).
* :class:`ImageNet22KDataset`: a JSON list of ``[relative_path, label]`` (``ILSVRC2011fall_whole_map_*``).
* :class:`FileListDataset`: given ``(path under root, label)`` rows (a multi-label file, data/label_file.py).

A label is a class index, or for multi-label data a tuple of them; with ``target_width`` set, targets are
multi-hot float vectors of that width.

All three (and the tar shards of ``data.wds`` and the Parquet files of ``data.parquet``) share
:class:`ImageListDataset`: a list of (location, target), bytes read by the layout, decoded by a decoder
from ``data.decode``, then transformed. Indexing with an ``int`` behaves like any torchvision dataset
and raises on an unreadable file. Our loaders index with a :class:`~data.samplers.SampleKey` instead,
and get a :class:`LoadedSample`: the sample's randomness is seeded from the key, and an unreadable file
is replaced by another sample (training) or by a black image with its own label (validation), and
``bad`` lists the ``(location, reason)`` pairs.
Layouts read from archives (zip, tar, Parquet) derive from :class:`ArchiveDataset`, which caches their bytes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import UserError

from .decode import blank_image, decode_pil
from .samplers import SampleKey, seeded_rngs
from .zipreader import ZipReader

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
ARRAY_EXTENSIONS = ('.npy',)  # NumPy arrays: listed for input other than RGB (data.decode.ChannelDecoder)


class LoadedSample(NamedTuple):
    """What indexing with a :class:`SampleKey` returns."""
    image: Any
    target: Any  # a class index, or a multi-hot float vector (multi-label data)
    bad: list  # (location, reason) of each unreadable file met while producing this sample
    seed: int


class UnreadableDataError(RuntimeError):
    """Raised in a worker when no readable replacement turns up after many attempts."""


class ImageListDataset(Dataset):
    """Base of the layouts: subclasses implement ``_list()`` and ``_read(index)``.

    Args:
        transform: applied to the decoded image.
        decoder: bytes -> image (``decode_pil`` or ``decode_tensor``).
        on_bad: ``'replace'`` (draw another sample) or ``'blank'`` (black image, own label).
        blank_size: side, or (H, W), of the black stand-in image.
        lazy: list the files on first use rather than now (cheap construction for eval runs).
    """

    max_attempts = 50

    def __init__(self, transform: Optional[Callable] = None, decoder: Callable = decode_pil,
                 on_bad: str = 'replace', blank_size: Union[int, Sequence[int]] = 224, lazy: bool = False):
        self.transform, self.decoder = transform, decoder
        self.on_bad, self.blank_size = on_bad, blank_size
        self.replacement_pool: Optional[Sequence[int]] = None  # indices replacements are drawn from
        self._samples: Optional[list[tuple[str, int]]] = None
        self._classes: Optional[list[str]] = None
        self.target_width: Optional[int] = None  # multi-label: the length of the multi-hot target vectors
        if not lazy:
            self._ensure_listed()

    # -- what a layout provides ------------------------------------------------------------------
    def _list(self) -> tuple[list[tuple[str, int]], Optional[list[str]]]:
        """Return ``(samples, class names or None)``."""
        raise NotImplementedError

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def location(self, index: int) -> str:
        """Where sample ``index`` lives, as shown in logs."""
        return self.samples[index][0]

    def target(self, index: int) -> Any:
        """Sample ``index``'s target: its label, or with ``target_width`` its labels as a multi-hot vector."""
        label = self.samples[index][1]
        if self.target_width is None:
            return label
        vector = torch.zeros(self.target_width)
        vector[list(label)] = 1.0
        return vector

    # -- listing ---------------------------------------------------------------------------------
    def _ensure_listed(self) -> None:
        if self._samples is None:
            self._samples, self._classes = self._list()

    @property
    def samples(self) -> list[tuple[str, int]]:
        self._ensure_listed()
        return self._samples

    @property
    def classes(self) -> Optional[list[str]]:
        """Class names where the layout has them (folders, or zip paths grouped by label), else None."""
        if self._classes is None:
            self._ensure_listed()
        return self._classes

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    @property
    def num_classes(self) -> int:
        """Number of classes the data defines: named classes, or the largest label plus one."""
        if self.classes is not None:
            return len(self.classes)
        return max(self.targets, default=-1) + 1

    def known_num_classes(self) -> Optional[int]:
        """``num_classes`` if known without listing the files (lazy datasets), else None."""
        if self._classes is None and self._samples is None:
            return None
        return self.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    # -- loading ---------------------------------------------------------------------------------
    def __getitem__(self, key: Any):
        if isinstance(key, SampleKey):
            return self.load(key)
        image = self.decoder(self._read(key))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(key)

    def load(self, key: SampleKey) -> 'LoadedSample':
        """The sample for a loader key, with its unreadable files; see the module docstring."""
        with seeded_rngs(key.seed):
            image, target, bad = self._decode_robust(key.index)
            if self.transform is not None:
                image = self.transform(image)
        return LoadedSample(image, target, bad, key.seed)

    def _decode_robust(self, index: int) -> tuple[Any, int, list[tuple[str, str]]]:
        bad: list[tuple[str, str]] = []
        candidate = index
        for _ in range(self.max_attempts):
            try:
                image = self.decoder(self._read(candidate))
            except Exception as err:  # any failure to read or decode makes the file unreadable
                bad.append((self.location(candidate), f'{type(err).__name__}: {err}'))
            else:
                return image, self.target(candidate), bad
            if self.on_bad == 'blank':
                return blank_image(self.decoder, self.blank_size), self.target(index), bad
            candidate = self._replacement()
        raise UnreadableDataError(f'{len(bad)} unreadable images in a row, e.g. {bad[0][0]} ({bad[0][1]})')

    def _replacement(self) -> int:
        # Drawn from the sample's own seeded stream, so the substitute is reproducible too.
        pool = self.replacement_pool
        if pool is not None:
            return pool[random.randrange(len(pool))]
        return random.randrange(len(self))


def _read_file(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def find_classes(root: str) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (one per class)."""
    if not os.path.isdir(root):
        raise UserError(f'image folder not found: {root}')
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


class ImageFolderDataset(ImageListDataset):
    """``root/<class>/**/<image>``. Pass the training set's ``classes`` when building the validation set,
    so that labels agree even where a validation folder lacks a class. ``extensions``: the files listed."""

    def __init__(self, root: str, classes: Optional[Sequence[str]] = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, **kwargs):
        self.root, self.extensions = root, tuple(extensions)
        self._folders = find_classes(root)
        # Known without listing the files (a directory listing), so lazy datasets stay cheap.
        self._given_classes = list(classes) if classes is not None else self._folders
        super().__init__(**kwargs)
        self._classes = self._given_classes

    def _list(self):
        found, classes = self._folders, self._given_classes
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f'{self.root} has class folders absent from the training set: {unknown[:5]}')
        class_to_idx = {name: i for i, name in enumerate(classes)}
        samples = []
        for name in found:
            for folder, _, files in sorted(os.walk(os.path.join(self.root, name), followlinks=True)):
                samples += [(os.path.join(folder, f), class_to_idx[name])
                            for f in sorted(files) if f.lower().endswith(self.extensions)]
        if not samples:
            raise UserError(f'no images ({", ".join(self.extensions)}) found in class folders of {self.root}')
        return samples, classes

    def _read(self, index: int) -> bytes:
        return _read_file(self.samples[index][0])


def _names_by_label(samples: Sequence[tuple[str, int]]) -> Optional[list[str]]:
    """Class names from the first path component, when each label has exactly one such folder."""
    names: dict[int, str] = {}
    for path, label in samples:
        head = path.strip('/').split('/')[0] if '/' in path.strip('/') else None
        if head is None or names.setdefault(label, head) != head:
            return None
    if sorted(names) != list(range(len(names))) or len(set(names.values())) != len(names):
        return None
    return [names[i] for i in range(len(names))]


class _ByteCache:
    """Compressed image bytes held in a few large NumPy buffers (not a list of ``bytes`` objects).

    Large buffers have no per-item Python objects, so forked workers never touch their pages through
    reference counting and the memory stays shared copy-on-write instead of being duplicated. Sizes need
    not be known in advance: bytes go into chunks of ``CHUNK`` bytes (pages of a chunk's unused tail are
    never touched, so never committed).
    """

    CHUNK = 256 << 20

    def __init__(self, size: int, indices: Sequence[int], read: Callable[[int], bytes]):
        self.slot = np.full(size, -1, dtype=np.int64)  # index -> its entry, or -1
        self.chunks: list[np.ndarray] = []
        entries, used = [], 0
        for index in indices:
            try:
                data = read(index)
            except Exception:  # stays uncached: read (and named as unreadable) when a sample needs it
                continue
            if not self.chunks or used + len(data) > len(self.chunks[-1]):
                self.chunks.append(np.empty(max(self.CHUNK, len(data)), dtype=np.uint8))
                used = 0
            self.chunks[-1][used:used + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.slot[index] = len(entries)
            entries.append((len(self.chunks) - 1, used, used + len(data)))
            used += len(data)
        self.entries = np.array(entries, dtype=np.int64).reshape(-1, 3)
        self.nbytes = int((self.entries[:, 2] - self.entries[:, 1]).sum())

    def cached_indices(self) -> list[int]:
        return np.flatnonzero(self.slot >= 0).tolist()

    def get(self, index: int) -> Optional[memoryview]:
        k = self.slot[index]
        if k < 0:
            return None
        chunk, begin, end = self.entries[k]
        return memoryview(self.chunks[chunk][begin:end])


def _available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cache_fits(nbytes: int, what: str, cache_mode: str) -> None:
    """A ``UserError`` when the processes of this machine (torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's tasks per
    node) caching ``nbytes`` each would need more than the memory available: one clear line instead of the kernel
    killing a rank mid-fill."""
    local = os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1')
    available, local = _available_memory(), int(local) if local.isdigit() else 1
    if available is not None and nbytes * local > available:
        raise UserError(f'DATA.CACHE_MODE {cache_mode}: caching {what} takes about {nbytes / 2**30:.1f} GiB per '
                        f'process ({local} on this machine), more than the {available / 2**30:.1f} GiB available: '
                        f'use --cache-mode no (or part, on more processes)')


class ArchiveDataset(ImageListDataset):
    """A layout read from archives (zip, tar shards, Parquet), whose compressed bytes can be cached in memory.

    ``cache_mode``: ``'no'`` (read the archive each time), ``'full'`` (every rank caches all bytes) or
    ``'part'`` (rank r caches indices ``i % world_size == r``; replacements for unreadable images are then
    drawn from that shard too, and the training sampler draws only from it). Subclasses implement
    ``_read_stored(index)`` and ``_stored_size(indices)`` (an estimate, for the memory check).
    """

    def __init__(self, cache_mode: str = 'no', rank: int = 0, world_size: int = 1, **kwargs):
        self.cache_mode, self.rank, self.world_size = cache_mode, rank, world_size
        self._cache: Optional[_ByteCache] = None
        super().__init__(**kwargs)
        if cache_mode != 'no':
            self._build_cache()

    def _read_stored(self, index: int) -> bytes:
        raise NotImplementedError

    def _stored_size(self, indices: Sequence[int]) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """What the cache log line calls the data."""
        return type(self).__name__

    def _build_cache(self) -> None:
        start = time.time()
        if self.cache_mode == 'part':
            indices = range(self.rank, len(self), self.world_size)
            self.replacement_pool = list(indices)
        else:
            indices = range(len(self))
        check_cache_fits(self._stored_size(indices), self.describe(), self.cache_mode)
        self._cache = _ByteCache(len(self), indices, self._read_stored)
        _logger.info(f'cached {len(self._cache.entries)} images ({self._cache.nbytes / 2**20:.1f} MiB) '
                     f'of {self.describe()} ({self.cache_mode}) in {time.time() - start:.1f}s')

    def _read(self, index: int) -> bytes:
        if self._cache is not None:
            data = self._cache.get(index)
            if data is not None:
                return data
        return self._read_stored(index)


class ZipMapDataset(ArchiveDataset):
    """``<root>/<split>.zip`` + ``<root>/<split>_map.txt``, official zip layout, optionally cached
    (``cache_mode``, ``rank``, ``world_size``: see :class:`ArchiveDataset`)."""

    def __init__(self, root: str, split: str, cache_mode: str = 'no', rank: int = 0, world_size: int = 1,
                 listed: Optional[tuple[list, list]] = None, **kwargs):
        self.root, self.split = root, split
        self.zip_path = os.path.join(root, f'{split}.zip')
        self.map_path = os.path.join(root, f'{split}_map.txt')
        self._listed = listed  # (samples, classes) given instead of the map file (a multi-label file)
        for path in (self.zip_path,) + (() if listed else (self.map_path,)):
            if not os.path.isfile(path):
                raise UserError(f'zip layout file not found: {path}')
        super().__init__(cache_mode, rank, world_size, **kwargs)

    def _list(self):
        if self._listed is not None:
            return self._listed
        samples = []
        with open(self.map_path, encoding='utf-8') as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip('\r\n').split('\t')
                if len(parts) < 2 or not parts[1].strip().lstrip('-').isdigit():
                    raise UserError(f'{self.map_path}:{lineno}: expected "relative/path<TAB>label", '
                                    f'got {line.strip()!r}')
                samples.append((parts[0].strip('/'), int(parts[1])))
        if not samples:
            raise UserError(f'no entries in {self.map_path}')
        return samples, _names_by_label(samples)

    def describe(self) -> str:
        return self.zip_path

    def _stored_size(self, indices: Sequence[int]) -> int:
        sizes = ZipReader.member_sizes(self.zip_path)
        return sum(sizes.get(self.samples[i][0], 0) for i in indices)

    def location(self, index: int) -> str:
        return f'{self.zip_path}@/{self.samples[index][0]}'

    def _read_stored(self, index: int) -> bytes:
        return ZipReader.read_member(self.zip_path, self.samples[index][0])


class ImageNet22KDataset(ImageListDataset):
    """``<root>/<ann_file>``: a JSON list of ``[path relative to root, label]`` (official 22K layout)."""

    def __init__(self, root: str, ann_file: str, **kwargs):
        self.root, self.ann_path = root, os.path.join(root, ann_file)
        if not os.path.isfile(self.ann_path):
            raise UserError(f'ImageNet-22K map file not found: {self.ann_path}')
        super().__init__(**kwargs)

    def _list(self):
        try:
            with open(self.ann_path, encoding='utf-8') as f:
                entries = json.load(f)
            samples = [(str(path), int(label)) for path, label in entries]
        except (ValueError, TypeError) as err:
            raise UserError(f'{self.ann_path}: expected a JSON list of [relative_path, label] ({err})') from None
        if not samples:
            raise UserError(f'no entries in {self.ann_path}')
        return samples, None

    def location(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0].lstrip('/'))

    def _read(self, index: int) -> bytes:
        return _read_file(self.location(index))


class FileListDataset(ImageListDataset):
    """Given ``(path relative to root, label)`` rows and class names: the images a label file lists."""

    def __init__(self, root: str, samples: Sequence[tuple[str, Any]], classes: Sequence[str], **kwargs):
        if samples and not os.path.isdir(root):
            raise UserError(f'image folder not found: {root}')
        self.root, self._given = root, (list(samples), list(classes))
        super().__init__(**kwargs)

    def _list(self):
        return self._given

    def location(self, index: int) -> str:
        return os.path.join(self.root, self.samples[index][0])

    def _read(self, index: int) -> bytes:
        return _read_file(self.location(index))
