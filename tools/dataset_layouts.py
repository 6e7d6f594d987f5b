"""The three layouts ``tools.make_dataset`` writes (zip + map, WebDataset shards, Parquet), and how it reads them
back for ``--verify``.

Every layout receives the samples of a split in the image folder's order and cuts them into shards where
:class:`ShardLimit` says; a shard is written to a temporary name and renamed once complete, so a shard file
that exists is whole. The zip layout has one archive per split: there the limit marks checkpoints, where the
archive is closed (its central directory written) so an interrupted conversion can go on from the last one.

Layouts (``DST`` is the output folder; ``<split>`` is ``train`` or ``val``):

* ``zip``: ``DST/<split>.zip`` (members stored, not compressed, named by the path relative to the split
  folder) and ``DST/<split>_map.txt`` (``relative/path<TAB>label`` per line), as ``data.ZipMapDataset`` reads.
* ``wds``: ``DST/<split>/<split>-000000.tar, ...`` and ``DST/classes.txt`` (line i: class i's name). A sample
  is two adjacent members, ``<key>.cls`` (the label in ASCII decimal) then ``<key>.<ext>`` (the image's bytes
  unchanged for jpg/jpeg/png/webp, other formats re-encoded losslessly to png), in webdataset's own (sorted)
  member order; the key is the path relative to the split folder without its extension, every '.' made '_'.
  Headers are fixed (mtime 0, uid/gid 0, mode 0o444), so a rerun writes the same bytes.
* ``parquet``: ``DST/<split>/<split>-00000.parquet, ...`` and ``DST/classes.txt``; columns ``image``
  (struct of ``bytes`` and ``path``: Hugging Face's Image feature) and ``label`` (int64), in row groups of
  ``row_group_size`` rows; the schema's ``huggingface`` metadata names the features (Image, ClassLabel).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional

from utils.errors import UserError

WDS_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')  # stored as they are in shards; other formats become png
CLASSES_FILE = 'classes.txt'
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip header holds: fixed, so reruns are identical
TAR_BLOCK = 512


def image_ext(rel: str) -> str:
    """``'a/b.JPEG'`` -> ``'jpeg'``."""
    return posixpath.splitext(rel)[1][1:].lower()


def wds_key(rel: str) -> str:
    """The sample key of an image: its relative path without the extension, each '.' made '_' (webdataset
    splits a member name at the first dot of its base name)."""
    return posixpath.splitext(rel)[0].replace('.', '_')


def wds_ext(rel: str) -> str:
    """The extension an image's member gets in a shard."""
    ext = image_ext(rel)
    return ext if ext in WDS_IMAGE_EXTS else 'png'


@dataclass(frozen=True)
class Sample:
    """One image on its way into a layout: where it goes (``rel``, ``label``) and the bytes to store."""
    rel: str  # path relative to the split folder (the 22K lists: relative to the data root)
    label: int
    data: bytes
    ext: str  # extension of the stored bytes, lower-case


@dataclass(frozen=True)
class Stored:
    """One sample as read back from a converted set, for ``--verify``."""
    where: str  # the file (and member or row) it was read from
    name: str  # its key (wds) or relative path (zip, parquet)
    label: int
    data: bytes
    ext: str


@dataclass(frozen=True)
class ShardLimit:
    """Where a shard ends: before the sample that would take it past ``max_bytes`` or ``max_samples``."""
    max_bytes: Optional[int]
    max_samples: Optional[int]

    def full(self, count: int, size: int, cost: int) -> bool:
        if count == 0:
            return False  # a sample larger than the limit still gets a shard of its own
        return ((self.max_samples is not None and count >= self.max_samples)
                or (self.max_bytes is not None and size + cost > self.max_bytes))


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_classes(dst: str) -> list[str]:
    path = os.path.join(dst, CLASSES_FILE)
    if not os.path.isfile(path):
        raise UserError(f'{path} not found')
    with open(path, encoding='utf-8') as f:
        return f.read().splitlines()


# ------------------------------------------------------------------------------------------------ shards

class TarShard:
    """One WebDataset shard being written (to a temporary name)."""

    def __init__(self, path: str):
        self.path, self.count, self.size = path, 0, 0
        self._file = open(path, 'wb')
        self._tar = tarfile.open(fileobj=self._file, mode='w', format=tarfile.PAX_FORMAT, encoding='utf-8')

    @staticmethod
    def cost(sample: Sample) -> int:
        """Bytes the sample adds: two headers, the label's block and the padded image."""
        return 3 * TAR_BLOCK + -(-len(sample.data) // TAR_BLOCK) * TAR_BLOCK

    def add(self, sample: Sample) -> None:
        key = wds_key(sample.rel)
        for name, payload in ((f'{key}.cls', str(sample.label).encode('ascii')), (f'{key}.{sample.ext}', sample.data)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ''
            self._tar.addfile(info, io.BytesIO(payload))
        self.count += 1
        self.size += self.cost(sample)

    def close(self) -> None:
        self._tar.close()
        _fsync_close(self._file)


class ParquetShard:
    """One Parquet file being written (to a temporary name), a row group every ``row_group_size`` rows."""

    def __init__(self, path: str, schema, row_group_size: int):
        import pyarrow.parquet as pq
        self.path, self.count, self.size = path, 0, 0
        self._schema, self._rows, self._pending = schema, row_group_size, []
        # Images are compressed already: no codec, no dictionary, no min/max statistics of image bytes.
        self._writer = pq.ParquetWriter(path, schema, compression='none', use_dictionary=False,
                                        write_statistics=['label'])

    @staticmethod
    def cost(sample: Sample) -> int:
        return len(sample.data) + len(sample.rel)

    def add(self, sample: Sample) -> None:
        self._pending.append(sample)
        self.count += 1
        self.size += self.cost(sample)
        if len(self._pending) == self._rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        if not self._pending:
            return
        image_type = self._schema.field('image').type
        images = pa.StructArray.from_arrays(
            [pa.array([s.data for s in self._pending], pa.binary()), pa.array([s.rel for s in self._pending])],
            fields=list(image_type))
        labels = pa.array([s.label for s in self._pending], pa.int64())
        self._writer.write_table(pa.Table.from_arrays([images, labels], schema=self._schema),
                                 row_group_size=len(self._pending))
        self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        with open(self.path, 'rb+') as f:
            os.fsync(f.fileno())


class ZipCheckpoint:
    """A split's archive between two checkpoints: created, or reopened to append as the last checkpoint left it.

    Appending overwrites the archive's directory (it follows the last member), so each checkpoint also keeps a
    copy of it: ``restore = (data_end, directory)`` puts the archive back as it was at the checkpoint, whatever an
    interrupted run wrote after it."""

    def __init__(self, path: str, restore: Optional[tuple[int, Optional[bytes]]]):
        self.path, self.count, self.size = path, 0, 0
        if restore is None:
            self.start = 0
            self._archive = zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED, allowZip64=True)
            return
        self.start, directory = restore
        if directory is not None:  # None: the archive is as this process closed it at the checkpoint
            with open(path, 'rb+') as f:
                f.truncate(self.start)
                f.seek(self.start)
                f.write(directory)
        self._archive = zipfile.ZipFile(path, 'a', zipfile.ZIP_STORED, allowZip64=True)

    @property
    def data_end(self) -> int:
        """Where the members end and the directory begins."""
        return self.start + self.size

    @staticmethod
    def cost(sample: Sample) -> int:
        """The member's bytes in the archive: local header, name and data (no extra field below 4 GB)."""
        return 30 + len(sample.rel.encode('utf-8')) + len(sample.data)

    def add(self, sample: Sample) -> None:
        info = zipfile.ZipInfo(sample.rel, date_time=ZIP_DATE)
        info.compress_type, info.create_system = zipfile.ZIP_STORED, 3  # stored; unix attributes
        info.external_attr = (stat.S_IFREG | 0o444) << 16
        self._archive.writestr(info, sample.data)
        self.count += 1
        self.size += self.cost(sample)

    def close(self) -> bytes:
        """Write the directory; returns it (the bytes after ``data_end``)."""
        self._archive.close()
        with open(self.path, 'rb+') as f:
            os.fsync(f.fileno())
            f.seek(self.data_end)
            directory = f.read()
        if not directory.startswith((b'PK\x01\x02', b'PK\x05\x06', b'PK\x06\x06')):
            raise RuntimeError(f'{self.path}: the directory is not at offset {self.data_end}')  # a zipfile change
        return directory


# ------------------------------------------------------------------------------------------------ layouts

class Layout:
    """What a format writes and reads back; subclasses name the shards and open them."""

    name, suffix = '', ''

    def __init__(self, dst: str, classes: list[str], row_group_size: int = 256):
        self.dst, self.classes, self.row_group_size = dst, classes, row_group_size

    def begin(self, splits: list[str]) -> None:
        """Create the folders and the class list; drop temporary files an interrupted run left."""
        for split in splits:
            os.makedirs(os.path.join(self.dst, split), exist_ok=True)
            for entry in os.scandir(os.path.join(self.dst, split)):
                if entry.name.endswith('.tmp'):
                    os.remove(entry.path)
        write_text_atomic(os.path.join(self.dst, CLASSES_FILE), ''.join(f'{name}\n' for name in self.classes))

    def shard_name(self, split: str, number: int) -> str:
        raise NotImplementedError

    def open(self, split: str, number: int, last: Optional[dict]):
        """The shard ``number`` of ``split``, written to a temporary file; ``last``: the record of the shard
        before it."""
        raise NotImplementedError

    def commit(self, split: str, number: int, shard) -> dict:
        """Close a full shard and put it in place; returns what the resume state records of it."""
        shard.close()
        final = os.path.join(self.dst, split, self.shard_name(split, number))
        os.replace(shard.path, final)
        return {'file': os.path.relpath(final, self.dst), 'bytes': os.path.getsize(final)}

    def discard(self, shard) -> None:
        """Drop a shard that received no sample."""
        shard.close()
        os.remove(shard.path)

    def finish(self, split: str, entries: list[tuple[str, int]]) -> None:
        """After the split's last shard: ``entries`` are the (relative path, label) pairs written."""

    def outputs(self, split: str) -> list[str]:
        """The split's finished files, in order."""
        folder = os.path.join(self.dst, split)
        if not os.path.isdir(folder):
            return []
        return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                if name.startswith(f'{split}-') and name.endswith(self.suffix)]

    def read(self, split: str) -> Iterator[Stored]:
        raise NotImplementedError


class WdsLayout(Layout):
    name, suffix = 'wds', '.tar'

    def shard_name(self, split: str, number: int) -> str:
        return f'{split}-{number:06d}.tar'

    def open(self, split: str, number: int, last: Optional[dict]) -> TarShard:
        return TarShard(os.path.join(self.dst, split, f'.{self.shard_name(split, number)}.tmp'))

    def read(self, split: str) -> Iterator[Stored]:
        for path in self.outputs(split):
            yield from _read_tar(path)


def _read_tar(path: str) -> Iterator[Stored]:
    """Samples of one shard: adjacent members grouped by key, each a ``cls`` and one image member."""
    group: dict[str, bytes] = {}
    key = None
    with tarfile.open(path, 'r:') as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition('.')
            name = posixpath.join(folder, stem)
            if name != key and group:
                yield _wds_sample(path, key, group)
                group = {}
            key = name
            group[ext] = tar.extractfile(member).read()
    if group:
        yield _wds_sample(path, key, group)


def _wds_sample(path: str, key: str, group: dict[str, bytes]) -> Stored:
    images = [ext for ext in group if ext in WDS_IMAGE_EXTS]
    if 'cls' not in group or len(images) != 1 or len(group) != 2:
        raise UserError(f'{path}: sample {key} has members {sorted(group)}, expected cls and one of {WDS_IMAGE_EXTS}')
    return Stored(f'{path}:{key}', key, int(group['cls']), group[images[0]], images[0])


class ParquetLayout(Layout):
    name, suffix = 'parquet', '.parquet'

    def __init__(self, dst: str, classes: list[str], row_group_size: int = 256):
        super().__init__(dst, classes, row_group_size)
        self.schema = parquet_schema(classes)

    def shard_name(self, split: str, number: int) -> str:
        return f'{split}-{number:05d}.parquet'

    def open(self, split: str, number: int, last: Optional[dict]) -> ParquetShard:
        path = os.path.join(self.dst, split, f'.{self.shard_name(split, number)}.tmp')
        return ParquetShard(path, self.schema, self.row_group_size)

    def read(self, split: str) -> Iterator[Stored]:
        import pyarrow.parquet as pq
        for path in self.outputs(split):
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(columns=['image', 'label']):
                images, labels = batch.column('image'), batch.column('label').to_pylist()
                data, rels = images.field('bytes').to_pylist(), images.field('path').to_pylist()
                for blob, rel, label in zip(data, rels, labels):
                    yield Stored(f'{path}:row {row}', rel, label, blob, image_ext(rel))
                    row += 1


def parquet_schema(classes: list[str]):
    """``image: struct{bytes, path}``, ``label: int64``, with the features Hugging Face datasets reads."""
    import pyarrow as pa
    features = {'image': {'_type': 'Image'}, 'label': {'_type': 'ClassLabel', 'names': list(classes)}}
    schema = pa.schema([('image', pa.struct([('bytes', pa.binary()), ('path', pa.string())])),
                        ('label', pa.int64())])
    return schema.with_metadata({'huggingface': json.dumps({'info': {'features': features}})})


class ZipLayout(Layout):
    """One archive per split, ``DST/.<split>.zip.partial`` until the split is done."""

    name = 'zip'
    _closed: Optional[tuple[str, int]] = None  # the checkpoint this object last wrote

    def begin(self, splits: list[str]) -> None:
        os.makedirs(self.dst, exist_ok=True)

    def _partial(self, split: str) -> str:
        return os.path.join(self.dst, f'.{split}.zip.partial')

    def _directory(self, split: str, number: int) -> str:
        return os.path.join(self.dst, f'.{split}.zip.directory{number}')

    def open(self, split: str, number: int, last: Optional[dict]) -> ZipCheckpoint:
        restore = None
        if last is not None and self._closed == (split, number - 1):
            restore = (last['data_end'], None)  # going on in the process that closed it: nothing to restore
        elif last is not None:
            with open(self._directory(split, number - 1), 'rb') as f:
                restore = (last['data_end'], f.read())
        self._drop_directories(split, keep=number - 1)
        return ZipCheckpoint(self._partial(split), restore)

    def commit(self, split: str, number: int, shard: ZipCheckpoint) -> dict:
        """A checkpoint: the archive closed, its directory kept aside."""
        directory = shard.close()
        with open(f'{self._directory(split, number)}.tmp', 'wb') as f:
            f.write(directory)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f'{self._directory(split, number)}.tmp', self._directory(split, number))
        self._closed = (split, number)
        return {'data_end': shard.data_end, 'bytes': shard.data_end + len(directory)}

    def _drop_directories(self, split: str, keep: int) -> None:
        prefix = os.path.basename(self._directory(split, ''))
        for name in os.listdir(self.dst):
            if name.startswith(prefix) and name != os.path.basename(self._directory(split, keep)):
                os.remove(os.path.join(self.dst, name))

    def discard(self, shard) -> None:
        shard.close()  # appended nothing: the archive stays as the last checkpoint left it

    def finish(self, split: str, entries: list[tuple[str, int]]) -> None:
        write_text_atomic(os.path.join(self.dst, f'{split}_map.txt'),
                          ''.join(f'{rel}\t{label}\n' for rel, label in entries))
        if os.path.exists(self._partial(split)):  # else renamed by the run this one resumes
            os.replace(self._partial(split), os.path.join(self.dst, f'{split}.zip'))
        self._drop_directories(split, keep=-1)

    def outputs(self, split: str) -> list[str]:
        return [p for p in (os.path.join(self.dst, f'{split}.zip'), os.path.join(self.dst, f'{split}_map.txt'))
                if os.path.exists(p)]

    def read(self, split: str) -> Iterator[Stored]:
        from data.datasets import ZipMapDataset  # the reader training uses: what it sees is what is checked
        from data.zipreader import ZipReader
        dataset = ZipMapDataset(self.dst, split)
        for index, (rel, label) in enumerate(dataset.samples):
            try:
                data = ZipReader.read_member(dataset.zip_path, rel)
            except KeyError:
                data = b''  # a map line without its member: reported as differing bytes
            yield Stored(dataset.location(index), rel, label, data, image_ext(rel))


LAYOUTS = {'zip': ZipLayout, 'wds': WdsLayout, 'parquet': ParquetLayout}


def detect_format(dst: str) -> Optional[str]:
    """The format of a converted set, from its files."""
    if any(os.path.isfile(os.path.join(dst, f'{s}.zip')) for s in ('train', 'val')):
        return 'zip'
    for split in ('train', 'val'):
        folder = os.path.join(dst, split)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        for fmt, suffix in (('wds', '.tar'), ('parquet', '.parquet')):
            if any(n.endswith(suffix) for n in names):
                return fmt
    return None
