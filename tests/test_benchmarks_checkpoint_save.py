"""benchmarks.checkpoint_save times the step checkpoint a stop signal writes, and leaves nothing behind."""
from __future__ import annotations

import torch

from benchmarks.checkpoint_save import time_save, training_state
from cli import write_tiny_config


def test_the_timed_write_is_a_loadable_step_checkpoint_with_optimizer_state_and_ema(tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path)
    config, model, optimizer, scheduler, ema = training_state(str(cfg), ema=True)
    assert all('exp_avg' in s for s in optimizer.state.values()) and optimizer.state
    written = []
    monkeypatch.setattr('os.remove', lambda p: written.append(torch.load(p, weights_only=True)))
    seconds, size = time_save(config, model, optimizer, scheduler, ema, output=str(tmp_path), repeats=1)
    assert seconds > 0 and size > sum(p.numel() * 4 for p in model.parameters()) * 3  # weights, 2 moments, EMA
    state = written[-1]
    assert state['step'] == 1 and 'model_ema' in state and state['optimizer']['state']
