"""Bytes of parameters, gradients and AdamW state each rank holds: TRAIN.SHARDING ddp against fsdp.

For each world size, N processes (gloo, on this machine's CPU) build the model from its config the way
main.py does, wrap it with DDP or shard it with ``fully_shard`` (utils/sharding.py), build AdamW with the
official grouping, and take one real training step (forward, backward, optimizer step) on a batch of one
random image, so that every gradient and both AdamW moments exist. Each rank then counts the bytes of the
tensors it holds (its local shards under FSDP) and the script prints them with the ratio fsdp / ddp, which
should be close to 1 / N. The ratio compares the two engines on the same model code, optimizer and
process layout; activations are left out (they do not depend on the sharding of the weights).

    .venv/bin/python -m benchmarks.sharding_memory                  # Swin-B (224), 2 and 4 processes
    .venv/bin/python -m benchmarks.sharding_memory --cfg configs/swin/swin_large_patch4_window7_224.yaml
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import get_default_config, img_size_hw, merge_yaml  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils.sharding import held_bytes, shard_model  # noqa: E402

DEFAULT_CFG = 'configs/swin/swin_base_patch4_window7_224.yaml'
KINDS = ('parameters', 'gradients', 'optimizer')


# How the ranks start: what they count (tensor bytes) does not depend on it; the tests fork them from a forkserver
# to reuse its imports (a spawned rank imports torch again).
START_METHOD = 'spawn'


def _config(cfg_path: str, sharding: str, opts: Sequence[str]):
    from config import merge_opts
    cfg = get_default_config()
    merge_yaml(cfg, cfg_path)
    merge_opts(cfg, list(opts) + ['TRAIN.SHARDING', sharding])
    cfg.freeze()
    return cfg


def _rank_main(rank: int, world: int, port: int, cfg_path: str, sharding: str, opts: Sequence[str], queue) -> None:
    torch.set_num_threads(1)  # first: a forked rank must not use its parent's OpenMP pool
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        cfg = _config(cfg_path, sharding, opts)
        model = build_model(cfg, device='cpu')
        if sharding == 'fsdp':
            shard_model(model, cfg, torch.device('cpu'), amp_dtype=None)
            wrapped = model
        else:
            wrapped = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        optimizer = build_optimizer(cfg, model)
        height, width = img_size_hw(cfg.DATA.IMG_SIZE)
        logits = wrapped(torch.randn(1, 3, height, width))
        logits.float().logsumexp(-1).sum().backward()
        optimizer.step()
        queue.put((sharding, world, rank, held_bytes(model, optimizer)))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def measure(cfg_path: str, sharding: str, world: int, opts: Sequence[str] = ()) -> list[dict]:
    """Per-rank held bytes of one training step under ``sharding`` with ``world`` processes."""
    ctx = mp.get_context(START_METHOD)
    queue = ctx.Queue()
    mp.start_processes(_rank_main, args=(world, free_port(), cfg_path, sharding, tuple(opts), queue),
                       nprocs=world, join=True, start_method=START_METHOD)
    rows = [queue.get() for _ in range(world)]
    return [held for *_, held in sorted(rows, key=lambda r: r[2])]


def report(cfg_path: str, worlds: Sequence[int], opts: Sequence[str] = ()) -> list[dict]:
    """Measure ddp and fsdp at each world size and print one line per (world size, sharding)."""
    rows = []
    print(f"{Path(cfg_path).stem}: MiB held per rank after one training step (largest rank), on the CPU with gloo")
    for world in worlds:
        per = {s: measure(cfg_path, s, world, opts) for s in ('ddp', 'fsdp')}
        top = {s: {k: max(r[k] for r in per[s]) for k in KINDS} for s in per}
        for sharding in ('ddp', 'fsdp'):
            total = sum(top[sharding].values())
            ratio = total / sum(top['ddp'].values())
            cells = '  '.join(f"{k} {top[sharding][k] / 2 ** 20:8.1f}" for k in KINDS)
            print(f"  {world} processes  {sharding:4s}  {cells}  total {total / 2 ** 20:8.1f}  "
                  f"fsdp/ddp {ratio:.3f} (1/N = {1 / world:.3f})" if sharding == 'fsdp' else
                  f"  {world} processes  {sharding:4s}  {cells}  total {total / 2 ** 20:8.1f}")
            rows.append({'world': world, 'sharding': sharding, **top[sharding], 'ratio': ratio})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser('Per-rank bytes under DDP and FSDP')
    parser.add_argument('--cfg', default=DEFAULT_CFG)
    parser.add_argument('--worlds', type=int, nargs='+', default=[2, 4])
    parser.add_argument('--opts', nargs='+', default=[])
    args = parser.parse_args(argv)
    report(args.cfg, args.worlds, args.opts)


if __name__ == '__main__':
    main()
