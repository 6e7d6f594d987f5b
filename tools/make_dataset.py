"""Convert an image folder (or the ImageNet-22K JSON lists) into the zip + map layout, WebDataset shards or Parquet.

    python -m tools.make_dataset --format zip     data/imagenet data/imagenet-zip
    python -m tools.make_dataset --format wds     data/imagenet data/imagenet-wds [--shard-size 1G] [--shard-samples N]
    python -m tools.make_dataset --format parquet data/imagenet data/imagenet-parquet [--row-group-size 256]
    python -m tools.make_dataset data/imagenet --verify data/imagenet-wds      # compare a converted set with SRC

SRC is read as training reads it: ``SRC/train/<class>/**/<image>`` and ``SRC/val/...`` (data.ImageFolderDataset:
sorted classes, its image extensions and order), or, where SRC has no such folders (or with ``--dataset
imagenet22K``), the official 22K lists ``ILSVRC2011fall_whole_map_{train,val}.txt``. Image i of a split is sample
i of the converted split; the layouts are described in ``tools/dataset_layouts.py``.

Every image is decoded once on the way (in ``--workers`` processes): an undecodable one stops the conversion with
one line naming it, or, with ``--skip-bad``, is left out and listed. Shards are written under a temporary name and
renamed when complete, and ``DST/.make_dataset.json`` records the finished ones: after an interrupt (Ctrl-C, a
killed job), the same command continues where it stopped and writes the same bytes an uninterrupted run writes.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import posixpath
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from utils.errors import UserError

from .dataset_layouts import (LAYOUTS, WDS_IMAGE_EXTS, Layout, Sample, ShardLimit, Stored, detect_format,
                              image_ext, read_classes, wds_ext, wds_key, write_text_atomic)

STATE_FILE = '.make_dataset.json'
SPLITS = ('train', 'val')
PNG_MODES = ('1', 'L', 'LA', 'P', 'RGB', 'RGBA')  # modes PNG holds exactly; others become RGB, as loaders see them
_UNITS = {'': 1, 'K': 10**3, 'M': 10**6, 'G': 10**9, 'T': 10**12, 'KI': 2**10, 'MI': 2**20, 'GI': 2**30, 'TI': 2**40}


# ------------------------------------------------------------------------------------------------ source

@dataclass(frozen=True)
class Item:
    """One source image: its file, its path inside the split (the converted sample's name) and its label."""
    path: str
    rel: str
    label: int


@dataclass
class Source:
    """The images of SRC per split, in the order training lists them, and the class names."""
    splits: dict[str, list[Item]]
    classes: list[str]

    def fingerprint(self, split: str) -> str:
        """Identifies the listing, so that a resumed conversion refuses a SRC that changed meanwhile."""
        digest = hashlib.sha1()
        for item in self.splits[split]:
            digest.update(f'{item.rel}\t{item.label}\n'.encode('utf-8'))
        return f'{len(self.splits[split])}:{digest.hexdigest()}'


def list_source(src: str, dataset: str = 'auto') -> Source:
    """The images of SRC: class folders (``imagenet``) or the 22K JSON lists (``imagenet22K``); ``auto``: the
    folders where SRC has a train/ or val/ folder, else the lists."""
    from data.build import IN22K_PREFIX
    if dataset not in ('auto', 'imagenet', 'imagenet22K'):
        raise UserError(f'--dataset {dataset!r}: expected auto, imagenet or imagenet22K')
    if not os.path.isdir(src):
        raise UserError(f'SRC not found: {src}')
    folders = [s for s in SPLITS if os.path.isdir(os.path.join(src, s))]
    lists = [s for s in SPLITS if os.path.isfile(os.path.join(src, f'{IN22K_PREFIX}_map_{s}.txt'))]
    if dataset == 'auto':
        dataset = 'imagenet22K' if lists and not folders else 'imagenet'
    if dataset == 'imagenet' and folders:
        return _list_folders(src)
    if dataset == 'imagenet22K' and lists:
        return _list_22k(src, lists)
    raise UserError(f'{src} has no train/ or val/ folder (SRC/train/<class>/<images>), nor the ImageNet-22K lists '
                    f'{IN22K_PREFIX}_map_train.txt / _map_val.txt')


def _list_folders(src: str) -> Source:
    from data.datasets import ImageFolderDataset
    splits, classes = {}, None
    for split in SPLITS:  # train first: its classes label the validation folders, as in training
        root = os.path.join(src, split)
        if not os.path.isdir(root):
            continue
        dataset = ImageFolderDataset(root, classes=classes)
        classes = dataset.classes
        splits[split] = [Item(path, os.path.relpath(path, root).replace(os.sep, '/'), label)
                         for path, label in dataset.samples]
    return Source(splits, list(classes))


def _list_22k(src: str, splits: list[str]) -> Source:
    from data.build import IN22K_PREFIX
    from data.datasets import ImageNet22KDataset
    listed = {}
    for split in splits:
        dataset = ImageNet22KDataset(src, f'{IN22K_PREFIX}_map_{split}.txt')
        listed[split] = [Item(dataset.location(i), rel.strip('/'), label)
                         for i, (rel, label) in enumerate(dataset.samples)]
        negative = next((item for item in listed[split] if item.label < 0), None)
        if negative is not None:
            raise UserError(f'{dataset.ann_path}: negative label {negative.label} for {negative.rel}')
    return Source(listed, _names_by_folder([i for items in listed.values() for i in items]))


def _names_by_folder(items: list[Item]) -> list[str]:
    """Class names for the 22K lists: each label's folder name (the WordNet id) where labels and folders pair one
    to one, else the labels themselves."""
    count = max(item.label for item in items) + 1
    labels = [str(i) for i in range(count)]
    names: dict[int, str] = {}
    for item in items:
        folder = posixpath.basename(posixpath.dirname(item.rel))
        if names.setdefault(item.label, folder) != folder:
            return labels
    if len(names) != count or len(set(names.values())) != count or '' in names.values():
        return labels
    return [names[i] for i in range(count)]


def check_names(source: Source, fmt: str) -> None:
    """Sample names (zip members, shard keys) must be unique within a split."""
    for split, items in source.splits.items():
        seen: dict[str, str] = {}
        for item in items:
            name = wds_key(item.rel) if fmt == 'wds' else item.rel
            if name in seen:
                raise UserError(f'{item.path} and {seen[name]} would both be sample {name!r} of {split} in {fmt}; '
                                'rename one of them')
            seen[name] = item.path


# ------------------------------------------------------------------------------------------------ images

def prepare(item: Item, reencode: bool) -> tuple[Optional[Sample], str]:
    """Read and decode one image: ``(sample, '')``, or ``(None, why)`` when it is not a readable image.

    With ``reencode`` (shards), formats other than jpg/jpeg/png/webp are stored as lossless PNG."""
    from data.decode import open_image
    try:
        with open(item.path, 'rb') as f:
            data = f.read()
        image = open_image(data)
        image.load()  # the whole image, as every loader decodes it
    except Exception as err:  # any failure to read or decode makes the file unreadable
        return None, f'{type(err).__name__}: {err}'
    ext = image_ext(item.rel)
    if reencode and ext not in WDS_IMAGE_EXTS:
        data, ext = _png_bytes(image), 'png'
    return Sample(item.rel, item.label, data, ext), ''


def _png_bytes(image) -> bytes:
    if image.mode not in PNG_MODES:
        image = image.convert('RGB')  # what data.decode makes of it too
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool ends its workers so, whatever handler we were forked with


def prepared(items: Sequence[Item], reencode: bool, workers: int) -> Iterator[tuple[Item, Optional[Sample], str]]:
    """``prepare`` over ``items`` in order, in ``workers`` processes (none: here), at most two batches in memory."""
    work = functools.partial(prepare, reencode=reencode)
    if workers <= 0:
        for item in items:
            yield (item, *work(item))
        return
    batch = 64 * workers
    with multiprocessing.Pool(workers, initializer=_ignore_sigint) as pool:
        pending = None
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            job = (chunk, pool.map_async(work, chunk, chunksize=8))
            if pending is not None:
                yield from ((item, *result) for item, result in zip(pending[0], pending[1].get()))
            pending = job
        if pending is not None:
            yield from ((item, *result) for item, result in zip(pending[0], pending[1].get()))


# ------------------------------------------------------------------------------------------------ progress

def human_bytes(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if n < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
        n /= 1000
    return ''


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, otherwise a line a minute (batch job logs)."""

    def __init__(self, label: str, total: int, done: int = 0, stream=None):
        self.label, self.total, self.start_done = label, total, done
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.interval = 0.2 if self.tty else 60.0
        self.started = self.last = time.monotonic()

    def update(self, done: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(done, nbytes, now)

    def _draw(self, done: int, nbytes: int, now: float) -> None:
        fraction = done / max(self.total, 1)
        rate = (done - self.start_done) / max(now - self.started, 1e-6)
        line = (f'{self.label} {fraction:4.0%} |{"#" * int(fraction * 30):<30}| {done}/{self.total} images, '
                f'{human_bytes(nbytes)} read, {rate:.0f} images/s')
        self.stream.write(f'\r{line}' if self.tty else f'{line}\n')
        self.stream.flush()

    def close(self, done: int, nbytes: int) -> None:
        if self.tty:
            self._draw(done, nbytes, time.monotonic())
            self.stream.write('\n')


# ------------------------------------------------------------------------------------------------ state

class State:
    """``DST/.make_dataset.json``: the conversion's options and the shards finished so far, per split.

    A shard is recorded only once its file is complete and in place, so every recorded shard is trusted; the
    file goes once the whole conversion is done."""

    def __init__(self, path: str, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, dst: str, header: dict) -> 'State':
        """The state of an unfinished conversion in ``dst`` with the same ``header``, or a new one."""
        path = os.path.join(dst, STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
            before = data['header']
            if before.get('source') != header['source']:
                raise UserError(f'{dst} holds an unfinished conversion of other images (SRC changed since): '
                                'name an empty DST')
            differ = {k: before.get(k) for k in sorted(set(header) | set(before)) if header.get(k) != before.get(k)}
            if differ:
                raise UserError(f'{dst} holds an unfinished conversion with other options ({json.dumps(differ)}): '
                                'run it again as it began, or name an empty DST')
            return cls(path, data)
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise UserError(f'DST {dst} is a file: name a folder')
        if os.path.isdir(dst) and os.listdir(dst):
            raise UserError(f'DST {dst} is not empty (and holds no unfinished conversion): name an empty or new folder')
        os.makedirs(dst, exist_ok=True)
        state = cls(path, {'header': header, 'splits': {}})
        state.save()
        return state

    def split(self, name: str) -> dict:
        return self.data['splits'].setdefault(name, {'shards': [], 'done': False, 'skipped': []})

    def add_shard(self, name: str, record: dict) -> None:
        self.split(name)['shards'].append(record)
        self.save()

    def finish(self, name: str, skipped: list) -> None:
        self.split(name).update(done=True, skipped=skipped)
        self.save()

    def skipped(self, name: str) -> list[list[str]]:
        entry = self.split(name)
        return [bad for shard in entry['shards'] for bad in shard['skipped']] + entry['skipped']

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def remove(self) -> None:
        os.remove(self.path)


# ------------------------------------------------------------------------------------------------ convert

@dataclass
class Job:
    """One conversion: what is read, where it goes, how shards are cut, and what to do with bad images."""
    source: Source
    layout: Layout
    state: State
    limit: ShardLimit
    skip_bad: bool = False
    workers: int = 0
    reencode: bool = field(init=False)

    def __post_init__(self):
        self.reencode = self.layout.name == 'wds'


def convert_split(job: Job, split: str) -> None:
    """Write one split, continuing after the shards the state records as finished."""
    items, entry = job.source.splits[split], job.state.split(split)
    if entry['done']:
        return
    shards = entry['shards']
    skipped = []
    if not shards or shards[-1]['end'] < len(items):  # else only the split's last step was left
        skipped = write_shards(job, split, shards[-1]['end'] if shards else 0)
    left_out = {path for path, _ in job.state.skipped(split) + skipped}
    job.layout.finish(split, [(item.rel, item.label) for item in items if item.path not in left_out])
    job.state.finish(split, skipped)


def write_shards(job: Job, split: str, start: int) -> list[list[str]]:
    """Write ``split`` from image ``start`` on, recording each finished shard; returns the unreadable images
    met after the last one (none of them written)."""
    items, shards = job.source.splits[split], job.state.split(split)['shards']
    number = len(shards)
    shard = job.layout.open(split, number, shards[-1] if shards else None)
    skipped, nbytes = [], 0
    progress = Progress(split, len(items), start)
    for index, (item, sample, why) in enumerate(prepared(items[start:], job.reencode, job.workers), start):
        if sample is None:
            if not job.skip_bad:
                raise UserError(f'{item.path}: not a readable image ({why}); --skip-bad leaves such images out')
            skipped.append([item.path, why])
            continue
        if job.limit.full(shard.count, shard.size, shard.cost(sample)):
            job.state.add_shard(split, {**job.layout.commit(split, number, shard), 'end': index, 'count': shard.count,
                                        'skipped': skipped})
            number, skipped = number + 1, []
            shard = job.layout.open(split, number, shards[-1])
        shard.add(sample)
        nbytes += len(sample.data)
        progress.update(index + 1, nbytes)
    progress.close(len(items), nbytes)
    if shard.count == 0 and (number > 0 or job.layout.name != 'zip'):
        job.layout.discard(shard)  # nothing after the last finished shard (or nothing readable at all)
        return skipped
    job.state.add_shard(split, {**job.layout.commit(split, number, shard), 'end': len(items), 'count': shard.count,
                                'skipped': skipped})
    return []


def parse_size(text: str) -> Optional[int]:
    """``'1G'`` -> 10**9, ``'512MiB'`` -> 512 * 2**20, ``'0'`` -> None (no limit)."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?)B?\s*', text.upper())
    if not match or (match.group(2) == 'I'):
        raise UserError(f'--shard-size {text!r}: expected bytes, e.g. 1G, 500M, 64KiB or 1000000')
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    return size or None


def _options(args: argparse.Namespace) -> tuple[ShardLimit, int]:
    if args.shard_samples is not None and args.shard_samples < 1:
        raise UserError(f'--shard-samples must be >= 1, got {args.shard_samples}')
    if args.row_group_size < 1:
        raise UserError(f'--row-group-size must be >= 1, got {args.row_group_size}')
    return ShardLimit(parse_size(args.shard_size), args.shard_samples), args.row_group_size


def _check_format(fmt: Optional[str]) -> str:
    if fmt not in LAYOUTS:
        raise UserError(f'--format {fmt!r}: expected one of {", ".join(LAYOUTS)}' if fmt else
                        f'--format is required: one of {", ".join(LAYOUTS)}')
    if fmt == 'parquet' and importlib.util.find_spec('pyarrow') is None:
        raise UserError('--format parquet needs pyarrow (pip install pyarrow)')
    return fmt


def convert(args: argparse.Namespace) -> int:
    """``SRC -> DST`` in ``--format``; prints the images left out and a summary line."""
    fmt = _check_format(args.format)
    limit, row_group_size = _options(args)
    source = list_source(args.src, args.dataset)
    check_names(source, fmt)
    header = {'format': fmt, 'shard_bytes': limit.max_bytes, 'shard_samples': limit.max_samples,
              'row_group_size': row_group_size if fmt == 'parquet' else None,
              'source': {split: source.fingerprint(split) for split in source.splits}}
    state = State.open(args.dst, header)
    layout = LAYOUTS[fmt](args.dst, source.classes, row_group_size)
    layout.begin(list(source.splits))
    job = Job(source, layout, state, limit, args.skip_bad, args.workers)
    for split in source.splits:
        convert_split(job, split)
    for split in source.splits:
        for path, why in state.skipped(split):
            print(f'left out: {path} ({why})')
    print(summary(job))
    state.remove()
    return 0


def summary(job: Job) -> str:
    """``wds data/x: train 1281167 images in 147 shards, val 50000 images in 6 shards; 1000 classes; 142.10 GB``."""
    parts, total, left_out = [], 0, 0
    for split in job.source.splits:
        files = job.layout.outputs(split)
        shards = job.state.split(split)['shards']
        total += sum(os.path.getsize(path) for path in files)
        left_out += len(job.state.skipped(split))
        unit = 'archive' if job.layout.name == 'zip' else 'file' if job.layout.name == 'parquet' else 'shard'
        count = 1 if job.layout.name == 'zip' else len(files)
        parts.append(f'{split} {sum(s["count"] for s in shards)} images in {count} {unit}{"s" * (count != 1)}')
    line = (f'{job.layout.name} {job.layout.dst}: {", ".join(parts)}; {len(job.source.classes)} classes; '
            f'{human_bytes(total)}')
    return line + (f'; {left_out} unreadable image{"s" * (left_out != 1)} left out' if left_out else '')


# ------------------------------------------------------------------------------------------------ verify

def _same_pixels(a: bytes, b: bytes) -> bool:
    import numpy as np
    from data.decode import decode_pil
    try:
        return np.array_equal(np.asarray(decode_pil(a)), np.asarray(decode_pil(b)))
    except Exception:
        return False


def _decodes(item: Item) -> bool:
    return prepare(item, reencode=False)[0] is not None


def compare_sample(item: Item, stored: Stored, fmt: str) -> Optional[str]:
    """Why ``stored`` is not the converted ``item``, or None."""
    if stored.label != item.label:
        return f'{stored.where}: label {stored.label}, SRC has {item.label} for {item.path}'
    expected_ext = wds_ext(item.rel) if fmt == 'wds' else image_ext(item.rel)
    if stored.ext != expected_ext:
        return f'{stored.where}: a {stored.ext} image where {item.path} gives {expected_ext}'
    with open(item.path, 'rb') as f:
        data = f.read()
    if stored.data == data:
        return None
    if fmt == 'wds' and image_ext(item.rel) not in WDS_IMAGE_EXTS and _same_pixels(stored.data, data):
        return None  # re-encoded to png: the pixels are what must agree
    return f'{stored.where}: bytes differ from {item.path}'


def compare_split(items: Sequence[Item], stored: Iterator[Stored], fmt: str) -> tuple[Optional[str], int]:
    """``(first mismatch or None, images of SRC left out as unreadable)``."""
    left_out = 0
    current = next(stored, None)
    for item in items:
        name = wds_key(item.rel) if fmt == 'wds' else item.rel
        if current is None or current.name != name:
            if not _decodes(item):
                left_out += 1  # --skip-bad left it out
                continue
            if current is None:
                return f'the converted set ends before {item.path} (sample {name})', left_out
            return f'{current.where}: sample {current.name}, expected {name} ({item.path})', left_out
        problem = compare_sample(item, current, fmt)
        if problem:
            return problem, left_out
        current = next(stored, None)
    if current is not None:
        return f'{current.where}: sample {current.name} is not in SRC (or not at this place)', left_out
    return None, left_out


def verify(args: argparse.Namespace) -> int:
    """Compare ``--verify DST`` with SRC: 0 and an ``ok:`` line, or 1 and a line naming the first mismatch."""
    dst = args.verify
    if not os.path.isdir(dst):
        raise UserError(f'--verify {dst}: folder not found')
    if os.path.isfile(os.path.join(dst, STATE_FILE)):
        raise UserError(f'{dst} holds an unfinished conversion: run the conversion again to finish it first')
    fmt = args.format or detect_format(dst)
    if fmt is None:
        raise UserError(f'--verify {dst}: no converted set there (train.zip, train/*.tar or train/*.parquet)')
    fmt = _check_format(fmt)
    source = list_source(args.src, args.dataset)
    layout = LAYOUTS[fmt](dst, source.classes)
    problem, left_out, count = None, 0, 0
    if fmt != 'zip' and read_classes(dst) != source.classes:
        problem = f'{os.path.join(dst, "classes.txt")} differs from the classes of {args.src}'
    for split, items in source.splits.items():
        if problem:
            break
        problem, skipped = compare_split(items, layout.read(split), fmt)
        left_out, count = left_out + skipped, count + len(items) - skipped
    if problem:
        print(f'mismatch: {problem}', file=sys.stderr)
        return 1
    note = f' ({left_out} unreadable images of SRC left out)' if left_out else ''
    print(f'ok: {dst} ({fmt}) holds the {count} images of {args.src} in order, with their labels and bytes{note}')
    return 0


# ------------------------------------------------------------------------------------------------ command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('python -m tools.make_dataset', description=__doc__.splitlines()[0])
    parser.add_argument('src', metavar='SRC',
                        help='image folder (SRC/train/<class>/*, SRC/val/<class>/*) or the 22K lists')
    parser.add_argument('dst', metavar='DST', nargs='?', help='output folder: new, empty, or an interrupted conversion')
    parser.add_argument('--format', help='zip | wds | parquet (with --verify: found from DST)')
    parser.add_argument('--verify', metavar='DST', help='compare a converted set with SRC instead of converting')
    parser.add_argument('--dataset', default='auto', help='auto | imagenet (class folders) | imagenet22K (JSON lists)')
    parser.add_argument('--shard-size', default='1G', metavar='BYTES',
                        help='wds, parquet: bytes per shard (K/M/G = 1000s, KiB/MiB/GiB = 1024s; 0: no limit); '
                             'zip: how often the archive is checkpointed for resuming (default 1G)')
    parser.add_argument('--shard-samples', type=int, metavar='N', help='at most N images per shard')
    parser.add_argument('--row-group-size', type=int, default=256, metavar='N', help='parquet: rows per row group')
    parser.add_argument('--skip-bad', action='store_true', help='leave undecodable images out (listed at the end)')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes reading and decoding images (0: none)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if (args.dst is None) == (args.verify is None):
            raise UserError('name either DST (convert SRC into it) or --verify DST (compare it with SRC)')
        return verify(args) if args.verify else convert(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted: run the same command again to continue where it stopped', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
