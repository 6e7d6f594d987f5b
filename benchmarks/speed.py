"""Images per second of our Swin-T against timm's (and Hugging Face's, when installed), same process.

Modes: inference in fp32 and under autocast (bf16 on CPU; fp16 and bf16 on a GPU), and a training step
(forward, cross-entropy, backward, AdamW step, each framework with its own AdamW set-up) in the same
precisions. The models run alternately,
``--rounds`` times, each round timing ``--iters`` steps after a warm-up; the report gives the median
images/s of each model, the ratio ours/peer, and memory:

* on a GPU: peak allocated memory of the step (``torch.cuda.max_memory_allocated``);
* on the CPU: the bytes the training step keeps for backward (activations saved by autograd, counted
  once per storage), which is what separates the implementations' peak memory; inference keeps none.

Each framework runs in a process of its own, set up as its training script sets itself up: ours keeps freed
host memory for reuse (``HOST_MEMORY_CACHE``, utils/host_memory.py), the peers run with the C library's
defaults. The parent process alternates them round by round. ``--same-process`` times all models in one
process with the defaults instead: that isolates what the model code alone is worth.

    .venv/bin/python -m benchmarks.speed                       # CPU, 2 threads, batch 8 / 8
    .venv/bin/python -m benchmarks.speed --modes train-bf16 --rounds 7
    .venv/bin/python -m benchmarks.speed --checkpoint          # also ours with activation checkpointing
    .venv/bin/python -m benchmarks.speed --threads 1 --clock cpu   # steadier when other jobs share the CPU
    .venv/bin/python -m benchmarks.speed --same-process        # model code only, same allocator for all
"""
from __future__ import annotations

import argparse
import multiprocessing
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

__all__ = ['build_model', 'model_names', 'make_step', 'saved_bytes', 'run', 'Runner']

NAME = 'swin_tiny_patch4_window7_224'


def build_model(name: str) -> nn.Module:
    """'ours', 'ours-ckpt' (with activation checkpointing), 'timm' or 'hf' (Hugging Face transformers):
    Swin-T with drop path 0.2, the paper's."""
    if name in ('ours', 'ours-ckpt'):
        return create_model(NAME, drop_path_rate=0.2, use_checkpoint=name == 'ours-ckpt')
    if name == 'timm':
        import timm
        return timm.create_model(NAME, drop_path_rate=0.2)
    if name == 'hf':
        from transformers import SwinConfig, SwinForImageClassification
        return _LogitsOnly(SwinForImageClassification(SwinConfig(drop_path_rate=0.2, num_labels=1000)))
    raise ValueError(f"unknown model {name!r}")


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


class Runner:
    """Times one model: ``prepare(mode)`` builds its step, warms up and measures memory; ``time(iters)`` times it."""

    def __init__(self, name: str, device: torch.device, threads: int, clock: str, optimizer: str,
                 framework_setup: bool):
        global CLOCK
        CLOCK = time.process_time if clock == 'cpu' else time.perf_counter
        if device.type != 'cuda':
            torch.set_num_threads(threads)
        if framework_setup and name.startswith('ours'):
            from utils.host_memory import keep_freed_memory
            keep_freed_memory()
        torch.manual_seed(0)
        self.name, self.device, self.optimizer = name, device, optimizer
        self.model = build_model(name).to(device)
        self.step: Optional[Callable[[], None]] = None

    def prepare(self, kind: str, dtype: Optional[torch.dtype], batch: int, warmup: int) -> Optional[float]:
        self.step = None  # the previous mode's buffers go first
        opt = make_optimizer(self.name, self.model, self.optimizer) if kind == 'train' else None
        self.step = make_step(self.model, kind, dtype, batch, self.device, opt)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        _time(self.step, warmup, self.device)
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return saved_bytes(self.model, dtype, batch, self.device) / 2 ** 20 if kind == 'train' else None

    def time(self, iters: int) -> float:
        return _time(self.step, iters, self.device)


def _serve(conn, args: tuple) -> None:
    """A worker process: one Runner, driven by (method, arguments) messages until None arrives."""
    runner = Runner(*args)
    conn.send('ready')
    for msg in iter(conn.recv, None):
        method, call_args = msg
        conn.send(getattr(runner, method)(*call_args))


class _RemoteRunner:
    """A Runner in its own process, with the same two methods."""

    def __init__(self, *args):
        ctx = multiprocessing.get_context('spawn')
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, args), daemon=True)
        self.process.start()
        if self.conn.recv() != 'ready':
            raise RuntimeError('benchmark worker failed to start')

    def _call(self, method: str, *args):
        self.conn.send((method, args))
        return self.conn.recv()

    def prepare(self, *args):
        return self._call('prepare', *args)

    def time(self, iters: int) -> float:
        return self._call('time', iters)

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def model_names(checkpoint: bool, peers: bool) -> List[str]:
    """The models to time: ours (and with activation checkpointing), then the installed peers."""
    names = ['ours'] + (['ours-ckpt'] if checkpoint else [])
    if peers:
        names += [n for n, module in (('timm', 'timm'), ('hf', 'transformers')) if _installed(module)]
    return names


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run(modes: List[str], batch: Dict[str, int], rounds: int, iters: int, warmup: int, device: torch.device,
        checkpoint: bool = False, peers: bool = True, optimizer: str = 'framework', same_process: bool = False,
        threads: int = 2, clock: str = 'wall') -> List[dict]:
    """Time every model in every mode; returns one row per (mode, model)."""
    dtypes = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    names = model_names(checkpoint, peers)
    make = Runner if same_process else _RemoteRunner
    runners = {k: make(k, device, threads, clock, optimizer, not same_process) for k in names}
    rows = []
    try:
        for mode in modes:
            kind, prec = mode.split('-')
            dtype, b = dtypes[prec], batch[kind]
            mem = {k: r.prepare(kind, dtype, b, warmup) for k, r in runners.items()}
            times: Dict[str, List[float]] = {k: [] for k in runners}
            for _ in range(rounds):
                for k, r in runners.items():  # alternate the models inside every round
                    times[k].append(b * iters / r.time(iters))
            rows += [dict(mode=mode, model=k, batch=b, img_s=statistics.median(times[k]), mem_mb=mem[k])
                     for k in runners]
    finally:
        for r in runners.values():
            if isinstance(r, _RemoteRunner):
                r.close()
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
    p.add_argument('--same-process', action='store_true',
                   help="all models in this process with the C library's allocator defaults (model code only)")
    args = p.parse_args(argv)
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
    rows = run(modes, batch, args.rounds, iters, warmup, device, args.checkpoint, not args.no_peers, args.optimizer,
               args.same_process, args.threads, args.clock)
    name = torch.cuda.get_device_name(device) if gpu else f'CPU, {torch.get_num_threads()} threads'
    print(f"Swin-T 224, {name}, torch {torch.__version__}, median of {args.rounds} rounds x {iters} steps, "
          f"{args.clock} clock, " + ('one process, default allocator' if args.same_process else
                                     "each framework in its own process with its own set-up"))
    print('memory: ' + ('peak allocated' if gpu else 'training: bytes saved for backward'))
    print(format_rows(rows))


if __name__ == '__main__':
    main()
