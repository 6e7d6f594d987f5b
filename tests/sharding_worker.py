"""Run by tests/test_sharding.py under torchrun (2 gloo processes) or alone: DDP and FSDP steps side by side,
sharded checkpoint writes and reads. Prints one ``RESULT {json}`` line from rank 0."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from config import get_default_config
from models import build_model
from optimizer import build_optimizer
from utils.ema import ModelEma
from utils.sharding import (full_model_state, full_optimizer_state, held_bytes, load_sharded, save_sharded,
                            shard_model)


def tiny_config():
    cfg = get_default_config()
    cfg.MODEL.NUM_CLASSES, cfg.DATA.IMG_SIZE, cfg.MODEL.DROP_PATH_RATE = 5, 32, 0.0
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS, cfg.MODEL.SWIN.WINDOW_SIZE = \
        16, [2, 2], [1, 2], 4
    cfg.TRAIN.SHARDING = 'fsdp'
    cfg.freeze()
    return cfg


def batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def train_steps(model, wrapped, optimizer, steps: int, rank: int, ema=None) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = batch(step, rank)
        loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=step + 1)
        losses.append(loss.item())
    return losses


def main(mode: str, folder: str) -> None:
    distributed = 'RANK' in os.environ
    if distributed:
        dist.init_process_group('gloo')
    rank = dist.get_rank() if distributed else 0
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = ModelEma(model, decay=0.9)
    result = {}
    if mode == 'compare':  # 20 steps of DDP and of FSDP from the same weights on the same batches
        twin = build_model(cfg)
        twin.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(twin)
        result['ddp'] = train_steps(twin, ddp, build_optimizer(cfg, twin), 20, rank)
    if distributed:
        shard_model(model, cfg, torch.device('cpu'), None)
        shard_model(ema.module, cfg, torch.device('cpu'), None)
    optimizer = build_optimizer(cfg, model)
    if mode == 'compare':
        result['fsdp'] = train_steps(model, model, optimizer, 20, rank, ema)
        result['held'] = held_bytes(model, optimizer)
        save_sharded(os.path.join(folder, 'ckpt_epoch_0.dcp'), model, optimizer, ema.module,
                     {'epoch': 0, 'has_ema': True, 'has_optimizer': True}, rank)
        whole = {'model': full_model_state(model), 'optimizer': full_optimizer_state(model, optimizer),
                 'model_ema': full_model_state(ema.module)}
        if rank == 0:
            torch.save(whole, os.path.join(folder, 'gathered.pth'))
    else:  # read the sharded checkpoint back (on this run's world size), then one more step
        meta = load_sharded(os.path.join(folder, 'ckpt_epoch_0.dcp'), model, optimizer, ema.module)
        state = full_model_state(model) if distributed else model.state_dict()
        if rank == 0:
            gathered = torch.load(os.path.join(folder, 'gathered.pth'), weights_only=True)
            result['epoch'] = meta['epoch']
            result['max_diff'] = max(float((state[k] - v).abs().max()) for k, v in gathered['model'].items())
        result['next'] = train_steps(model, model, optimizer, 1, rank)
    if rank == 0:
        print('RESULT ' + json.dumps(result))
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
