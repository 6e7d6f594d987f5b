"""Images per second of our Swin against timm's twin (and Hugging Face's, when installed), in two comparisons.

* **model code alone**: every model in one process, the same optimizer (torch's fused AdamW on every parameter),
  the C library's allocator defaults, the same batch. What separates the rows is the model code: for ours, the
  model ``build_model`` builds for the device (on a CPU, with the CPU modules of ``models/cpu`` swapped in).
* **framework defaults**: every framework in a process of its own, set up as its training script sets itself up:
  ours with ``optimizer.build_optimizer``, freed host memory kept for reuse on a CPU (``HOST_MEMORY_CACHE``) and
  TF32 + ``cudnn.benchmark`` on a GPU (``utils.cuda``); timm with ``create_optimizer_v2`` and, on a GPU, TF32 +
  ``cudnn.benchmark`` as its train.py; Hugging Face with a plain AdamW. The parent alternates them round by round.

Modes: inference in fp32 and under autocast (bf16 on a CPU; fp16 and bf16 on a GPU), and a training step
(forward, cross-entropy, backward, optimizer step) in the same precisions. Each round times ``--iters`` steps
after a warm-up; a row gives the median images/s of a model, the ratio ours/this, and memory: on a GPU the peak
allocated memory of the step, on a CPU the bytes a training step keeps for backward (activations saved by
autograd, counted once per storage).

    .venv/bin/python -m benchmarks.speed                            # CPU, 2 threads, batch 8: both comparisons
    .venv/bin/python -m benchmarks.speed --comparison model --modes train-fp32 --rounds 7
    .venv/bin/python -m benchmarks.speed --reference --checkpoint   # also ours without the CPU swap, and with
                                                                    # activation checkpointing
    .venv/bin/python -m benchmarks.speed --arch swinv2-t            # SwinV2-T 256 against timm's
    .venv/bin/python -m benchmarks.speed --threads 1 --clock cpu    # steadier when other jobs share the CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import cpu, create_model  # noqa: E402

__all__ = ['ARCHS', 'build_model', 'model_names', 'make_optimizer', 'make_step', 'saved_bytes', 'run', 'Runner',
           'Setup', 'Schedule', 'format_rows']

# architecture -> (our registered name, timm's name, image size); drop path 0.2 for both, the paper's
ARCHS = {'swin-t': ('swin_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224', 224),
         'swinv2-t': ('swinv2_tiny_patch4_window8_256', 'swinv2_tiny_window8_256', 256)}
COMPARISONS = {'model': 'model code alone: one process, the same fused AdamW, allocator defaults',
               'framework': 'framework defaults: a process each, its own optimizer set-up and allocator'}


def build_model(name: str, arch: str = 'swin-t', device: torch.device = torch.device('cpu'),
                **overrides) -> nn.Module:
    """'ours' (as ``build_model`` builds it for ``device``), 'ours-ref' (the reference model, no CPU swap),
    'ours-ckpt' (ours with activation checkpointing), 'timm' or 'hf' (Hugging Face transformers, Swin-T only).
    ``overrides`` (e.g. embed_dim, depths, img_size) go to our constructor and timm's alike."""
    ours_name, timm_name, _ = ARCHS[arch]
    if name.startswith('ours'):
        model = create_model(ours_name, **{'drop_path_rate': 0.2, 'use_checkpoint': name == 'ours-ckpt', **overrides})
        return cpu.accelerate(model) if device.type == 'cpu' and name != 'ours-ref' else model
    if name == 'timm':
        import timm
        return timm.create_model(timm_name, **{'drop_path_rate': 0.2, **overrides})
    if overrides:
        raise ValueError(f"{name}: no size overrides")
    if name == 'hf' and arch == 'swin-t':
        from transformers import SwinConfig, SwinForImageClassification
        return _LogitsOnly(SwinForImageClassification(SwinConfig(drop_path_rate=0.2, num_labels=1000)))
    raise ValueError(f"no model {name!r} for {arch}")


class _LogitsOnly(nn.Module):
    """Wraps a Hugging Face model so that it returns the logits tensor like the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(name: str, model: nn.Module, comparison: str) -> torch.optim.Optimizer:
    """AdamW, lr 1e-4, weight decay 0.05. 'model': torch's fused AdamW on every parameter, for every framework.
    'framework': each framework's own set-up (ours: ``optimizer.build_optimizer``; timm: ``create_optimizer_v2``
    as its train.py calls it; others: a plain ``torch.optim.AdamW``)."""
    if comparison == 'model':
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    if name.startswith('ours'):
        from config import get_default_config
        from optimizer import build_optimizer
        cfg = get_default_config()
        cfg.TRAIN.BASE_LR, cfg.TRAIN.WEIGHT_DECAY = 1e-4, 0.05
        return build_optimizer(cfg, model)
    if name == 'timm':
        from timm.optim import create_optimizer_v2
        return create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)


def _framework_setup(name: str, device: torch.device) -> None:
    """What the framework's training script sets up in its process before it builds the model."""
    if name.startswith('ours'):
        if device.type == 'cpu':
            from utils.host_memory import keep_freed_memory
            keep_freed_memory()
        else:
            from utils.cuda import configure_cuda
            configure_cuda(allow_tf32=True)
    elif name == 'timm' and device.type == 'cuda':  # as timm's train.py does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def make_step(model: nn.Module, mode: str, dtype: Optional[torch.dtype], batch: int, img_size: int,
              device: torch.device, optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    """One inference pass or one training step of ``model`` on a fixed random batch (training:
    cross-entropy, backward, ``optimizer`` step; default a plain AdamW)."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, dtype):
                model(x)
        return step
    model.train()
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def saved_bytes(model: nn.Module, dtype: Optional[torch.dtype], batch: int, img_size: int,
                device: torch.device) -> int:
    """Bytes that autograd keeps between the forward and the backward of one training step."""
    model.train()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
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


@dataclass(frozen=True)
class Setup:
    """What every model of one comparison shares: the architecture, where and how it runs, and its size."""
    arch: str = 'swin-t'
    device: torch.device = torch.device('cpu')
    threads: int = 2                # CPU threads (a GPU run leaves torch's number alone)
    clock: str = 'wall'             # 'wall' or 'cpu' (CPU seconds of the process)
    comparison: str = 'model'       # 'model' or 'framework', see COMPARISONS
    overrides: dict = field(default_factory=dict)  # constructor arguments for every model alike (e.g. img_size)


@dataclass(frozen=True)
class Schedule:
    """What is timed: the modes (e.g. 'train-fp32'), the batch per kind ('infer', 'train'), and how often."""
    modes: List[str]
    batch: Dict[str, int]
    rounds: int
    iters: int                      # steps per round
    warmup: int                     # untimed steps before each mode


class Runner:
    """Times one model: ``prepare(mode)`` builds its step, warms up and measures memory; ``time(iters)`` times it."""

    def __init__(self, name: str, setup: Setup):
        self.clock = time.process_time if setup.clock == 'cpu' else time.perf_counter
        device = setup.device
        if device.type != 'cuda':
            torch.set_num_threads(setup.threads)
        if setup.comparison == 'framework':
            _framework_setup(name, device)
        torch.manual_seed(0)
        self.name, self.device, self.comparison = name, device, setup.comparison
        self.img_size = setup.overrides.get('img_size', ARCHS[setup.arch][2])
        self.model = build_model(name, setup.arch, device, **setup.overrides).to(device)
        self.step: Optional[Callable[[], None]] = None

    def prepare(self, kind: str, dtype: Optional[torch.dtype], batch: int, warmup: int) -> Optional[float]:
        self.step = None  # the previous mode's buffers go first
        opt = make_optimizer(self.name, self.model, self.comparison) if kind == 'train' else None
        self.step = make_step(self.model, kind, dtype, batch, self.img_size, self.device, opt)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        self.time(warmup)
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return saved_bytes(self.model, dtype, batch, self.img_size, self.device) / 2 ** 20 if kind == 'train' else None

    def time(self, iters: int) -> float:
        _sync(self.device)
        start = self.clock()
        for _ in range(iters):
            self.step()
        _sync(self.device)
        return self.clock() - start


def _serve(conn, args: tuple) -> None:
    """A worker process: one Runner, driven by (method, arguments) messages until None arrives."""
    runner = Runner(*args)
    conn.send('ready')
    for msg in iter(conn.recv, None):
        method, call_args = msg
        conn.send(getattr(runner, method)(*call_args))


# How a framework's own process starts: spawned, a fresh interpreter set up as that framework's script sets itself
# up. The tests fork it from a forkserver to reuse their imports; what they check does not depend on it.
START_METHOD = 'spawn'


class _RemoteRunner:
    """A Runner in its own process, with the same two methods."""

    def __init__(self, *args):
        ctx = multiprocessing.get_context(START_METHOD)
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


def model_names(arch: str, reference: bool = False, checkpoint: bool = False, peers: bool = True) -> List[str]:
    """The models to time: ours (the reference, with activation checkpointing, if asked), then installed peers."""
    names = ['ours'] + (['ours-ref'] if reference else []) + (['ours-ckpt'] if checkpoint else [])
    if peers:
        names += [n for n, module in (('timm', 'timm'), ('hf', 'transformers'))
                  if importlib.util.find_spec(module) is not None and (n != 'hf' or arch == 'swin-t')]
    return names


DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def run(setup: Setup, schedule: Schedule, names: Optional[List[str]] = None) -> List[dict]:
    """Time every model in every mode for one comparison (``setup.comparison``); one row per (mode, model).
    ``names`` picks the models (default: :func:`model_names`); ``setup.overrides`` resizes every model alike."""
    make = Runner if setup.comparison == 'model' else _RemoteRunner
    runners = {k: make(k, setup) for k in names or model_names(setup.arch)}
    rows = []
    try:
        for mode in schedule.modes:
            kind, prec = mode.split('-')
            dtype, b = DTYPES[prec], schedule.batch[kind]
            mem = {k: r.prepare(kind, dtype, b, schedule.warmup) for k, r in runners.items()}
            times: Dict[str, List[float]] = {k: [] for k in runners}
            for _ in range(schedule.rounds):
                for k, r in runners.items():  # alternate the models inside every round
                    times[k].append(b * schedule.iters / r.time(schedule.iters))
            rows += [dict(comparison=setup.comparison, mode=mode, model=k, batch=b,
                          img_s=statistics.median(times[k]), mem_mb=mem[k]) for k in runners]
    finally:
        for r in runners.values():
            if isinstance(r, _RemoteRunner):
                r.close()
    return rows


def format_rows(rows: List[dict]) -> str:
    """One table per comparison, each row with the ratio of ours to that model in the same mode."""
    out = []
    for comparison in dict.fromkeys(r['comparison'] for r in rows):
        out += [f"== {COMPARISONS[comparison]}",
                f"{'mode':<11} {'model':<10} {'batch':>5} {'img/s':>8} {'ours/this':>9} {'mem MB':>8}"]
        group = [r for r in rows if r['comparison'] == comparison]
        for r in group:
            ours = next(x['img_s'] for x in group if x['mode'] == r['mode'] and x['model'] == 'ours')
            mem = f"{r['mem_mb']:8.0f}" if r['mem_mb'] is not None else f"{'-':>8}"
            out.append(f"{r['mode']:<11} {r['model']:<10} {r['batch']:>5} {r['img_s']:8.2f} "
                       f"{ours / r['img_s']:9.2f} {mem}")
    return '\n'.join(out)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--arch', choices=list(ARCHS), default='swin-t')
    p.add_argument('--comparison', choices=['model', 'framework', 'both'], default='both')
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
    p.add_argument('--reference', action='store_true', help='also time our reference model (no CPU swap)')
    p.add_argument('--checkpoint', action='store_true', help='also time ours with activation checkpointing')
    p.add_argument('--no-peers', action='store_true', help='only our model(s)')
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
    name = torch.cuda.get_device_name(device) if gpu else f'CPU, {args.threads} threads'
    print(f"{args.arch}, {name}, torch {torch.__version__}, median of {args.rounds} rounds x {iters} steps, "
          f"{args.clock} clock; memory: " + ('peak allocated' if gpu else 'training: bytes saved for backward'),
          flush=True)
    schedule = Schedule(modes, batch, args.rounds, iters, warmup)
    names = model_names(args.arch, args.reference, args.checkpoint, not args.no_peers)
    rows = []
    for comparison in (['model', 'framework'] if args.comparison == 'both' else [args.comparison]):
        setup = Setup(args.arch, device, args.threads, args.clock, comparison)
        rows += run(setup, schedule, names)
        print(format_rows([r for r in rows if r['comparison'] == comparison]), flush=True)


if __name__ == '__main__':
    main()
