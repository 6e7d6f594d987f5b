"""benchmarks/loader.py: the per-stage timing of our training pipeline runs inside a real loader worker."""
from __future__ import annotations

import sys
from pathlib import Path

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
