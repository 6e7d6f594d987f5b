"""Data for SimMIM pre-training: random patch masks, the light augmentation, and a masked loader.

``build_loader_simmim(config)`` returns ``(dataset, loader)``; the loader yields ``(images, masks)``:
normalised images ``(B, C, H, W)`` (C: the model's IN_CHANS; DATA.MEAN / DATA.STD) and masks
``(B, H / p, W / p)`` (1 = hidden) at the model's patch size ``p``. Masks hide DATA.MASK_RATIO of the
DATA.MASK_PATCH_SIZE squares (rounded up), as the official MaskGenerator does. Images come from the folder
DATA_PATH/train (or DATA_PATH itself when it has no train folder, as the official script reads it), the zip
layout's train split, or the training shards of DATA.FORMAT wds / parquet; labels are ignored.

The images go through the usual loader (per-sample seeded crops, unreadable-file tolerance); each
batch's masks are drawn from a generator seeded by ``(seed, epoch, rank, step)``, so a resumed epoch
sees the masks an uninterrupted one would have.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from config import img_size_hw
from utils.errors import UserError

from .build import SHARD_EXTENSIONS, build_shard_dataset, data_format, dist_info, input_spec
from .datasets import ARRAY_EXTENSIONS, IMG_EXTENSIONS, ImageFolderDataset, ZipMapDataset
from .decode import ChannelDecoder, decode_tensor
from .loader import EpochLoader
from .samplers import DistributedShuffleSampler, SeededBatchSampler, mix_seed
from .transforms import BatchNormalize, FastTrainTransform, InputSpec, TensorRandomResizedCrop

__all__ = ['MaskGenerator', 'MaskedLoader', 'build_simmim_transform', 'build_loader_simmim']

_logger = logging.getLogger(__name__)
_MASK_STREAM = 0x5111A  # separates the mask seeds from the augmentation seeds


class MaskGenerator:
    """Random masks: ``mask_ratio`` of the ``mask_patch_size`` square cells of an ``input_size`` image
    (a side or (H, W)).

    Returns an ``(H / model_patch_size, W / model_patch_size)`` int array, each cell repeated over the
    model patches it covers.
    """

    def __init__(self, input_size: Union[int, Sequence[int]] = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6):
        if any(side % mask_patch_size for side in img_size_hw(input_size)):
            raise UserError(f"DATA.IMG_SIZE {input_size} is not a multiple of DATA.MASK_PATCH_SIZE {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise UserError(f"DATA.MASK_PATCH_SIZE {mask_patch_size} is not a multiple of the model's "
                            f"PATCH_SIZE {model_patch_size}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise UserError(f"DATA.MASK_RATIO must be between 0 and 1, got {mask_ratio}")
        self.input_size, self.mask_patch_size = input_size, mask_patch_size
        self.model_patch_size, self.mask_ratio = model_patch_size, mask_ratio
        self.rand_size = tuple(side // mask_patch_size for side in img_size_hw(input_size))
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size[0] * self.rand_size[1]
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        cells = np.zeros(self.token_count, dtype=np.int64)
        cells[rng.permutation(self.token_count)[:self.mask_count]] = 1
        grid = cells.reshape(self.rand_size)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def batch(self, n: int, seed: int) -> torch.Tensor:
        """``(n, H / p, W / p)`` masks drawn from one generator seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.stack([self(rng) for _ in range(n)]))


def build_simmim_transform(img_size: Union[int, Sequence[int]], spec: Optional[InputSpec] = None):
    """``(transform, decoder, batch_finish)``: random resized crop (scale 0.67-1), flip, normalise. ``spec``:
    the input (default RGB, ImageNet's statistics); other than RGB, the same steps on float tensors."""
    spec = spec or InputSpec()
    crop = TensorRandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bilinear')
    decoder = decode_tensor if spec.rgb else ChannelDecoder(spec.channels)
    return FastTrainTransform(crop, None), decoder, BatchNormalize(spec.mean, spec.std, exact=False)


class MaskedLoader:
    """Wraps an :class:`EpochLoader`: yields ``(images, masks)`` per batch instead of ``(images, targets)``."""

    def __init__(self, loader: EpochLoader, masks: MaskGenerator, seed: int = 0, rank: int = 0):
        self.loader, self.masks, self.seed, self.rank = loader, masks, seed, rank
        self.epoch, self.start_step = 0, 0

    @property
    def sampler(self):
        return self.loader.sampler

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step
        self.loader.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, _) in enumerate(self.loader, start=self.start_step):
            seed = mix_seed(self.seed, self.epoch, self.rank, step, _MASK_STREAM)
            yield images, self.masks.batch(images.shape[0], seed)


def _model_patch_size(config) -> int:
    section = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}.get(config.MODEL.TYPE)
    if section is None:
        raise UserError(f"SimMIM pre-training supports MODEL.TYPE swin, swinv2, swin_mlp, not {config.MODEL.TYPE!r}")
    return config.MODEL[section].PATCH_SIZE


def _dataset(config, transform, decoder, rank: int, world: int, extensions: Sequence[str] = IMG_EXTENSIONS):
    common = dict(transform=transform, decoder=decoder, on_bad='replace', blank_size=config.DATA.IMG_SIZE)
    if data_format(config) in SHARD_EXTENSIONS:
        return build_shard_dataset(config, 'train', rank, world, **common)
    path = config.DATA.DATA_PATH
    if not path or not os.path.isdir(path):
        raise UserError(f"DATA.DATA_PATH not found: {path!r} (use --data-path)")
    if data_format(config) == 'zip':
        mode = config.DATA.CACHE_MODE
        return ZipMapDataset(path, 'train', cache_mode=mode, rank=rank, world_size=world, **common)
    folder = os.path.join(path, 'train')
    folder = folder if os.path.isdir(folder) else path
    _logger.info(f"SimMIM pre-training images: {folder}")
    return ImageFolderDataset(folder, extensions=extensions, **common)


def build_loader_simmim(config) -> tuple[object, MaskedLoader]:
    """``(dataset, loader)`` for pre-training, from DATA.* and the model's patch size."""
    rank, world = dist_info()
    masks = MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, _model_patch_size(config),
                          config.DATA.MASK_RATIO)
    spec = input_spec(config)
    transform, decoder, finish = build_simmim_transform(config.DATA.IMG_SIZE, spec)
    dataset = _dataset(config, transform, decoder, rank, world,
                       IMG_EXTENSIONS if spec.rgb else IMG_EXTENSIONS + ARRAY_EXTENSIONS)
    sampler = DistributedShuffleSampler(dataset.__len__, rank, world, seed=config.SEED)
    batches = SeededBatchSampler(sampler, config.DATA.BATCH_SIZE, drop_last=True, seed=config.SEED, rank=rank)
    loader = EpochLoader(dataset, batches, num_workers=config.DATA.NUM_WORKERS, pin_memory=config.DATA.PIN_MEMORY,
                         finish=finish, seed=config.SEED, rank=rank, max_bad_fraction=config.DATA.MAX_BAD_FRACTION)
    if len(loader) == 0:
        raise UserError(f"the pre-training set ({len(dataset)} images) is smaller than one batch of "
                        f"DATA.BATCH_SIZE={config.DATA.BATCH_SIZE}")
    return dataset, MaskedLoader(loader, masks, seed=config.SEED, rank=rank)
