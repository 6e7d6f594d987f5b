"""Minimal writers of the shard layouts from an image folder, for the readers' tests.

Deliberately not the conversion tool (``tools.make_dataset``, which the cluster test and ``benchmarks/loader.py``
use): a second, independent writer the readers must also agree with. It writes the bytes it is given (a corrupt
image stays corrupt, which the tool would refuse), the image member before the label (the tool writes the label
first, as webdataset does), and a plain binary image column; just enough to lay the same images out as WebDataset
tar shards or Parquet files in the folder's order (sorted classes, sorted files), so that sample i of every
layout is image i of the folder.

* :func:`write_wds`: ``out/{train,val}/{split}-000000.tar, ...`` (members ``<key>.<ext>`` and ``<key>.cls``)
  and ``out/classes.txt``;
* :func:`write_parquet`: ``out/{train,val}/{split}-00000.parquet, ...`` (``image`` binary, ``label`` int64) and
  ``out/classes.txt``, or with ``hub=True`` the Hugging Face hub's layout ``out/data/{train,validation}-00000-of-
  0000N.parquet`` (``image`` a struct of bytes and path, class names in the ``huggingface`` schema metadata).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')


def folder_samples(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, label) of ``root/split`` in the order an image folder lists them, and the class names."""
    classes = sorted(p.name for p in (Path(root) / split).iterdir() if p.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(Path(root) / split / name)):
            samples += [(Path(folder) / f, label) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return samples, classes


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, out: Path, per_shard: int = 8) -> Path:
    """The canonical tar shard layout of the image folder ``root`` (``per_shard`` samples a shard)."""
    out = Path(out)
    for split in ('train', 'val'):
        samples, classes = folder_samples(root, split)
        (out / split).mkdir(parents=True, exist_ok=True)
        for n, chunk in enumerate(_chunks(samples, per_shard)):
            with tarfile.open(out / split / f'{split}-{n:06d}.tar', 'w', format=tarfile.USTAR_FORMAT) as tar:
                for path, label in chunk:
                    key = f'{path.parent.name}/{path.stem.replace(".", "_")}'
                    _add(tar, key + path.suffix.lower(), path.read_bytes())
                    _add(tar, key + '.cls', str(label).encode())
    (out / 'classes.txt').write_text(''.join(f'{name}\n' for name in classes))
    return out


def write_parquet(root: Path, out: Path, per_file: int = 8, row_group: int = 4, hub: bool = False) -> Path:
    """The Parquet layout of the image folder ``root``: ours, or the Hugging Face hub's with ``hub``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = Path(out)
    for split in ('train', 'val'):
        samples, classes = folder_samples(root, split)
        chunks = _chunks(samples, per_file)
        for n, chunk in enumerate(chunks):
            images = [path.read_bytes() for path, _ in chunk]
            if hub:
                image = pa.array([{'bytes': b, 'path': p.name} for b, (p, _) in zip(images, chunk)],
                                 type=pa.struct([('bytes', pa.binary()), ('path', pa.string())]))
                meta = {'info': {'features': {'image': {'_type': 'Image'},
                                              'label': {'names': classes, '_type': 'ClassLabel'}}}}
                hub_split = 'train' if split == 'train' else 'validation'
                path = out / 'data' / f'{hub_split}-{n:05d}-of-{len(chunks):05d}.parquet'
            else:
                image, meta = pa.array(images, type=pa.binary()), None
                path = out / split / f'{split}-{n:05d}.parquet'
            table = pa.table({'image': image, 'label': pa.array([label for _, label in chunk], type=pa.int64())})
            if meta:
                table = table.replace_schema_metadata({'huggingface': json.dumps(meta)})
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=row_group, compression='none')
    if not hub:
        (out / 'classes.txt').write_text(''.join(f'{name}\n' for name in classes))
    return out
