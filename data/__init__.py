"""Data: the official layouts (image folder, zip + map, ImageNet-22K JSON), WebDataset tar shards and Parquet
files, transforms, samplers, loaders.

``build_loader(config)`` is the entry point the engine uses; the pieces are importable for reuse.
"""
from .build import build_dataset, build_loader, build_mixup, build_transform
from .decode import PIL_SIMD, pillow_build
from .datasets import ImageFolderDataset, ImageListDataset, ImageNet22KDataset, ZipMapDataset
from .loader import EpochLoader
from .parquet import ParquetDataset
from .wds import TarShardDataset
from .augment_ops import safe_posterize, use_safe_posterize

__all__ = ['build_loader', 'build_dataset', 'build_mixup', 'build_transform', 'EpochLoader',
           'ImageListDataset', 'ImageFolderDataset', 'ZipMapDataset', 'ImageNet22KDataset', 'TarShardDataset',
           'ParquetDataset',
           'safe_posterize', 'use_safe_posterize', 'PIL_SIMD', 'pillow_build']
