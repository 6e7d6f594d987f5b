"""The paper's model table, measured here: parameters, GFLOPs and inference throughput of each paper model,
next to the paper's own figures (params, FLOPs, V100 img/s, from the official release).

    .venv/bin/python -m tools.model_table                      # fast: batch 8, 1 warm-up + 2 timed passes
    .venv/bin/python -m tools.model_table --all --batch 64 --iters 10 --amp bf16

Parameters and FLOPs come from :mod:`models.complexity` (FLOPs = multiply-adds, as the paper counts
them). Throughput is the forward pass in eval mode, as ``main.py --throughput`` measures it; absolute
numbers depend on the machine (the paper's are on one V100 at batch 64).
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch

from models import count_flops, count_params, create_model

__all__ = ['PAPER', 'measure', 'table']

# name -> (label, image size, paper params (M), paper GFLOPs, paper V100 img/s or None)
PAPER: Dict[str, Tuple[str, int, float, float, Optional[float]]] = {
    'swin_tiny_patch4_window7_224': ('Swin-T', 224, 28, 4.5, 755),
    'swin_small_patch4_window7_224': ('Swin-S', 224, 50, 8.7, 437),
    'swin_base_patch4_window7_224': ('Swin-B', 224, 88, 15.4, 278),
    'swin_base_patch4_window12_384': ('Swin-B 384', 384, 88, 47.0, 85),
    'swin_large_patch4_window12_384': ('Swin-L 384', 384, 197, 103.9, 42),
    'swinv2_tiny_patch4_window8_256': ('SwinV2-T 256', 256, 28, 5.9, None),
}
FAST = ['swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
        'swinv2_tiny_patch4_window8_256']


@torch.no_grad()
def measure(name: str, batch: int, iters: int, warmup: int, amp: Optional[torch.dtype],
            device: torch.device) -> Tuple[int, float, float]:
    """(params, GFLOPs, img/s) of registered model ``name`` at its paper image size."""
    size = PAPER[name][1]
    model = create_model(name, num_classes=1000).eval()
    params, gflops = count_params(model), count_flops(model, size) / 1e9
    model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with ctx:
        for _ in range(warmup):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return params, gflops, batch * iters / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def table(names: List[str], batch: int, iters: int, warmup: int, amp: Optional[torch.dtype],
          device: torch.device) -> str:
    """The table as text, one row per model."""
    lines = [f"{'model':<13} {'params M':>8} {'paper':>6} {'GFLOPs':>7} {'paper':>6} {'img/s here':>10} "
             f"{'V100 paper':>10}"]
    for name in names:
        label, _, p_params, p_flops, p_rate = PAPER[name]
        params, gflops, rate = measure(name, batch, iters, warmup, amp, device)
        paper_rate = f'{p_rate:10.0f}' if p_rate else f"{'-':>10}"
        lines.append(f"{label:<13} {params / 1e6:8.1f} {p_params:6.0f} {gflops:7.2f} {p_flops:6.1f} {rate:10.1f} "
                     f"{paper_rate}")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', choices=list(PAPER), default=None, help='default: the 224/256 ones')
    p.add_argument('--all', action='store_true', help='every paper model, the 384 ones included')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=2)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype (default fp32)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: PyTorch\'s)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
    names = list(PAPER) if args.all else (args.models or FAST)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f"{where}, batch {args.batch}, {args.amp or 'fp32'}, {args.iters} timed passes after {args.warmup}")
    print(table(names, args.batch, args.iters, args.warmup, amp, device))


if __name__ == '__main__':
    main()
