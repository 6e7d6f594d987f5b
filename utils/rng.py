"""Random-number state of a training process, as plain data a ``weights_only`` load accepts.

Training draws from Python's ``random``, NumPy's global generator (timm's mixup) and torch's CPU and
CUDA generators (drop path, dropout). Each epoch starts from generators seeded by
``(seed, epoch, rank)``; a run stopped mid-epoch also saves the exact state reached, per rank.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """This process's generator states (tensors, tuples and numbers only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what :func:`capture_rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_process(seed: int) -> None:
    """Seed every generator training draws from (CUDA's too, when present)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
