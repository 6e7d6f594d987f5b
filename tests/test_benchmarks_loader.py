"""benchmarks/loader.py: the per-stage timing of our training pipeline runs inside a real loader worker; its tar
shard and Parquet layouts of the photos (``--data-format``) give the folder's batches."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loader import our_loader, stage_times, write_jpegs  # noqa: E402


def test_stage_times_reports_each_stage_of_the_fast_path_per_image(tmp_path):
    root = write_jpegs(tmp_path / 'photos', count=16, classes=2)
    times = stage_times(our_loader(root, batch_size=8, workers=1, fast=True))
    assert set(times) == {'decode', 'transform', 'collate'}
    assert all(ms > 0 for ms in times.values())


def test_stage_times_gives_the_dataset_its_decoder_and_transform_back(tmp_path):
    loader = our_loader(write_jpegs(tmp_path / 'photos', count=16, classes=2), batch_size=8, workers=1, fast=True)
    decoder, transform = loader.dataset.decoder, loader.dataset.transform
    stage_times(loader)
    assert loader.dataset.decoder is decoder and loader.dataset.transform is transform


def test_the_shard_layouts_of_the_benchmark_images_give_the_folders_first_batch(tmp_path):
    from benchmarks.loader import Layout, shard_layout
    root = write_jpegs(tmp_path / 'photos', count=8, classes=2)
    batches = {}
    for data_format in ('folder', 'wds', 'parquet'):
        path = root if data_format == 'folder' else shard_layout(root, data_format)
        loader = our_loader(path, batch_size=4, workers=0, fast=True, layout=Layout(data_format))
        loader.set_epoch(0)
        batches[data_format] = next(iter(loader))
    for data_format in ('wds', 'parquet'):
        assert all(torch.equal(a, b) for a, b in zip(batches['folder'], batches[data_format])), data_format
