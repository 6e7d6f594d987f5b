"""``build_loader(config)``: datasets, samplers, loaders and mixup from the config.

The only module of ``data/`` that reads config keys (DATA.*, AUG.*, TEST.*, MODEL.NUM_CLASSES,
MODEL.LABEL_SMOOTHING, the model family's IN_CHANS, SEED, EVAL_MODE); everything it builds takes plain
arguments, the augmentation and the input as :class:`~data.transforms.TrainAugment` and
:class:`~data.transforms.InputSpec` (:func:`train_augment`, :func:`input_spec`). Returns what the
official ``build_loader`` returns, with these differences users may notice:

* the number of classes comes from the data and is checked against MODEL.NUM_CLASSES (more is a
  ``UserError``, fewer a warning) instead of being fixed at 1000 / 21841;
* validation is sharded without padding (rank r takes images r, r + world, ...): every image is
  evaluated once whatever the world size; TEST.SHUFFLE shuffles within a shard, TEST.SEQUENTIAL is
  not needed (and ignored) since shards are always exact;
* the config is never modified;
* DATA.FORMAT (ours) adds WebDataset tar shards and Parquet files to the folder and zip layouts.
* multi-label data (DATA.LABEL_FILE, data/label_file.py) give multi-hot float targets, mixed by
  :class:`~data.mixup.MultiLabelMixup`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Optional, Sequence

import torch.distributed as dist
from timm.data import Mixup

from config import MODEL_SECTIONS
from utils.errors import UserError

from .datasets import (ARRAY_EXTENSIONS, IMG_EXTENSIONS, ArchiveDataset, FileListDataset, ImageFolderDataset,
                       ImageListDataset, ImageNet22KDataset, ZipMapDataset)
from .label_file import LabelTable, load_label_table
from .loader import EpochLoader
from .mixup import MultiLabelMixup
from .parquet import ParquetDataset
from .samplers import (DistributedShuffleSampler, RepeatedAugSampler, SeededBatchSampler, ShardShuffleSampler,
                       ValShardSampler)
from .shards import IndexStore, find_shards, read_class_names
from .storage import is_url, storage_for
from .transforms import InputSpec, TrainAugment, build_eval_transform, build_train_transform
from .wds import TarShardDataset

_logger = logging.getLogger(__name__)

IN22K_PREFIX = 'ILSVRC2011fall_whole'
CACHE_MODES = ('no', 'full', 'part')
SHARD_EXTENSIONS = {'wds': '.tar', 'parquet': '.parquet'}


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_loader(config) -> tuple[ImageListDataset, ImageListDataset, EpochLoader, EpochLoader, Optional[Mixup]]:
    """``(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn)``."""
    rank, world = dist_info()
    mixup_fn = build_mixup(config)  # first: its config errors should not wait for a cache to fill
    input_spec(config)  # likewise
    _check_data_path(config.DATA.DATA_PATH)
    labels = load_label_table(config.DATA.LABEL_FILE, config.DATA.CLASSES_FILE, config.DATA.DATA_PATH)
    dataset_train, finish_train = build_dataset(True, config, rank, world, labels=labels)
    dataset_val, finish_val = build_dataset(False, config, rank, world, classes=dataset_train.classes
                                            if isinstance(dataset_train, ImageFolderDataset) else None, labels=labels)
    check_num_classes(config, dataset_train, dataset_val)
    sampler_train = build_train_sampler(config, dataset_train, rank, world)
    loader_train = _epoch_loader(config, dataset_train, sampler_train, finish_train, rank, train=True)
    sampler_val = ValShardSampler(len(dataset_val), rank, world, shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    loader_val = _epoch_loader(config, dataset_val, sampler_val, finish_val, rank, train=False)
    if not config.EVAL_MODE and len(loader_train) == 0:
        raise UserError(f'the training set ({len(dataset_train)} images, {len(sampler_train)} per rank) is smaller '
                        f'than one batch of DATA.BATCH_SIZE={config.DATA.BATCH_SIZE}')
    return dataset_train, dataset_val, loader_train, loader_val, mixup_fn


def _epoch_loader(config, dataset, sampler, finish, rank: int, train: bool) -> EpochLoader:
    """Training drops the last partial batch (mixup pairs samples) and bounds unreadable images."""
    batches = SeededBatchSampler(sampler, config.DATA.BATCH_SIZE, drop_last=train, seed=config.SEED, rank=rank)
    return EpochLoader(dataset, batches, num_workers=config.DATA.NUM_WORKERS, pin_memory=config.DATA.PIN_MEMORY,
                       finish=finish, seed=config.SEED, rank=rank,
                       max_bad_fraction=config.DATA.MAX_BAD_FRACTION if train else None)


def build_transform(is_train: bool, config):
    """``(transform, decoder, batch_finish)`` for the split, from DATA.*, AUG.*, TEST.* and IN_CHANS."""
    spec = input_spec(config)
    if is_train:
        return build_train_transform(config.DATA.IMG_SIZE, train_augment(config, spec), fast=config.DATA.FAST_LOADER,
                                     spec=spec)
    crop_pct = config.TEST.CROP_PCT
    if not 0 < crop_pct <= 1:
        raise UserError(f'TEST.CROP_PCT must be in (0, 1], got {crop_pct}')
    return build_eval_transform(config.DATA.IMG_SIZE, interpolation=config.DATA.INTERPOLATION, crop=config.TEST.CROP,
                                fast=config.DATA.FAST_LOADER, crop_pct=crop_pct, spec=spec)


def input_spec(config) -> InputSpec:
    """The input the model takes: its family's IN_CHANS (MODEL.SWIN.IN_CHANS for swin, ...), DATA.MEAN and
    DATA.STD; a UserError naming the keys when the statistics do not have one value per channel."""
    key = f'MODEL.{MODEL_SECTIONS[config.MODEL.TYPE]}.IN_CHANS'
    channels = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]].IN_CHANS
    if channels < 1:
        raise UserError(f'{key} must be at least 1, got {channels}')
    mean, std = _numbers(config.DATA.MEAN, 'DATA.MEAN'), _numbers(config.DATA.STD, 'DATA.STD')
    if len(mean) != channels or len(std) != channels:
        raise UserError(f'DATA.MEAN and DATA.STD need one value per input channel ({key} is {channels}), got '
                        f'{len(mean)} and {len(std)}: e.g. --opts DATA.MEAN "{[0.5] * channels}" '
                        f'DATA.STD "{[0.5] * channels}"')
    if min(std) <= 0:
        raise UserError(f'DATA.STD values must be positive, got {list(std)}')
    return InputSpec(channels, mean, std)


def _numbers(values: Sequence, key: str, count: Optional[int] = None) -> tuple[float, ...]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or (
            count is not None and len(values) != count):
        what = f'{count} numbers' if count else 'a list of numbers'
        raise UserError(f'bad value for config key {key}: {list(values)!r} (expected {what})')
    return tuple(float(v) for v in values)


def _range(values: Sequence, key: str) -> tuple[float, float]:
    low, high = _numbers(values, key, count=2)
    if not 0 < low <= high:
        raise UserError(f'bad value for config key {key}: {list(values)!r} (expected [low, high] with 0 < low <= high)')
    return low, high


def _probability(value: float, key: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise UserError(f'bad value for config key {key}: {value!r} (a probability, between 0 and 1)')
    return float(value)


def train_augment(config, spec: InputSpec) -> TrainAugment:
    """The training augmentation from AUG.* and DATA.INTERPOLATION. For input other than RGB, colour jitter
    and auto-augment (RGB operations) are turned off, with one warning line naming the keys."""
    aug = config.AUG
    settings = TrainAugment(
        interpolation=config.DATA.INTERPOLATION, color_jitter=aug.COLOR_JITTER, auto_augment=aug.AUTO_AUGMENT,
        re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT, scale=_range(aug.RRC_SCALE, 'AUG.RRC_SCALE'),
        ratio=_range(aug.RRC_RATIO, 'AUG.RRC_RATIO'), hflip=_probability(aug.HFLIP, 'AUG.HFLIP'),
        vflip=_probability(aug.VFLIP, 'AUG.VFLIP'))
    if not spec.rgb and settings.colour:
        on = [f'AUG.COLOR_JITTER {aug.COLOR_JITTER}'] if settings.color_jitter > 0 else []
        on += [f'AUG.AUTO_AUGMENT {settings.policy}'] if settings.policy else []
        _logger.warning(f'{" and ".join(on)}: RGB augmentation, off for this {spec.channels}-channel input '
                        '(set AUG.COLOR_JITTER 0 and AUG.AUTO_AUGMENT none to silence this line)')
        settings = replace(settings, color_jitter=0.0, auto_augment='none')
    return settings


def data_format(config) -> str:
    """The layout of DATA_PATH: DATA.FORMAT, else ``zip`` under DATA.ZIP_MODE (the official ``--zip``), else
    ``folder``. (The two keys contradicting each other is refused when the config is read.)"""
    return config.DATA.FORMAT or ('zip' if config.DATA.ZIP_MODE else 'folder')


def _check_data_path(path: str) -> None:
    if not path:
        raise UserError('DATA.DATA_PATH is not set (use --data-path)')
    if is_url(path):
        return  # checked when its shards are looked for
    if not os.path.isdir(path):
        raise UserError(f'DATA.DATA_PATH not found: {path}')
    if not os.listdir(path):
        raise UserError(f'DATA.DATA_PATH is empty: {path}')


def build_dataset(is_train: bool, config, rank: int = 0, world: int = 1, classes: Optional[list] = None,
                  labels: Optional[LabelTable] = None):
    """``(dataset, batch_finish)`` for one split in the layout the config names.

    In EVAL_MODE the training set is built lazily (files listed on first use) and uncached. With DATA.LABEL_FILE
    the split's images and labels are the label file's (``labels``, read here when not given).
    """
    path = config.DATA.DATA_PATH
    _check_data_path(path)
    transform, decoder, finish = build_transform(is_train, config)
    extensions = IMG_EXTENSIONS if input_spec(config).rgb else IMG_EXTENSIONS + ARRAY_EXTENSIONS
    common = dict(transform=transform, decoder=decoder, on_bad='replace' if is_train else 'blank',
                  blank_size=config.DATA.IMG_SIZE, lazy=is_train and config.EVAL_MODE)
    split = 'train' if is_train else 'val'
    layout = data_format(config)
    if layout in SHARD_EXTENSIONS:
        if config.DATA.LABEL_FILE:
            raise UserError(f'DATA.LABEL_FILE is for the folder and zip layouts; {layout} data carry their labels')
        dataset = build_shard_dataset(config, split, rank, world, **common)
    elif config.DATA.LABEL_FILE:
        labels = labels or load_label_table(config.DATA.LABEL_FILE, config.DATA.CLASSES_FILE, path)
        listed = (labels.rows(split, required=not common['lazy']), labels.classes)  # --eval: no training rows
        if layout == 'zip':
            dataset = ZipMapDataset(path, split, cache_mode=_cache_mode(config, is_train), rank=rank,
                                    world_size=world, listed=listed, **common)
        else:
            dataset = FileListDataset(os.path.join(path, split), *listed, **common)
        dataset.target_width = config.MODEL.NUM_CLASSES  # multi-hot targets as wide as the model's outputs
    elif config.DATA.DATASET == 'imagenet22K':
        dataset = ImageNet22KDataset(path, f'{IN22K_PREFIX}_map_{split}.txt', **common)
    elif layout == 'zip':
        dataset = ZipMapDataset(path, split, cache_mode=_cache_mode(config, is_train), rank=rank,
                                world_size=world, **common)
    else:
        folder = os.path.join(path, split)
        if not os.path.isdir(folder):
            raise UserError(f'{split} folder not found: {folder} (expected DATA_PATH/{split}/<class>/<images>)')
        dataset = ImageFolderDataset(folder, classes=classes, extensions=extensions, **common)
    if not common['lazy']:
        _logger.info(f'{split} set: {len(dataset)} images, {dataset.num_classes} classes ({type(dataset).__name__})')
    return dataset, finish


def build_shard_dataset(config, split: str, rank: int, world: int, **common) -> ArchiveDataset:
    """The tar shards (DATA.FORMAT wds) or Parquet files (parquet) of ``split`` ('train' or 'val'), found as
    ``data.shards`` describes (DATA.TRAIN_SHARDS / DATA.VAL_SHARDS name them), labels from the data whatever
    DATA.DATASET; new shard indexes are cached beside the shards, else in the run's output folder."""
    layout, root = data_format(config), config.DATA.DATA_PATH
    storage = storage_for(root)
    pattern = config.DATA.TRAIN_SHARDS if split == 'train' else config.DATA.VAL_SHARDS
    files = find_shards(storage, root, split, SHARD_EXTENSIONS[layout], pattern)
    classes = read_class_names(storage, root)
    cache = dict(cache_mode=_cache_mode(config, split == 'train'), rank=rank, world_size=world)
    if layout == 'wds':
        return TarShardDataset(files, classes, IndexStore(config.OUTPUT or None), **cache, **common)
    columns = (config.DATA.PARQUET_IMAGE_COLUMN, config.DATA.PARQUET_LABEL_COLUMN)
    return ParquetDataset(files, columns, classes, **cache, **common)


def _cache_mode(config, is_train: bool) -> str:
    mode = config.DATA.CACHE_MODE
    if mode not in CACHE_MODES:
        raise UserError(f'DATA.CACHE_MODE must be one of {CACHE_MODES}, got {mode!r}')
    if is_train and config.EVAL_MODE:
        return 'no'  # an evaluation never reads the training images: do not cache them
    return mode


def check_num_classes(config, dataset_train: ImageListDataset, dataset_val: ImageListDataset) -> int:
    """The number of classes in the data; a ``UserError`` when it exceeds MODEL.NUM_CLASSES."""
    found = max(dataset_val.num_classes, dataset_train.known_num_classes() or 0)
    expected = config.MODEL.NUM_CLASSES
    if found > expected:
        raise UserError(f'the data in {config.DATA.DATA_PATH} has {found} classes but MODEL.NUM_CLASSES is '
                        f'{expected}: set MODEL.NUM_CLASSES {found} (with --opts)')
    if found < expected:
        _logger.warning(f'the data in {config.DATA.DATA_PATH} has {found} classes, fewer than '
                        f'MODEL.NUM_CLASSES={expected}; the extra outputs are never a target')
    return found


def build_train_sampler(config, dataset: ImageListDataset, rank: int, world: int):
    """Shard sampler for the ``part`` cache (zip, tar shards, Parquet), else repeated-augmentation or plain
    distributed shuffle."""
    repeats = config.AUG.REPEATED_AUG
    if repeats < 0 or repeats == 1:
        raise UserError(f'AUG.REPEATED_AUG must be 0 (off) or at least 2, got {repeats}')
    if isinstance(dataset, ArchiveDataset) and dataset.cache_mode == 'part':
        if repeats:
            raise UserError('AUG.REPEATED_AUG needs DATA.CACHE_MODE full or no: with part, '
                            'each rank only holds its own images')
        return ShardShuffleSampler(range(rank, len(dataset), world), math.ceil(len(dataset) / world),
                                   seed=config.SEED, rank=rank)
    if repeats:
        return RepeatedAugSampler(dataset.__len__, rank, world, seed=config.SEED, repeats=repeats)
    return DistributedShuffleSampler(dataset.__len__, rank, world, seed=config.SEED)


def build_mixup(config) -> Optional[Mixup]:
    """timm's Mixup/CutMix from AUG.*, or None when both are off or the run does not train (EVAL_MODE,
    THROUGHPUT_MODE): evaluation never mixes, so its batch size need not be even."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise UserError(f'DATA.BATCH_SIZE must be even with mixup/cutmix on (it pairs samples), '
                        f'got {config.DATA.BATCH_SIZE}')
    mixup_class = MultiLabelMixup if config.DATA.LABEL_FILE else Mixup
    return mixup_class(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
