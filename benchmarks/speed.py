"""Images per second of our Swin-T against timm's (and Hugging Face's, when installed), same process.

Modes: inference in fp32 and under autocast (bf16 on CPU; fp16 and bf16 on a GPU), and a training step
(forward, cross-entropy, backward, AdamW step, each framework with its own AdamW set-up) in the same
precisions. The models run alternately,
``--rounds`` times, each round timing ``--iters`` steps after a warm-up; the report gives the median
images/s of each model, the ratio ours/peer, and memory:

* on a GPU: peak allocated memory of the step (``torch.cuda.max_memory_allocated``);
* on the CPU: the bytes the training step keeps for backward (activations saved by autograd, counted
  once per storage), which is what separates the implementations' peak memory; inference keeps none.

    .venv/bin/python -m benchmarks.speed                       # CPU, 2 threads, batch 8 / 8
    .venv/bin/python -m benchmarks.speed --modes train-bf16 --rounds 7
    .venv/bin/python -m benchmarks.speed --checkpoint          # also ours with activation checkpointing
    .venv/bin/python -m benchmarks.speed --threads 1 --clock cpu   # steadier when other jobs share the CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import create_model  # noqa: E402

__all__ = ['build_models', 'make_step', 'saved_bytes', 'run']

NAME = 'swin_tiny_patch4_window7_224'


def build_models(checkpoint: bool = False, peers: bool = True) -> Dict[str, nn.Module]:
    """Ours, timm's and (if installed) Hugging Face's Swin-T, all with drop path 0.2 (the paper's Swin-T)."""
    found = {'ours': create_model(NAME, drop_path_rate=0.2)}
    if checkpoint:
        found['ours-ckpt'] = create_model(NAME, drop_path_rate=0.2, use_checkpoint=True)
    if not peers:
        return found
    try:
        import timm
        found['timm'] = timm.create_model(NAME, drop_path_rate=0.2)
    except ImportError:
        pass
    try:
        from transformers import SwinConfig, SwinForImageClassification
        hf = SwinForImageClassification(SwinConfig(drop_path_rate=0.2, num_labels=1000))
        found['hf'] = _LogitsOnly(hf)
    except ImportError:
        pass
    return found


class _LogitsOnly(nn.Module):
    """Wraps a Hugging Face model so that it returns the logits tensor like the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(name: str, model: nn.Module, choice: str = 'framework') -> torch.optim.Optimizer:
    """Each framework's own AdamW set-up (lr 1e-4, weight decay 0.05, no decay on norms, biases and tables).

    ours: ``optimizer.build_optimizer`` (``choice`` 'fused' / 'foreach' forces that kernel instead);
    timm: ``timm.optim.create_optimizer_v2`` as its train.py calls it; others: plain ``torch.optim.AdamW``.
    """
    if name.startswith('ours'):
        if choice != 'framework':
            return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **{choice: True})
        from config import get_default_config
        from optimizer import build_optimizer
        cfg = get_default_config()
        cfg.TRAIN.BASE_LR, cfg.TRAIN.WEIGHT_DECAY = 1e-4, 0.05
        return build_optimizer(cfg, model)
    if name == 'timm':
        from timm.optim import create_optimizer_v2
        return create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)


def make_step(model: nn.Module, mode: str, dtype: Optional[torch.dtype], batch: int,
              device: torch.device, optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    """One inference pass or one training step of ``model`` on a fixed random batch (training:
    cross-entropy, backward, ``optimizer`` step; default a plain AdamW)."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, dtype):
                model(x)
        return step
    model.train()
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def saved_bytes(model: nn.Module, dtype: Optional[torch.dtype], batch: int, device: torch.device) -> int:
    """Bytes that autograd keeps between the forward and the backward of one training step."""
    model.train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != 'meta' and not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, dtype):
        out = model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter  # --clock cpu: time.process_time, steadier on a machine shared with other jobs


def _time(step: Callable[[], None], iters: int, device: torch.device) -> float:
    _sync(device)
    start = CLOCK()
    for _ in range(iters):
        step()
    _sync(device)
    return CLOCK() - start


def run(modes: List[str], batch: Dict[str, int], rounds: int, iters: int, warmup: int, device: torch.device,
        checkpoint: bool = False, peers: bool = True, optimizer: str = 'framework') -> List[dict]:
    """Time every model in every mode; returns one row per (mode, model)."""
    dtypes = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    models = {k: m.to(device) for k, m in build_models(checkpoint, peers).items()}
    rows = []
    for mode in modes:
        kind, prec = mode.split('-')
        dtype, b = dtypes[prec], batch[kind]
        steps = {k: make_step(m, kind, dtype, b, device,
                              make_optimizer(k, m, optimizer) if kind == 'train' else None)
                 for k, m in models.items()}
        times: Dict[str, List[float]] = {k: [] for k in models}
        mem: Dict[str, float] = {}
        for k, step in steps.items():
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            _time(step, warmup, device)
            if device.type == 'cuda':
                mem[k] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            elif kind == 'train':
                mem[k] = saved_bytes(models[k], dtype, b, device) / 2 ** 20
        for _ in range(rounds):
            for k, step in steps.items():  # alternate the models inside every round
                times[k].append(b * iters / _time(step, iters, device))
        for k in models:
            rows.append(dict(mode=mode, model=k, batch=b, img_s=statistics.median(times[k]), mem_mb=mem.get(k)))
        del steps
    return rows


def format_rows(rows: List[dict]) -> str:
    """A table with the ratio of ours to every peer in the same mode."""
    out = [f"{'mode':<11} {'model':<10} {'batch':>5} {'img/s':>8} {'ours/this':>9} {'mem MB':>8}"]
    for r in rows:
        ours = next(x['img_s'] for x in rows if x['mode'] == r['mode'] and x['model'] == 'ours')
        mem = f"{r['mem_mb']:8.0f}" if r['mem_mb'] is not None else f"{'-':>8}"
        out.append(f"{r['mode']:<11} {r['model']:<10} {r['batch']:>5} {r['img_s']:8.2f} "
                   f"{ours / r['img_s']:9.2f} {mem}")
    return '\n'.join(out)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--modes', nargs='+', default=None,
                   help='infer-fp32 infer-bf16 train-fp32 train-bf16 (and -fp16 on a GPU)')
    p.add_argument('--batch', type=int, default=None, help='inference batch (CPU 8, GPU 128)')
    p.add_argument('--train-batch', type=int, default=None, help='training batch (CPU 8, GPU 64)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--iters', type=int, default=None, help='steps per round (CPU 2, GPU 20)')
    p.add_argument('--warmup', type=int, default=None)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                   help='cpu: CPU seconds of this process (use with --threads 1 on a busy machine)')
    p.add_argument('--checkpoint', action='store_true', help='also time ours with activation checkpointing')
    p.add_argument('--optimizer', choices=['framework', 'fused', 'foreach'], default='framework',
                   help="ours: the framework's AdamW (optimizer.py) or this kernel")
    p.add_argument('--no-peers', action='store_true', help='only our model(s)')
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == 'cpu' else time.perf_counter
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    if not gpu:
        torch.set_num_threads(args.threads)
    precs = ['fp32', 'bf16'] + (['fp16'] if gpu else [])
    modes = args.modes or [f'{k}-{p}' for k in ('infer', 'train') for p in precs]
    batch = {'infer': args.batch or (128 if gpu else 8), 'train': args.train_batch or (64 if gpu else 8)}
    iters = args.iters or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    torch.manual_seed(0)
    rows = run(modes, batch, args.rounds, iters, warmup, device, args.checkpoint, not args.no_peers, args.optimizer)
    name = torch.cuda.get_device_name(device) if gpu else f'CPU, {torch.get_num_threads()} threads'
    print(f"Swin-T 224, {name}, torch {torch.__version__}, median of {args.rounds} rounds x {iters} steps, "
          f"{args.clock} clock")
    print('memory: ' + ('peak allocated' if gpu else 'training: bytes saved for backward'))
    print(format_rows(rows))


if __name__ == '__main__':
    main()
