"""How long rank 0 takes to write the resumable step checkpoint that a stop signal asks for.

torchrun's agent sends SIGKILL 30 s after forwarding SIGTERM; SLURM waits ``KillWait`` (30 s by default) after
its SIGTERM. The stop lands at the next log step (at most PRINT_FREQ - 1 more optimizer steps), then every rank
sends its random state to rank 0 (a few kB) and rank 0 alone writes model, AdamW state, scheduler, scaler and
EMA with one ``torch.save`` into a temporary file, fsyncs it and renames it over the old one. This script times
that write for the official models (weights built from their configs, AdamW state after one step), on the disk
of ``--output``:

    .venv/bin/python -m benchmarks.checkpoint_save                       # Swin-T, -B and -L (224), to /tmp
    .venv/bin/python -m benchmarks.checkpoint_save --configs configs/swin/swin_large_patch4_window7_224.yaml \\
        --ema --output /scratch/$USER
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import get_default_config, merge_yaml  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils.checkpoint import TrainingState, build_checkpointer  # noqa: E402
from utils.ema import ModelEma  # noqa: E402

DEFAULT_CONFIGS = ['configs/swin/swin_tiny_patch4_window7_224.yaml', 'configs/swin/swin_base_patch4_window7_224.yaml',
                   'configs/swin/swin_large_patch4_window7_224.yaml']


def training_state(config_path: str, ema: bool):
    """The model, AdamW (with its moment buffers, as after a step), scheduler and EMA of an official config."""
    config = get_default_config()
    merge_yaml(config, config_path)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = build_scheduler(config, optimizer, n_iter_per_epoch=1000)
    return config, model, optimizer, scheduler, (ModelEma(model) if ema else None)


def time_save(config, model, optimizer, scheduler, model_ema, output: str, repeats: int) -> tuple[float, int]:
    """Median seconds of ``Checkpointer.save(..., step=...)`` and the file's size in bytes."""
    config.defrost()
    config.OUTPUT = output
    checkpointer = build_checkpointer(config, TrainingState(model, optimizer, scheduler, None, model_ema), 0,
                                      logging.getLogger('checkpoint_save'))
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        path = checkpointer.save(0, 0.0, step=i + 1, extra={'rng_states': [torch.get_rng_state()]})
        seconds.append(time.perf_counter() - start)
    size = os.path.getsize(path)
    os.remove(path)
    return statistics.median(seconds), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS)
    parser.add_argument('--output', default=tempfile.gettempdir(), help='a folder on the disk to measure')
    parser.add_argument('--ema', action='store_true', help='also an EMA copy of the weights (MODEL_EMA)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    print(f'step checkpoint write (torch.save + fsync + rename) to {args.output}; median of {args.repeats}')
    print(f"{'config':<44} {'params':>8} {'file':>9} {'seconds':>8} {'GB/s':>6}")
    for path in args.configs:
        state = training_state(path, args.ema)
        with tempfile.TemporaryDirectory(dir=args.output) as folder:
            seconds, size = time_save(*state, output=folder, repeats=args.repeats)
        params = sum(p.numel() for p in state[1].parameters())
        print(f'{Path(path).stem:<44} {params / 1e6:>7.1f}M {size / 1e9:>7.2f}GB {seconds:>8.2f} '
              f'{size / 1e9 / seconds:>6.2f}')


if __name__ == '__main__':
    main()
