"""Loader throughput: ours (fast and plain paths) against timm's ``create_loader``, in one run.

Writes a folder of distinct JPEGs cut from the two real photos that ship with scikit-learn (no
download): ImageNet-sized by default (longer side 300-500 px), or large photos with ``--large``
(shorter side 1000-1500 px, upscaled: fine for timing). Then times each loader on it with the same
recipe (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 pixel, bicubic, 224 px), the same batch
size and worker count, alternating the loaders to spread out machine noise. Prints the Pillow build
(stock or SIMD), images per second of each loader and the ratio ours / timm.

    .venv/bin/python benchmarks/loader.py --workers 2 --rounds 3
    .venv/bin/python benchmarks/loader.py --large            # + ours without reduced JPEG decoding
    .venv/bin/python benchmarks/loader.py --eval [--large]   # validation loaders instead
    .venv/bin/python benchmarks/loader.py --stages           # where our fast path's time goes, per stage
    .venv/bin/python benchmarks/loader.py --data-format wds  # ours on tar shards (or parquet) against the folder

``--data-format wds|parquet`` writes the same images as tar shards (256 a shard) or Parquet files (256 a file,
row groups of 100 as the Hugging Face hub writes them) beside the folder and times our fast loader on the folder
and on the layout, read from the files for every image and cached in memory (``DATA.CACHE_MODE full``),
instead of timm against ours.

Two numbers per loader: images per second from the first batch of an epoch to its last (worker
start-up excluded for every loader alike), and CPU milliseconds per image over the whole epoch
(main process and workers), which other load on a shared machine disturbs far less. timm's loader
returns float batches here (``use_prefetcher=False``: its prefetcher targets a GPU); its posterize
op is pointed at our safe version, or it would crash on Pillow 13. Workers are not persistent for
any loader (ours restarts them each epoch to seed them from the epoch).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import get_default_config  # noqa: E402
from data import build_loader, use_safe_posterize  # noqa: E402
from data.decode import pillow_build  # noqa: E402
from tools.make_dataset import main as make_dataset  # noqa: E402  (in-process: a fresh one imports torch again)

RECIPE = dict(auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1,
              color_jitter=0.4, interpolation='bicubic')


def write_jpegs(root: Path, count: int, classes: int = 8, seed: int = 0, large: bool = False,
                val_count: int = 0) -> Path:
    """``root/{train,val}/class_k/*.jpg``: random crops, flips and rescales of scikit-learn's photos.

    Longer side 300-500 px, or shorter side 1000-1500 px when ``large``; ``val_count`` validation
    images (default a tenth of ``count``).
    """
    from sklearn.datasets import load_sample_images
    val_count = val_count or max(classes, count // 10)
    marker = root / f'.done_{count}_{val_count}_{classes}_{seed}_{int(large)}'
    if marker.exists():
        return root
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for split, n in (('train', count), ('val', val_count)):
        for i in range(n):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.45, 1.0)), int(h * rng.uniform(0.45, 1.0))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = photo.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if large:
                scale = int(rng.integers(1000, 1501)) / min(img.size)
            else:
                scale = int(rng.integers(300, 501)) / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            folder = root / split / f'class_{i % classes}'
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{split}_{i:05d}.jpg', quality=int(rng.integers(85, 96)))
    marker.touch()
    return root


def timm_loader(root: Path, batch_size: int, workers: int, train: bool = True):
    from timm.data import ImageDataset, create_loader
    split = 'train' if train else 'val'
    recipe = RECIPE if train else dict(interpolation=RECIPE['interpolation'], crop_pct=224 / 256)
    loader = create_loader(ImageDataset(str(root / split)), input_size=(3, 224, 224), batch_size=batch_size,
                           is_training=train, use_prefetcher=False, num_workers=workers, pin_memory=False,
                           persistent_workers=False, device=torch.device('cpu'), **recipe)
    if train:
        assert use_safe_posterize(loader.dataset.transform) > 0
    return loader


def shard_layout(root: Path, data_format: str) -> Path:
    """The images of the folder ``root`` as tar shards or Parquet files, in ``<root>_<format>`` (written once)."""
    out = root.parent / f'{root.name}_{data_format}'
    marker = out / '.done'
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        size = ['--shard-samples', '256'] + (['--row-group-size', '100'] if data_format == 'parquet' else [])
        if make_dataset(['--format', data_format, *size, str(root), str(out)]) != 0:
            raise SystemExit(f'converting {root} to {data_format} failed')
        marker.touch()
    return out


@dataclass(frozen=True)
class Layout:
    """How the benchmark's images are stored: ``format`` folder, wds or parquet (``root`` is then that layout),
    and whether their bytes are cached in memory (``DATA.CACHE_MODE full``) or read from the files every time."""
    format: str = 'folder'
    cache: bool = False


def our_loader(root: Path, batch_size: int, workers: int, fast: bool, train: bool = True, reduce: bool = True,
               layout: Layout = Layout()):
    """Ours; ``reduce=False`` turns reduced JPEG decoding off (the fast path's full-decode variant)."""
    cfg = get_default_config()
    cfg.DATA.FORMAT, cfg.DATA.CACHE_MODE = layout.format, 'full' if layout.cache else 'no'
    cfg.DATA.DATA_PATH, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS = str(root), batch_size, workers
    cfg.DATA.IMG_SIZE, cfg.DATA.INTERPOLATION, cfg.DATA.PIN_MEMORY = 224, RECIPE['interpolation'], False
    cfg.DATA.FAST_LOADER = fast
    cfg.AUG.AUTO_AUGMENT, cfg.AUG.COLOR_JITTER = RECIPE['auto_augment'], RECIPE['color_jitter']
    cfg.AUG.REPROB, cfg.AUG.REMODE, cfg.AUG.RECOUNT = RECIPE['re_prob'], RECIPE['re_mode'], RECIPE['re_count']
    cfg.MODEL.NUM_CLASSES = 8
    cfg.freeze()
    loader = build_loader(cfg)[2 if train else 3]
    if not reduce:
        loader.dataset.decoder.reduce = False
    return loader


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the epoch's loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_epoch(loader, epoch: int) -> tuple[float, float]:
    """``(images per second, CPU milliseconds per image)`` for one epoch.

    The rate runs from the first batch to the last (worker start-up excluded); the CPU cost covers
    the whole epoch, workers included, and is far less sensitive to other load on the machine.
    """
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(epoch)
    images, total, start, cpu0 = 0, 0, None, _cpu_seconds()
    for samples, _ in loader:
        assert samples.dtype == torch.float32
        total += samples.shape[0]
        if start is None:
            start = time.perf_counter()
        else:
            images += samples.shape[0]
    rate = images / (time.perf_counter() - start)
    return rate, 1e3 * (_cpu_seconds() - cpu0) / total


class _StageClock:
    """Wraps a pipeline stage; adds the CPU time of each call to this process's ``tally[name]`` (a loader
    worker keeps its own tally, which :class:`_CollateReporting` sends back with every batch)."""

    tally: dict[str, float] = {}

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args):
        start = time.process_time()
        try:
            return self.fn(*args)
        finally:
            _StageClock.tally[self.name] = _StageClock.tally.get(self.name, 0.0) + time.process_time() - start


class _CollateReporting:
    def __init__(self, collate):
        self.collate = _StageClock(collate, 'collate')

    def __call__(self, items):
        return self.collate(items), dict(_StageClock.tally)


def stage_times(loader, epoch: int = 0) -> dict[str, float]:
    """CPU milliseconds per image of the stages of our training pipeline, measured inside one loader worker:
    'decode' (crop box from the header, decoding, crop and resize), 'transform' (flip, RandAugment, uint8
    copy) and 'collate' (normalisation and erasing into the shared-memory batch). The loader's dataset gets
    its decoder and transform back afterwards."""
    from torch.utils.data import DataLoader
    from data.loader import BatchBuffers, EpochLoader, KeyedCollate
    from data.samplers import WorkerSeeder
    dataset = loader.dataset
    decoder, transform = dataset.decoder, dataset.transform
    dataset.decoder, dataset.transform = _StageClock(decoder, 'decode'), _StageClock(transform, 'transform')
    loader.set_epoch(epoch)
    buffers = BatchBuffers(1, EpochLoader.PREFETCH + 2)
    worker = DataLoader(dataset, batch_sampler=loader.batch_sampler, num_workers=1,
                        collate_fn=_CollateReporting(KeyedCollate(loader.finish, buffers)),
                        worker_init_fn=WorkerSeeder(loader.seed, epoch, loader.rank))
    images, tally = 0, {}
    try:
        for (batch, *_, slot), tally in worker:
            buffers.release_when_freed(batch, slot)
            images += batch.shape[0]
    finally:
        dataset.decoder, dataset.transform = decoder, transform
    return {name: 1e3 * seconds / images for name, seconds in tally.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default=None, help='image folder to write/reuse (default under /tmp)')
    parser.add_argument('--images', type=int, default=1280)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--large', action='store_true', help='photos with shorter side 1000-1500 px')
    parser.add_argument('--eval', action='store_true', help='time the validation loaders')
    parser.add_argument('--stages', action='store_true', help="only our training pipeline's stages, in one worker")
    parser.add_argument('--data-format', choices=['wds', 'parquet'],
                        help='ours on this layout of the same images against ours on the folder')
    args = parser.parse_args()
    root = Path(args.root or f'/tmp/swin_loader_bench{"_large" if args.large else ""}')
    root = write_jpegs(root, args.images, large=args.large, val_count=args.images if args.eval else 0)
    train = not args.eval
    print(f'PIL: {pillow_build()}', flush=True)
    if args.stages:
        times = stage_times(our_loader(root, args.batch_size, 1, fast=True))
        print('ours fast, CPU ms per image in one worker: '
              + ', '.join(f'{name} {ms:.2f}' for name, ms in times.items()) + f'; sum {sum(times.values()):.2f}')
        return
    if args.data_format:
        shards = shard_layout(root, args.data_format)
        loaders = {'ours fast, folder': our_loader(root, args.batch_size, args.workers, True, train)}
        for cache in (False, True):
            name = f'ours fast, {args.data_format}{", cached" if cache else ""}'
            loaders[name] = our_loader(shards, args.batch_size, args.workers, True, train,
                                       layout=Layout(args.data_format, cache))
    else:
        loaders = {'timm create_loader': timm_loader(root, args.batch_size, args.workers, train),
                   'ours fast': our_loader(root, args.batch_size, args.workers, fast=True, train=train)}
        if args.large and train:
            loaders['ours fast, full decode'] = our_loader(root, args.batch_size, args.workers, True, train,
                                                           reduce=False)
        loaders['ours plain'] = our_loader(root, args.batch_size, args.workers, fast=False, train=train)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    costs: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(args.rounds):
        for name, loader in loaders.items():
            rate, cost = measure_epoch(loader, epoch)
            rates[name].append(rate)
            costs[name].append(cost)
            print(f'round {epoch}: {name:24s} {rate:7.1f} img/s  {cost:5.2f} CPU ms/img', flush=True)
    photos = 'JPEGs, shorter side 1000-1500 px' if args.large else 'JPEGs 300-500 px'
    print(f'\n{pillow_build()}; {"validation" if args.eval else "training"} loaders; {args.images} {photos}, '
          f'batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs; median of {args.rounds} rounds:')
    base = next(iter(loaders))
    base_rate, base_cost = statistics.median(rates[base]), statistics.median(costs[base])
    short = 'folder' if args.data_format else 'timm'
    for name in loaders:
        rate, cost = statistics.median(rates[name]), statistics.median(costs[name])
        print(f'  {name:24s} {rate:7.1f} img/s ({rate / base_rate:.2f}x {short})   '
              f'{cost:5.2f} CPU ms/img ({base_cost / cost:.2f}x {short}\'s images per CPU second)')


if __name__ == '__main__':
    main()
