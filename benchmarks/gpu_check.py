"""The GPU paths in one command, for a bare machine with a GPU: under 8 minutes on one H100, compile included.

It runs on the torch it finds (with torchvision and timm) and never calls pip. The pure-Python packages the
repository imports at run time that such a machine may lack (yacs, termcolor) come as wheels in ``.whl/``:
``make gpu-wheels`` downloads them here, the folder travels with the working tree, and this script puts the
wheels it needs on its own path and its children's (a pure-Python wheel is a zip archive Python imports from).

    make gpu-wheels                                       # here, once: .whl/yacs-*.whl, .whl/termcolor-*.whl
    python3 -m benchmarks.gpu_check --out DIR             # there: report.json, gpu_check.log and the table
    python3 -m benchmarks.gpu_check --device cpu --out DIR   # the same checks, tiny, on a CPU (what CI runs)

What it measures, in this order (each check's time on an H100 from a cold start, as budgeted in GPU_PLAN's
comment; a check whose estimate no longer fits in the 440 s budget is reported as skipped, so the run ends within
8 minutes):

1. attention (~10 s): the SDPA kernel that runs in a training step and in evaluation of our Swin-T (profiler:
   the aten op and the CUDA kernel names), and evaluation logits under the default kernel against the math kernel;
2. parity with timm (~10 s): logits and every gradient of Swin-T and SwinV2-T against timm's twin holding the
   same weights, fp32 with TF32 off;
3. ``main.py`` under torchrun (~40 + ~45 + 2 x ~35 s): a process group (NCCL; gloo on a CPU) even on one GPU, DDP
   (200 steps), and FSDP for V1 and V2 (100 steps each), on generated images with the official augmentation
   (RandAugment, random erasing, mixup/cutmix): the loss going down, the steps the fp16 grad scaler skipped, the
   host synchronisations between log steps (``torch.cuda.set_sync_debug_mode``, none expected), and a resume that
   continues bit-identically (a pair of runs with deterministic algorithms);
4. training speed against timm (~70 s): Swin-T and SwinV2-T in fp16 (grad scaler) and bf16, each framework alone
   on the GPU with its memory reset, at batch 128 (the official recipe) and the largest of 256/128/64 that fits
   both: images/s, peak memory, and the model FLOP utilisation (training FLOPs/s over the card's dense peak);
5. the paper's throughput line (~75 s): ``main.py --throughput`` for Swin-T, -S and -B at batch 64, fp32 with TF32
   off and fp16, next to the paper's V100 figures;
6. ``main.py --compile`` under torchrun (~110 s): compile time and the compiled steps' images/s.

The ``main.py`` runs, their checkpoints and the images live in a temporary folder, deleted at the end; ``DIR``
gets ``report.json`` and ``gpu_check.log`` only. The exit status is 1 when a check failed. ``--device cpu`` runs
every check small (tiny models, few steps; gloo instead of NCCL); what needs CUDA says 'skipped: needs CUDA'.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NEEDS_CUDA = 'needs CUDA'

# ------------------------------------------------------------------------------------------------ carried wheels


def _wheel_modules(wheel: Path) -> List[str]:
    """The top-level modules a wheel holds (the first component of its paths, without the metadata folders)."""
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split('/', 1)[0] for name in z.namelist()}
    return sorted(t[:-3] if t.endswith('.py') else t for t in tops
                  if not t.endswith(('.dist-info', '.data')) and t)


def _spec(module: str):
    """The module's import spec, or None where it cannot be imported (a finder may also raise ImportError)."""
    try:
        return importlib.util.find_spec(module)
    except ImportError:
        return None


def use_carried_wheels(folder: Path) -> Dict[str, str]:
    """Put every pure-Python wheel of ``folder`` whose modules this Python cannot import on ``sys.path`` and on
    ``PYTHONPATH`` (for the ``main.py`` processes). Returns {module: where it is imported from}, for the report."""
    where: Dict[str, str] = {}
    folder = folder.resolve()  # the main.py processes start in another folder
    for wheel in sorted(folder.glob('*-none-any.whl')) if folder.is_dir() else []:
        modules = _wheel_modules(wheel)
        if all(_spec(m) is not None for m in modules):
            continue
        sys.path.insert(0, str(wheel))
        paths = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
        os.environ['PYTHONPATH'] = os.pathsep.join([str(wheel), *paths])
    for module in ('yacs', 'termcolor'):
        spec = _spec(module)
        where[module] = spec.origin if spec is not None else 'missing'
    return where

# ------------------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """How big each check runs: the paper's models on a GPU, tiny ones on a CPU (the same code paths)."""
    budget_s: float                      # the whole run; a check whose estimate no longer fits is skipped
    overrides: Dict[str, dict]           # arch -> model-size overrides of the in-process checks ({}: the paper's)
    attention_batch: int
    parity_batch: int
    speed_batch: int                     # the official recipe's
    speed_candidates: Tuple[int, ...]    # the largest that fits both frameworks is timed too
    warmup: int
    rounds: int
    iters: int
    image_size: int                      # of the generated JPEGs
    train_per_class: int                 # 10 classes
    val_per_class: int
    main_batch: int
    main_lr: float                       # after main.py's linear scaling (BASE_LR x total batch / 512)
    main_epochs: int                     # the DDP run
    resume_epochs: int                   # the resume pair: the second starts after epoch resume_epochs // 2 - 1
    fsdp_epochs: int
    compile_epochs: int
    workers: int
    print_freq: int
    main_opts: Dict[str, List[str]]      # family -> main.py --opts that size the model
    throughput_models: Tuple[str, ...]
    throughput_batch: int
    compile_backend: Optional[str]       # None: torch.compile's default (inductor)
    compile_note: str = ''


_TINY = dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
_TINY_V2 = dict(_TINY, pretrained_window_sizes=(0, 0))


def _tiny_opts(key: str) -> List[str]:
    return ['DATA.IMG_SIZE', '32', f'MODEL.{key}.EMBED_DIM', '16', f'MODEL.{key}.DEPTHS', '[2, 2]',
            f'MODEL.{key}.NUM_HEADS', '[1, 2]', f'MODEL.{key}.WINDOW_SIZE', '4']


# One H100 from a cold start, as budgeted (s): imports and CUDA context ~15 (before the budget's clock starts);
# attention 10, parity 10; the images ~5 (1920 JPEGs, 8 threads); main.py DDP 40 (200 steps), the resume pair 45
# (100 + 50 steps), FSDP V1 and V2 35 each (100 steps); speed 70 (16 timings of ~4 s with the model builds);
# throughput 75 (6 starts of main.py at ~12 s); --compile 110 (inductor, cold cache, training and evaluation
# graphs). ~435 s of a 440 s budget, plus the start: the run ends inside 8 minutes. On a slower machine the last
# checks are skipped rather than the limit passed, and a main.py run still going 10 s after the budget's end is
# stopped (SIGTERM: it checkpoints and exits).
GPU_PLAN = Plan(budget_s=440, overrides={'swin-t': {}, 'swinv2-t': {}}, attention_batch=32, parity_batch=4,
                speed_batch=128, speed_candidates=(256, 128, 64), warmup=4, rounds=2, iters=10,
                image_size=256, train_per_class=160, val_per_class=32, main_batch=32, main_lr=3e-4,
                main_epochs=4, resume_epochs=2, fsdp_epochs=2, compile_epochs=2, workers=8, print_freq=10,
                main_opts={'swin': [], 'swinv2': []},
                throughput_models=('swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224',
                                   'swin_base_patch4_window7_224'), throughput_batch=64, compile_backend=None)
# The script itself on a CPU: every check, tiny, one thread: ~50 s of CPU time on 2 cores, most of it the 7 starts
# of main.py (~6 s each; a minute or two of wall time on a busy machine). torch.compile through main.py takes the
# 'eager' backend there: Dynamo captures the graphs (graph breaks, recompilation, DDP's graph splitting) and runs
# them without code generation; aot_eager adds ~20 s, inductor's C++ code generation minutes.
CPU_PLAN = Plan(budget_s=900, overrides={'swin-t': _TINY, 'swinv2-t': _TINY_V2}, attention_batch=2, parity_batch=2,
                speed_batch=2, speed_candidates=(4, 2), warmup=1, rounds=1, iters=2,
                image_size=32, train_per_class=16, val_per_class=4, main_batch=8, main_lr=1e-3,
                main_epochs=2, resume_epochs=2, fsdp_epochs=2, compile_epochs=1, workers=1, print_freq=5,
                main_opts={'swin': _tiny_opts('SWIN'), 'swinv2': _tiny_opts('SWINV2')},
                throughput_models=('swin_tiny_patch4_window7_224',), throughput_batch=16, compile_backend='eager',
                compile_note='backend eager on the CPU')

# -------------------------------------------------------------------------------------------------- the report


@dataclass
class Row:
    """One line of the table: a check's outcome, its key figure(s), the peer's and their ratio (and what it is)."""
    name: str
    status: str                     # 'ok', 'FAIL' or 'skipped'
    figure: str = ''
    peer: str = ''
    ratio: str = ''
    reason: str = ''                # why it failed or was skipped
    data: dict = field(default_factory=dict)   # the numbers behind the line, for report.json

    @property
    def ok(self) -> Optional[bool]:
        return None if self.status == 'skipped' else self.status == 'ok'


def checked(name: str, ok: bool, figure: str, reason: str = '', **kw) -> Row:
    return Row(name, 'ok' if ok else 'FAIL', figure, reason='' if ok else reason, **kw)


def skipped(name: str, reason: str) -> Row:
    return Row(name, 'skipped', reason=reason)


class Report:
    """The rows of the checks in order. A check is skipped when its time estimate no longer fits the budget, and
    a check that raises is one FAIL row with the error's first line (the traceback goes to the log)."""

    def __init__(self, budget_s: float):
        self.rows: List[Row] = []
        self.start = time.time()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def run(self, name: str, estimate_s: float, fn: Callable[[], List[Row]]) -> List[Row]:
        if estimate_s > self.left():
            rows = [skipped(name, f'time budget: {self.left():.0f} s left, needs ~{estimate_s:.0f} s')]
        else:
            print(f"-- {name} (~{estimate_s:.0f} s budgeted)", flush=True)
            started = time.time()
            try:
                rows = fn()
            except Exception as e:  # reported; the other checks still run
                print(traceback.format_exc(), flush=True)
                rows = [Row(name, 'FAIL', reason=f'{type(e).__name__}: {e}'.splitlines()[0][:200])]
            print(f"   {name}: {time.time() - started:.1f} s", flush=True)
        for r in rows:
            print(f"   [{r.status}] {r.name}: {' -- '.join(x for x in (r.figure, r.reason) if x)}", flush=True)
        self.rows += rows
        return rows

    def table(self) -> str:
        """One line per check: status, our figure, the peer's, the ratio (each ratio says what it compares)."""
        head = ('check', 'status', 'figure', 'peer', 'ratio')
        lines = [(r.name, r.status, ' -- '.join(x for x in (r.figure, r.reason) if x), r.peer, r.ratio)
                 for r in self.rows]
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        fmt = '  '.join(f'{{:<{w}}}' for w in widths)
        return '\n'.join(fmt.format(*x).rstrip() for x in [head, tuple('-' * w for w in widths), *lines])

    def counts(self) -> Dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in ('ok', 'FAIL', 'skipped')}


class _Tee:
    """This process's output to the console and to the log file in DIR."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, 'w')

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def close(self) -> None:
        self.file.close()

# ---------------------------------------------------------------------------------- 1. attention kernels (SDPA)


# aten op -> the SDPA backend it is, the first prefix that matches (backward ops start with the forward's name)
_SDPA_OPS = (('aten::_scaled_dot_product_efficient_attention', 'memory-efficient'),
             ('aten::_scaled_dot_product_flash_attention_for_cpu', 'flash (CPU)'),
             ('aten::_scaled_dot_product_flash_attention', 'flash'),
             ('aten::_scaled_dot_product_cudnn_attention', 'cuDNN'),
             ('aten::_scaled_dot_product_fused_attention_overrideable', 'overrideable'),
             ('aten::_scaled_dot_product_attention_math', 'math'))
_ATTENTION_KERNEL = re.compile(r'fmha|flash|attention|attn|sdpa|softmax', re.IGNORECASE)


def _sdpa_backend(op: str) -> Optional[str]:
    return next((name for prefix, name in _SDPA_OPS if op.startswith(prefix)), None)


def amp_dtype_of(device: torch.device) -> torch.dtype:
    """The precision main.py's AMP_DTYPE auto picks on a GPU of this kind (bf16 on sm80+, else fp16); bf16 on a
    CPU (the CPU plan's main.py runs ask for it)."""
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16


def profile_attention(fn: Callable[[], None], device: torch.device) -> Tuple[List[str], List[str]]:
    """(how attention ran in ``fn``: the SDPA backends, else the softmax ops of an unfused path such as the CPU
    modules'; the three attention-like CUDA kernels that took the most time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    backends = sorted({b for b in map(_sdpa_backend, (e.key for e in events)) if b})
    if not backends:  # the forward's softmax ops name the unfused path
        softmax = sorted({e.key for e in events if 'softmax' in e.key.lower() and 'backward' not in e.key.lower()
                          and e.device_type == DeviceType.CPU})
        backends = [f"no SDPA: {'+'.join(softmax)}"] if softmax else []
    gpu = [e for e in events if e.device_type == DeviceType.CUDA and _ATTENTION_KERNEL.search(e.key)]
    gpu.sort(key=lambda e: -getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)))
    return backends, [e.key[:60] for e in gpu[:3]]


def _our_model(arch: str, device: torch.device, overrides: dict) -> torch.nn.Module:
    """Our model as main.py builds it for ``device`` (the CPU modules swapped in on a CPU), with random weights
    everywhere (bias tables included, so the attention bias matters), dropout and stochastic depth off."""
    from benchmarks import speed
    from models import cpu
    from tools.model_parity import randomize_
    model = randomize_(speed.build_model('ours-ref', arch, device, **overrides, drop_path_rate=0.0))
    return (cpu.accelerate(model) if device.type == 'cpu' else model).to(device)


def attention_runs(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """How attention ran in a training step and in evaluation under autocast ``dtype`` (see
    :func:`profile_attention`), and the evaluation logits' difference between the default SDPA kernel and the
    math kernel, in fp32 and in ``dtype``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = x.device

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()

    model.train()
    train_step()  # the first step outside the profile: lazy initialisation
    found = dict(zip(('train_ops', 'train_kernels'), profile_attention(train_step, device)))
    model.eval()
    with torch.no_grad():
        evaluate = functools.partial(_logits, model, x, device)
        found.update(zip(('eval_ops', 'eval_kernels'), profile_attention(lambda: evaluate(dtype), device)))
        with sdpa_kernel(SDPBackend.MATH):
            math = {d: evaluate(d) for d in (None, dtype)}
        found['errors'] = {d: _relative(evaluate(d), math[d]) for d in (None, dtype)}
    return found


def attention_check(device: torch.device, plan: Plan) -> List[Row]:
    """Which SDPA kernel runs in training and in evaluation of our Swin-T in main.py's AMP dtype, and evaluation
    logits of the default kernel against the math kernel. On CUDA only a fused kernel passes: they are meant to
    take the 4-D bias mask. On a CPU whatever runs is reported (the CPU modules have their own path)."""
    overrides, cuda, dtype = plan.overrides['swin-t'], device.type == 'cuda', amp_dtype_of(device)
    size = overrides.get('img_size', 224)
    found = attention_runs(_our_model('swin-t', device, overrides),
                           torch.randn(plan.attention_batch, 3, size, size, device=device), dtype)
    name, errors = str(dtype).replace('torch.', ''), found['errors']
    tolerance = {None: 1e-4, dtype: 2e-2}

    def fused(ops: List[str]) -> bool:
        return bool(ops) and (not cuda or not any(op == 'math' or op.startswith('no SDPA') for op in ops))

    def kernels(names: List[str]) -> str:
        return (', '.join(names) or 'none seen') if cuda else NEEDS_CUDA

    rows = []
    for phase, key in (('training', 'train'), ('evaluation', 'eval')):
        ops, names = found[f'{key}_ops'], found[f'{key}_kernels']
        rows.append(checked(f'SDPA kernel, {phase} ({name})', fused(ops),
                            f"{'/'.join(ops) or 'no SDPA op seen'}; kernels: {kernels(names)}", 'no fused kernel',
                            data={'ops': ops, 'kernels': names}))
    rows.append(checked('eval logits, default vs math SDPA', all(errors[d] <= tolerance[d] for d in errors),
                        f"max|diff|/max|logit| fp32 {errors[None]:.1e}, {name} {errors[dtype]:.1e}",
                        f"over tolerance (fp32 {tolerance[None]:g}, {name} {tolerance[dtype]:g})",
                        ratio='(difference, not a ratio)', data={'fp32': errors[None], name: errors[dtype]}))
    return rows


def _logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
            dtype: Optional[torch.dtype]) -> torch.Tensor:
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        return model(x).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: a difference on the scale of the logits."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

# ------------------------------------------------------------------------------------------- 2. parity with timm


_PARITY = (('swin-t', 'swin', 'swin_tiny_patch4_window7_224'), ('swinv2-t', 'swinv2', 'swinv2_tiny_patch4_window8_256'))


def _device_grad_errors(family: str, ours: torch.nn.Module, twin: torch.nn.Module,
                        x: torch.Tensor) -> Dict[str, float]:
    """Relative error |g_ours - g_timm| / |g_timm| per timm parameter after one training-mode step on ``x``, our
    gradients mapped onto timm's names by timm's own checkpoint converter (tools.model_parity, on any device)."""
    from tools.model_parity import _timm_module

    def grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        model.train().zero_grad(set_to_none=True)
        logits = model(x)
        weights = torch.linspace(-1, 1, logits.numel(), device=x.device).view_as(logits)
        (logits * weights).sum().backward()  # each logit weighed differently
        out = {name: p.grad.detach().cpu() for name, p in model.named_parameters()}
        model.eval().zero_grad(set_to_none=True)
        return out

    theirs = grads(twin)
    mine = _timm_module(family).checkpoint_filter_fn({'model': grads(ours)}, twin)
    if mine.keys() != theirs.keys():
        raise KeyError(f"gradients differ in names: {sorted(mine.keys() ^ theirs.keys())[:5]}")
    return {n: ((mine[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in theirs.items()}


def parity_check(device: torch.device, plan: Plan) -> List[Row]:
    """Logits and every gradient of ours against timm's twin holding the same (random) weights, fp32, TF32 off."""
    from tools.model_parity import PAPER_MODELS, make_pair
    rows = []
    for arch, family, paper_name in _PARITY:
        kwargs = plan.overrides[arch] or PAPER_MODELS[paper_name][1]
        ours, twin = (m.to(device) for m in make_pair(family, **kwargs))
        size = kwargs.get('img_size', 224)
        x = torch.randn(plan.parity_batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            logits = _relative(ours(x), twin(x))
        errors = _device_grad_errors(family, ours, twin, x)
        worst = max(errors, key=errors.get)
        ok = logits <= 1e-4 and errors[worst] <= 1e-3
        rows.append(checked(f'{arch} vs timm, fp32 logits + grads', ok,
                            f"logits {logits:.1e}, worst of {len(errors)} grads {errors[worst]:.1e} ({worst})",
                            'over tolerance (logits 1e-4, gradients 1e-3)', peer='timm, same weights',
                            ratio='(relative errors)', data={'logits': logits, 'grads': len(errors),
                                                             'worst_grad': worst, 'worst_error': errors[worst]}))
        del ours, twin
    return rows

# ------------------------------------------------------------------------------------- 4. training speed vs timm


# dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s from the vendors' data sheets; the first match wins
_DENSE_PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('GH200', 989.0), ('H200', 989.0),
                      ('H100', 989.0), ('A100', 312.0), ('A800', 312.0), ('L40S', 362.0), ('L40', 181.0),
                      ('L4', 121.0), ('V100-PCIE', 112.0), ('V100', 125.0))


def dense_peak_tflops(device: torch.device) -> Optional[float]:
    """The card's dense bf16/fp16 peak, or None when this table does not know it (or on a CPU)."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _DENSE_PEAK_TFLOPS if key in name), None)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_alone(name: str, arch: str, device: torch.device, plan: Plan, dtype: torch.dtype,
               batch: int) -> Optional[dict]:
    """Training images/s and peak memory of one framework with only its own model, optimizer and batch on the
    device (memory freed and the peak reset before), or None when the batch does not fit."""
    from benchmarks import speed
    _free(device)
    result = None
    try:
        setup = speed.Setup(arch, device, threads=torch.get_num_threads(), overrides=plan.overrides[arch])
        runner = speed.Runner(name, setup)
        peak_mb = runner.prepare('train', dtype, batch, plan.warmup)
        rates = [batch * plan.iters / runner.time(plan.iters) for _ in range(plan.rounds)]
        result = {'img_s': statistics.median(rates), 'mem_gb': peak_mb / 1024 if device.type == 'cuda' else None}
    except torch.OutOfMemoryError:
        pass  # freed below, once the exception and the frames it holds are gone
    runner = None
    _free(device)
    return result


def _speed_row(arch: str, prec: str, batch: int, pair: dict, flops_per_image: float,
               peak: Optional[float]) -> Row:
    ours, timm_ = pair['ours'], pair['timm']
    name = f'train {arch} {prec} b{batch} vs timm'
    if ours is None:
        return Row(name, 'FAIL' if timm_ else 'skipped', reason='does not fit' + (' (timm does)' if timm_ else ''))
    mfu = ours['img_s'] * flops_per_image / (peak * 1e12) if peak else None
    mem = (lambda m: f", {m['mem_gb']:.1f} GB" if m and m['mem_gb'] is not None else '')
    figure = f"{ours['img_s']:.0f} img/s{mem(ours)}" + (f", MFU {mfu:.0%}" if mfu is not None else '')
    peer = f"timm {timm_['img_s']:.0f} img/s{mem(timm_)}" if timm_ else 'timm: does not fit'
    ratio = ''
    if timm_:
        ratio = f"{ours['img_s'] / timm_['img_s']:.2f} img/s"
        if ours['mem_gb'] is not None:
            ratio += f", {ours['mem_gb'] / timm_['mem_gb']:.2f} memory"
        ratio += ' (ours/timm)'
    return Row(name, 'ok', figure, peer, ratio, data={'ours': ours, 'timm': timm_, 'mfu': mfu,
                                                     'train_gflops_per_image': flops_per_image / 1e9})


def speed_check(device: torch.device, plan: Plan, report: Report) -> List[Row]:
    """Ours against timm, each alone on the device, at the official batch and the largest both fit."""
    from benchmarks import speed
    from models.complexity import count_flops
    precisions = {'bf16': torch.bfloat16} if device.type == 'cpu' else {'fp16': torch.float16, 'bf16': torch.bfloat16}
    rows = [] if device.type == 'cuda' else [skipped('train fp16 (grad scaler) vs timm', NEEDS_CUDA)]
    peak = dense_peak_tflops(device)
    for arch in ('swin-t', 'swinv2-t'):
        overrides = plan.overrides[arch]
        size = overrides.get('img_size', speed.ARCHS[arch][2])
        # training = forward + backward (twice the forward's products): 3 x 2 FLOPs per multiply-add
        flops = 6.0 * count_flops(speed.build_model('ours-ref', arch, torch.device('cpu'), **overrides), size)
        for prec, dtype in precisions.items():
            measured: Dict[int, dict] = {}

            def pair(batch: int) -> Optional[dict]:
                if batch not in measured:
                    measured[batch] = {k: time_alone(k, arch, device, plan, dtype, batch) for k in ('ours', 'timm')}
                both = measured[batch]
                return both if both['ours'] and both['timm'] else None

            if report.left() < 20:
                rows.append(skipped(f'train {arch} {prec} vs timm', 'time budget'))
                continue
            pair(plan.speed_batch)
            largest = next((b for b in plan.speed_candidates if pair(b) is not None), None)
            for batch in sorted({plan.speed_batch, largest or plan.speed_batch}):
                rows.append(_speed_row(arch, prec, batch, measured[batch], flops, peak))
    if device.type == 'cuda' and peak is None:
        rows.append(skipped('MFU', f'dense peak unknown for {torch.cuda.get_device_name(device)}'))
    return rows

# ---------------------------------------------------------------------------------------- the generated images


def write_images(root: Path, plan: Plan, classes: int = 10) -> None:
    """An ImageFolder train/val pair of JPEGs: each class a colour and a stripe pattern of its own, plus noise
    (learnable under RandAugment's colour operations, not trivially)."""
    import numpy as np
    from PIL import Image
    size = plan.image_size
    rng = np.random.default_rng(0)
    noise = rng.integers(-40, 41, (8, size, size, 3), dtype=np.int16)  # a small bank, rolled per image
    yy, xx = np.mgrid[0:size, 0:size]
    bases, jobs = [], []
    for c in range(classes):
        colour = np.array([(c * 67) % 200 + 30, (c * 131) % 200 + 30, (c * 29) % 200 + 30])
        angle = np.pi * c / classes
        stripes = 50 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi * (2 + c % 3) / size))
        bases.append(np.clip(colour + stripes[..., None], 0, 255).astype(np.int16))
        for split, count in (('train', plan.train_per_class), ('val', plan.val_per_class)):
            folder = root / split / f'class_{c:02d}'
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(c, i % len(noise), tuple(rng.integers(0, size, 2)), folder / f'{i}.jpg') for i in range(count)]

    def save(job) -> None:
        c, n, shift, path = job
        pixels = bases[c] + np.roll(noise[n], shift, (0, 1))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)

    with ThreadPoolExecutor(8) as pool:  # numpy and the JPEG encoder release the GIL
        list(pool.map(save, jobs))


# ----------------------------------------------------------------------------------------- 3. main.py runs


_CONFIGS = {'swin': 'configs/swin/swin_tiny_patch4_window7_224.yaml',
            'swinv2': 'configs/swinv2/swinv2_tiny_patch4_window8_256.yaml'}
_AMP_FLAGS = {'fp32': ['--disable_amp'], 'fp16': ['--amp-dtype', 'float16'], 'bf16': ['--amp-dtype', 'bfloat16']}
_SKIPPED_STEPS = re.compile(r'EPOCH \d+: (\d+) optimizer steps skipped')
_TRAIN_LINE = re.compile(r'Train: \[(\d+)/\d+\]\[\d+/(\d+)\]')


@dataclass
class MainRun:
    """What one main.py run left: exit status, rank 0's log, summary.csv's rows, the worker's notes, its folder."""
    status: int
    log: str
    summary: List[dict]
    worker: dict
    folder: Optional[Path]
    tail: str           # the end of its console output, for the log when it failed

    def losses(self) -> List[float]:
        return [float(r['train_loss']) for r in self.summary]

    def img_s(self) -> Optional[float]:
        """Images/s of the epochs after the first (which also warms up, autotunes or compiles); else the first's."""
        rates = [float(r['images_per_second']) for r in self.summary]
        return statistics.mean(rates[1:] or rates) if rates else None

    def steps(self) -> int:
        """Optimizer steps of this run (accumulation 1): the epochs its log trained times the steps per epoch."""
        seen = {(int(e), int(n)) for e, n in _TRAIN_LINE.findall(self.log)}
        return sum(n for _, n in seen)

    def trained_epochs(self) -> List[int]:
        return sorted({int(e) for e, _ in _TRAIN_LINE.findall(self.log)})

    def skipped_steps(self) -> int:
        return sum(int(n) for n in _SKIPPED_STEPS.findall(self.log))

    def describe(self) -> str:
        losses, group = self.losses(), self.worker.get('process_group', {})
        loss = f"loss {losses[0]:.3f}->{losses[-1]:.3f}" if losses else 'no epoch finished'
        rate = f", {self.img_s():.0f} img/s" if self.img_s() else ''
        return (f"{loss}, {self.steps()} steps, {self.skipped_steps()} skipped{rate}, "
                f"{group.get('backend', '?')} x{group.get('world_size', '?')}")


class MainRuns:
    """Launches ``main.py``'s entry point under torchrun (through this module's worker, see :func:`main_worker`)
    on the generated images, in the work folder, and reads back what each run left."""

    def __init__(self, device: torch.device, plan: Plan, work: Path, data: Path, report: Report):
        self.device, self.plan, self.work, self.data, self.report = device, plan, work, data, report
        self.nproc = torch.cuda.device_count() if device.type == 'cuda' else 1
        self.env = child_env(device)

    def argv(self, family: str, output: Path, amp: str, epochs: int, *flags: str) -> List[str]:
        """main.py's arguments: the paper's tiny config (tiny opts on a CPU), the official augmentation as it is,
        10 classes, warm-up 1 epoch, a checkpoint every epoch, all kept (the resume starts from one)."""
        plan = self.plan
        return ['--cfg', str(REPO / _CONFIGS[family]), '--data-path', str(self.data), '--output', str(output),
                '--batch-size', str(plan.main_batch), *_AMP_FLAGS[amp], *flags, '--opts',
                'MODEL.NUM_CLASSES', '10', 'TRAIN.EPOCHS', str(epochs), 'TRAIN.WARMUP_EPOCHS', '1',
                'TRAIN.BASE_LR', f'{plan.main_lr * 512 / (plan.main_batch * self.nproc):g}',
                'DATA.NUM_WORKERS', str(plan.workers), 'PRINT_FREQ', str(plan.print_freq),
                'SAVE_FREQ', '1', 'TRAIN.KEEP_CKPTS', '0', 'TRAIN.SAVE_BEST', 'False', *plan.main_opts[family]]

    def launch(self, tag: str, argv: List[str], sync_debug: bool = False, deterministic: bool = False,
               compile_backend: Optional[str] = None, timeout: float = 300) -> MainRun:
        """``torchrun --standalone --nproc_per_node N -m benchmarks.gpu_check --main-worker ... -- ARGV``."""
        result = self.work / f'{tag}.json'
        flags = (['--sync-debug'] if sync_debug else []) + (['--deterministic'] if deterministic else []) + \
            (['--compile-backend', compile_backend] if compile_backend else [])
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={self.nproc}',
               '-m', 'benchmarks.gpu_check', '--main-worker', str(result), *flags, '--', *argv]
        status, out = run_process(cmd, self.work, self.env, max(30.0, min(timeout, self.report.left() + 10)))
        output = argv[argv.index('--output') + 1]
        folder = next(iter(Path(output).glob('*/default')), None)
        log = (folder / 'log_rank0.txt').read_text() if folder and (folder / 'log_rank0.txt').exists() else ''
        summary = []
        if folder and (folder / 'summary.csv').exists():
            with open(folder / 'summary.csv', newline='') as f:
                summary = list(csv.DictReader(f))
        worker = json.loads(result.read_text()) if result.exists() else {}
        run = MainRun(status, log, summary, worker, folder, out[-3000:])
        if run.status != 0:
            print(f"   main.py {tag} exited {run.status}; the end of its output:\n{run.tail}", flush=True)
        return run


def run_process(cmd: List[str], cwd: Path, env: dict, timeout: float) -> Tuple[int, str]:
    """(exit status, stdout and stderr) of ``cmd``; at the time limit it gets SIGTERM, which torchrun passes on to
    its workers (a SIGKILL would leave them holding the GPU), then SIGKILL 30 s later. Status 124: timed out."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        return 124, (out or '') + f'\ntimed out after {timeout:.0f} s'


def child_env(device: torch.device) -> dict:
    """The environment of the main.py processes: this repository (and any carried wheels) on the path, no
    launcher variables of our own, deterministic cuBLAS, no GPU for a CPU check."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), *paths])
    env['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'  # cuBLAS's deterministic workspaces
    env['PYTHONUNBUFFERED'] = '1'
    if device.type == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # the CPU check stays on the CPU on a GPU machine too
        env['OMP_NUM_THREADS'] = '1'  # tiny models: one thread is fastest, and steady on a shared machine
    return env


def _trained(run: MainRun, expected_backend: str) -> Tuple[bool, str]:
    """Whether a training run did what it must: exit 0, every epoch, the loss down (first epoch's mean against
    the last's), at most 10 % of the steps skipped by the grad scaler, and the process group expected."""
    losses, backend = run.losses(), run.worker.get('process_group', {}).get('backend')
    if run.status != 0:
        return False, f"exit status {run.status}: {_error_line(run)}"
    if len(losses) < 2 or not losses[-1] < losses[0]:
        return False, f"the loss did not go down: epoch means {losses}"
    if run.skipped_steps() > 0.1 * max(run.steps(), 1):
        return False, f"the grad scaler skipped {run.skipped_steps()} of {run.steps()} steps"
    if backend != expected_backend:
        return False, f"process group {backend}, expected {expected_backend}"
    return True, ''


def ddp_check(runs: MainRuns) -> Tuple[List[Row], MainRun]:
    """Swin-T under DDP for a few hundred steps (fp16 with the grad scaler on a GPU): the loss, the skipped steps,
    and the host synchronisations between log steps."""
    cuda = runs.device.type == 'cuda'
    amp = 'fp16' if cuda else 'bf16'
    # on a CPU deterministic algorithms change nothing, and this run is then the resume's uninterrupted twin
    run = runs.launch('ddp', runs.argv('swin', runs.work / 'ddp', amp, runs.plan.main_epochs), sync_debug=True,
                      deterministic=not cuda)
    ok, reason = _trained(run, 'nccl' if cuda else 'gloo')
    rows = [checked(f'main.py torchrun DDP swin-t {amp}', ok, run.describe(), reason,
                    data={'losses': run.losses(), 'steps': run.steps(), 'skipped_steps': run.skipped_steps(),
                          'img_s': run.img_s(), **run.worker})]
    sync = run.worker.get('sync')
    if not cuda:  # the steps were told apart all the same: report.json shows the counts
        rows.append(Row('host syncs between log steps', 'skipped', reason=NEEDS_CUDA, data=sync or {}))
    elif not sync:
        rows.append(Row('host syncs between log steps', 'FAIL', reason='no count: the DDP run failed'))
    else:
        figure = (f"{sync['counts']['between']} in {sync['steps']['between']} steps between log steps "
                  f"({sync['counts']['log']} in {sync['steps']['log']} log steps)")
        rows.append(checked('host syncs between log steps', sync['counts']['between'] == 0, figure,
                            f"{sync['counts']['between']} syncs, first at {'; '.join(sync['where'][:1])}",
                            data=sync))
    return rows, run


def resume_check(runs: MainRuns, ddp: Optional[MainRun]) -> List[Row]:
    """A run resumed in a fresh folder from its checkpoint after epoch K, against the same run uninterrupted: the
    weights and optimizer state after the last epoch must be equal bit for bit. Both use deterministic algorithms,
    strictly (an op without a deterministic kernel fails the run, naming itself; with warn_only CUDA's
    memory-efficient attention would keep its non-deterministic backward). On a CPU the DDP run is the
    uninterrupted one; on a GPU, whose DDP run keeps the default kernels, a shorter twin runs first."""
    name = 'resume continues bit-identically'
    cuda = runs.device.type == 'cuda'
    amp = 'fp16' if cuda else 'bf16'
    epochs = runs.plan.resume_epochs
    twin = not cuda and runs.plan.main_epochs == epochs  # the CPU's DDP run is deterministic: the same run
    full = ddp if twin else runs.launch('uninterrupted', runs.argv('swin', runs.work / 'uninterrupted', amp, epochs),
                                        deterministic=True)
    if full is None or full.status != 0 or full.folder is None:
        return [Row(name, 'FAIL', reason=f'the uninterrupted run failed: {_error_line(full)}')]
    start = epochs // 2 - 1
    folder = runs.work / 'resumed' / Path(*full.folder.parts[-2:])  # <MODEL.NAME>/default
    folder.mkdir(parents=True)
    shutil.copy(full.folder / f'ckpt_epoch_{start}.pth', folder)
    run = runs.launch('resumed', runs.argv('swin', runs.work / 'resumed', amp, epochs), deterministic=True)
    if run.status != 0:
        return [Row(name, 'FAIL', reason=f'the resumed run failed: {_error_line(run)}')]
    if run.trained_epochs() != list(range(start + 1, epochs)):
        return [Row(name, 'FAIL', reason=f'the resumed run trained epochs {run.trained_epochs()}, '
                                         f'not those after {start}')]
    last = f'ckpt_epoch_{epochs - 1}.pth'
    same, total, worst = compare_checkpoints(full.folder / last, folder / last)
    trained = f'epoch {start + 1}' if start + 2 == epochs else f'epochs {start + 1}-{epochs - 1}'
    return [checked(name, same == total, f"{same}/{total} tensors identical after {trained} ({amp})",
                    f"max |diff| {worst:.1e}", data={'same': same, 'total': total, 'max_diff': worst})]


def _error_line(run: Optional[MainRun]) -> str:
    """The line of a failed run's output that names the error (the last that looks like one)."""
    if run is None:
        return 'it did not run'
    lines = [x.strip() for x in run.tail.splitlines() if x.strip()]
    errors = [x for x in lines if re.search(r'(Error|error:|Exception)\b', x) and 'ChildFailedError' not in x]
    return (errors or lines or [f'exit status {run.status}'])[-1][:200]


def compare_checkpoints(a: Path, b: Path) -> Tuple[int, int, float]:
    """(tensors equal, tensors compared, largest difference) over the model and the optimizer state of two
    checkpoints."""
    def tensors(path: Path) -> Dict[str, torch.Tensor]:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        out = {f'model.{k}': v for k, v in ckpt['model'].items()}
        for index, state in ckpt['optimizer']['state'].items():
            out.update({f'optimizer.{index}.{k}': v for k, v in state.items() if torch.is_tensor(v)})
        return out
    x, y = tensors(a), tensors(b)
    if x.keys() != y.keys():
        raise KeyError(f"the checkpoints hold different tensors: {sorted(x.keys() ^ y.keys())[:5]}")
    same = sum(torch.equal(x[k], y[k]) for k in x)
    worst = max(((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel()), default=0.0)
    return same, len(x), worst


def fsdp_check(runs: MainRuns, family: str, amp: str, ddp: Optional[MainRun]) -> List[Row]:
    """V1 or V2 sharded with FSDP (TRAIN.SHARDING fsdp) for a few epochs: trains, the loss goes down."""
    arch = 'swin-t' if family == 'swin' else 'swinv2-t'
    amp = amp if runs.device.type == 'cuda' else 'bf16'
    from utils.sharding import fsdp_runs_on_cpu
    if runs.device.type == 'cpu' and not fsdp_runs_on_cpu():
        return [skipped(f'main.py torchrun FSDP {arch} {amp}', 'needs torch 2.7 on the CPU')]
    run = runs.launch(f'fsdp_{family}', runs.argv(family, runs.work / f'fsdp_{family}', amp, runs.plan.fsdp_epochs,
                                                  '--sharding', 'fsdp'))
    ok, reason = _trained(run, 'nccl' if runs.device.type == 'cuda' else 'gloo')
    peer = ratio = ''
    if ddp is not None and ddp.img_s() and run.img_s() and family == 'swin':
        peer, ratio = f"DDP {ddp.img_s():.0f} img/s", f"{run.img_s() / ddp.img_s():.2f} (FSDP/DDP img/s)"
    return [checked(f'main.py torchrun FSDP {arch} {amp}', ok, run.describe(), reason, peer=peer, ratio=ratio,
                    data={'losses': run.losses(), 'steps': run.steps(), 'img_s': run.img_s(), **run.worker})]


def compile_check(runs: MainRuns, ddp: Optional[MainRun]) -> List[Row]:
    """``main.py --compile`` under torchrun: it trains, finite losses; the first epoch's time holds the compilation
    (of the training and the evaluation graphs), the epochs after it give the compiled steps' images/s."""
    plan, cuda = runs.plan, runs.device.type == 'cuda'
    amp = 'fp16' if cuda else 'bf16'
    name = f'main.py torchrun --compile swin-t {amp}' + (f' ({plan.compile_note})' if plan.compile_note else '')
    run = runs.launch('compile', runs.argv('swin', runs.work / 'compile', amp, plan.compile_epochs, '--compile'),
                      compile_backend=plan.compile_backend, timeout=400)
    losses = run.losses()
    ok = run.status == 0 and len(losses) == plan.compile_epochs and all(map(math.isfinite, losses))
    first = float(run.summary[0]['epoch_seconds']) if run.summary else float('nan')
    figure = f"epoch 0 {first:.0f} s (compilation in it)"
    if len(losses) > 1:
        figure += f", then {run.img_s():.0f} img/s"
    figure += f", loss {', '.join(f'{x:.3f}' for x in losses)}"
    peer = ratio = ''
    if ddp is not None and ddp.img_s() and len(losses) > 1:
        peer, ratio = f"eager {ddp.img_s():.0f} img/s", f"{run.img_s() / ddp.img_s():.2f} (compiled/eager img/s)"
    reason = f'exit status {run.status}: {_error_line(run)}' if run.status else f'epoch losses {losses}'
    return [checked(name, ok, figure, reason, peer=peer, ratio=ratio,
                    data={'losses': losses, 'first_epoch_s': first, 'img_s': run.img_s(), **run.worker})]


# ---------------------------------------------------------------------------------- 5. the paper's throughput


# Swin paper, Table 1(a): images/s on a V100 GPU
PAPER_IMG_S = {'swin_tiny_patch4_window7_224': 755, 'swin_small_patch4_window7_224': 437,
               'swin_base_patch4_window7_224': 278}
_THROUGHPUT = re.compile(r'batch_size (\d+) throughput ([\d.]+)')


def throughput_check(runs: MainRuns) -> List[Row]:
    """``python main.py --throughput`` (one process, as the paper's line is run) per model and precision: fp32
    with TF32 off, and fp16 on a GPU."""
    plan, cuda = runs.plan, runs.device.type == 'cuda'
    rows = [] if cuda else [skipped('main.py --throughput fp16', NEEDS_CUDA)]
    for model in plan.throughput_models:
        for prec in ('fp32', 'fp16') if cuda else ('fp32',):
            short = model.split('_')[1][0].upper()
            name = f'main.py --throughput Swin-{short} {prec}, b{plan.throughput_batch}'
            if runs.report.left() < 15:
                rows.append(skipped(name, 'time budget'))
                continue
            argv = [str(REPO / 'main.py'), '--throughput', '--cfg', str(REPO / 'configs/swin' / f'{model}.yaml'),
                    '--data-path', str(runs.data), '--batch-size', str(plan.throughput_batch),
                    '--output', str(runs.work / f'throughput_{model}_{prec}'), *_AMP_FLAGS[prec],
                    '--opts', 'ALLOW_TF32', 'False', 'DATA.NUM_WORKERS', '0', *plan.main_opts['swin']]
            status, out = run_process([sys.executable, *argv], runs.work, runs.env,
                                      max(30.0, min(180.0, runs.report.left() + 10)))
            found = _THROUGHPUT.findall(out)
            if status != 0 or not found:
                print(out[-2000:], flush=True)
                rows.append(Row(name, 'FAIL', reason=f'exit status {status}, no throughput line'))
                continue
            rate, paper = float(found[-1][1]), PAPER_IMG_S[model]
            if plan.main_opts['swin']:  # the CPU plan's tiny model: nothing to hold against the paper
                rows.append(Row(name, 'ok', f"{rate:.0f} img/s (tiny model)", data={'img_s': rate}))
                continue
            rows.append(Row(name, 'ok', f"{rate:.0f} img/s", f"paper {paper} img/s (V100)",
                            f"{rate / paper:.2f} (this card / the paper's V100)",
                            data={'img_s': rate, 'paper_v100_img_s': paper}))
    return rows

# ------------------------------------------------------------------------- the worker that runs main.py's entry


class SyncWatch:
    """The host synchronisations of the training loop (``torch.cuda.set_sync_debug_mode('warn')`` makes each one a
    warning), split into those of the log steps (every PRINT_FREQ-th and the last: they read the step statistics
    by design) and those of the steps between, which should have none."""

    def __init__(self):
        self.current: Optional[str] = None  # 'log' or 'between' while a step runs; None outside the loop
        self.counts = {'log': 0, 'between': 0}
        self.steps = {'log': 0, 'between': 0}
        self.where: List[str] = []

    def wrap(self, train_one_epoch: Callable) -> Callable:
        """main.py's train_one_epoch, its steps told apart by a counting loss function."""
        @functools.wraps(train_one_epoch)
        def watched(config, ctx, data_loader, epoch, logger, mid=None):
            start_step = mid.start_step if mid is not None else 0
            loss_fn, num, freq, index = ctx.loss_fn, len(data_loader), config.PRINT_FREQ, [start_step]

            def counted(ctx_, batch):
                self.current = 'log' if index[0] % freq == 0 or index[0] == num - 1 else 'between'
                self.steps[self.current] += 1
                index[0] += 1
                return loss_fn(ctx_, batch)

            ctx.loss_fn = counted
            cuda = ctx.device.type == 'cuda'  # on a CPU the steps are told apart, with nothing to count
            if cuda:
                torch.cuda.set_sync_debug_mode('warn')
            try:
                return train_one_epoch(config, ctx, data_loader, epoch, logger, mid)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode('default')
                ctx.loss_fn, self.current = loss_fn, None
        return watched

    def on_sync(self) -> None:
        if self.current is None:
            return
        self.counts[self.current] += 1
        if self.current == 'between' and len(self.where) < 3:  # where, in this repository's code
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(REPO))
                      and f.filename != __file__ and 'site-packages' not in f.filename]
            self.where.append(' <- '.join(f"{Path(f.filename).relative_to(REPO)}:{f.lineno} {f.name}"
                                          for f in reversed(frames[-3:])))

    def summary(self) -> dict:
        return {'counts': self.counts, 'steps': self.steps, 'where': self.where}


class _Warnings:
    """Warnings are shown as before, except the host synchronisations, which go to ``on_sync`` (there may be
    thousands)."""

    def __init__(self, on_sync: Callable[[], None]):
        self.on_sync, self._show = on_sync, warnings.showwarning
        warnings.filterwarnings('always', message='.*synchronizing CUDA operation')
        warnings.showwarning = self.show

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if 'synchronizing CUDA operation' in text:
            return self.on_sync()
        self._show(message, category, filename, lineno, file, line)


def rebind(original: Callable, replacement: Callable) -> int:
    """Point every module-level name bound to ``original`` (its own module's, and the copies ``from x import f``
    made) at ``replacement``; returns how many. So the worker's patches reach main.py's helpers wherever the
    modules of the day import them from."""
    count = 0
    for module in list(sys.modules.values()):
        names = getattr(module, '__dict__', {})
        for key in [k for k, v in list(names.items()) if v is original]:
            names[key] = replacement
            count += 1
    return count


def _in_a_process_group(init: Callable, seen: dict) -> Callable:
    """``utils.distributed.init_distributed``, plus the process group it leaves out in a world of one (NCCL on a
    GPU, gloo on a CPU); the DistEnv it returns says 'distributed', so DDP or FSDP wraps the model as on several
    GPUs."""
    import torch.distributed as dist
    from utils.distributed import DistEnv

    class GroupEnv(DistEnv):
        @property
        def distributed(self) -> bool:
            return dist.is_initialized()

    def init_distributed(device: str = 'auto') -> DistEnv:
        env = init(device)
        if not dist.is_initialized():
            cuda = env.device.type == 'cuda'
            dist.init_process_group('nccl' if cuda else 'gloo', rank=env.rank, world_size=env.world_size,
                                    **({'device_id': env.device} if cuda else {}))
        seen.update(backend=dist.get_backend(), world_size=dist.get_world_size())
        return GroupEnv(env.rank, env.local_rank, env.world_size, env.device)
    return init_distributed


def _deterministic() -> int:
    """Deterministic algorithms (an op without one raises), and no cuDNN autotuner: two processes may time the
    convolution algorithms differently and pick different ones. Returns how many names were patched."""
    import utils.cuda
    torch.use_deterministic_algorithms(True)
    configure = utils.cuda.configure_cuda

    def configure_cuda(allow_tf32: bool = True) -> None:
        configure(allow_tf32)
        torch.backends.cudnn.benchmark = False
    return rebind(configure, configure_cuda)


def main_worker(argv: Sequence[str]) -> int:
    """A torchrun worker: main.py's run (``launch.run`` of ``classification.train_or_evaluate``) in a process group,
    and notes for the parent in RESULT (JSON): the process group, what was patched, where yacs and termcolor came
    from, the host synchronisations of the steps."""
    p = argparse.ArgumentParser(prog='python -m benchmarks.gpu_check --main-worker')
    p.add_argument('result', type=Path)
    p.add_argument('--sync-debug', action='store_true', help='count the host synchronisations of the steps')
    p.add_argument('--deterministic', action='store_true')
    p.add_argument('--compile-backend', help="torch.compile's backend for --compile (default inductor)")
    argv = list(argv)
    split = argv.index('--') if '--' in argv else len(argv)  # then main.py's arguments
    args, main_args = p.parse_args(argv[:split]), argv[split + 1:]
    import engine
    import launch  # and with it every module of the run
    import utils.distributed
    from classification import train_or_evaluate
    from config import parse_command_line
    notes: dict = {'process_group': {}, 'status': None, 'patched': {}}
    init = utils.distributed.init_distributed
    notes['patched']['init_distributed'] = rebind(init, _in_a_process_group(init, notes['process_group']))
    if args.deterministic:
        notes['patched']['configure_cuda'] = _deterministic()
    if args.compile_backend:
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    watch = SyncWatch()
    if args.sync_debug:
        notes['patched']['train_one_epoch'] = rebind(engine.train_one_epoch, watch.wrap(engine.train_one_epoch))
    _Warnings(watch.on_sync)
    try:
        notes['status'] = launch.run(main_args, parse_command_line, train_or_evaluate)  # what main.py runs
    finally:
        notes.update(imports={m: getattr(sys.modules.get(m), '__file__', None) for m in ('yacs', 'termcolor')},
                     sync=watch.summary() if args.sync_debug else None, deterministic=args.deterministic,
                     compile_backend=args.compile_backend)
        if os.environ.get('RANK', '0') == '0':
            args.result.write_text(json.dumps(notes))
    return notes['status']

# -------------------------------------------------------------------------------------------------------- main


def run_checks(device: torch.device, plan: Plan, work: Path, report: Report) -> None:
    """Every check in order of importance (the budget skips the last ones first when the machine is slow)."""
    report.run('attention kernels', 10, lambda: attention_check(device, plan))
    report.run('parity with timm', 10, lambda: parity_check(device, plan))
    data = work / 'images'
    write_images(data, plan)
    runs = MainRuns(device, plan, work, data, report)
    held: Dict[str, MainRun] = {}

    def ddp() -> List[Row]:
        rows, held['ddp'] = ddp_check(runs)
        return rows

    report.run('main.py DDP', 40, ddp)
    report.run('main.py resume', 45, lambda: resume_check(runs, held.get('ddp')))
    report.run('main.py FSDP swin', 35, lambda: fsdp_check(runs, 'swin', 'fp16', held.get('ddp')))
    report.run('main.py FSDP swinv2', 35, lambda: fsdp_check(runs, 'swinv2', 'bf16', held.get('ddp')))
    report.run('training speed vs timm', 70, lambda: speed_check(device, plan, report))
    report.run('paper throughput', 75 if device.type == 'cuda' else 10, lambda: throughput_check(runs))
    report.run('main.py --compile', 110, lambda: compile_check(runs, held.get('ddp')))


def environment(device: torch.device, imports: Dict[str, str]) -> dict:
    import timm
    import torchvision
    info = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU',
            'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__,
            'cuda': torch.version.cuda, 'imports': imports}
    if device.type == 'cuda':
        info['dense_peak_tflops'] = dense_peak_tflops(device)
    return info


def check(device: torch.device, out: Path, wheels: Path) -> int:
    """Every check of ``device``'s plan; the report, the log and the table; 1 when a check failed."""
    imports = use_carried_wheels(wheels)
    plan = GPU_PLAN if device.type == 'cuda' else CPU_PLAN
    if device.type == 'cpu':
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a shared machine
    out.mkdir(parents=True, exist_ok=True)
    tee = sys.stdout = _Tee(sys.stdout, out / 'gpu_check.log')
    work = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    # what this process and its children put in temporary folders (torchrun's logs, torch's caches) goes in it too
    os.environ['TMPDIR'] = tempfile.tempdir = str(work)
    report, info = Report(plan.budget_s), environment(device, imports)
    try:
        print(f"gpu_check on {info['device']}: torch {info['torch']}, torchvision {info['torchvision']}, timm "
              f"{info['timm']}; yacs from {imports['yacs']}; work folder {work}", flush=True)
        if device.type == 'cuda':
            from utils.cuda import configure_cuda
            configure_cuda(allow_tf32=False)  # fp32 comparisons in full fp32; mixed precision is not affected
        run_checks(device, plan, work, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        counts, seconds = report.counts(), time.time() - report.start
        (out / 'report.json').write_text(json.dumps(
            {**info, 'seconds': round(seconds, 1), 'counts': counts,
             'checks': [{**asdict(r), 'ok': r.ok} for r in report.rows]}, indent=1, default=str))
        print(f"\ngpu_check: {counts['ok']} ok, {counts['FAIL']} FAIL, {counts['skipped']} skipped in {seconds:.0f} s "
              f"on {info['device']}; {out / 'report.json'}\n{report.table()}", flush=True)
        sys.stdout = tee.stream
        tee.close()
    return 1 if counts['FAIL'] else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--main-worker']:  # a torchrun worker of the main.py checks
        return main_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--out', type=Path, default=Path('output/gpu_check'),
                   help='folder for report.json and gpu_check.log (default: output/gpu_check)')
    p.add_argument('--wheels', type=Path, default=REPO / '.whl',
                   help='pure-Python wheels to import from where a package is missing (default: .whl)')
    args = p.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, nothing checked (--device cpu checks the script on the CPU)")
        return 0
    return check(torch.device(args.device), args.out, args.wheels)


if __name__ == '__main__':
    sys.exit(main())
