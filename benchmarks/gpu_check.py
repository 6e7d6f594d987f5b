"""The GPU paths in one command, for the first machine that has a GPU (``make gpu-check``; under 8 minutes).

1. Training steps of Swin-T and SwinV2-T in fp16 (with a grad scaler) and bf16 against timm's twins, same batch,
   same fused AdamW: images/s and peak memory (``benchmarks.speed``'s model-code comparison).
2. Evaluation images/s in the same precisions.
3. One ``torch.compile`` training step of ours: compile time, step time, and its loss against eager mode.
4. ``main.py`` under torchrun for a few hundred steps on generated images: 1 process (NCCL, fp16: the default
   on CUDA), reporting the steps the grad scaler skipped; 2 processes where there are 2 GPUs.

Without a GPU it says so in one line and exits 0. ``--device cpu`` runs the same script on the CPU with tiny
models (bf16; fp16 too where the CPU supports it in autocast), so CI checks the script itself. A report is
printed and written as JSON (``--out``); the exit status is 1 when a check failed.

    .venv/bin/python -m benchmarks.gpu_check                 # on a GPU machine
    .venv/bin/python -m benchmarks.gpu_check --device cpu    # the script itself, small, on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import speed  # noqa: E402


@dataclass
class Plan:
    """Sizes of the checks: the paper's models on a GPU, tiny ones on a CPU (same code paths)."""
    overrides: dict
    train_batch: int
    infer_batch: int
    rounds: int
    iters: int
    warmup: int
    main_images: int    # per class, 10 classes
    main_img_size: int
    main_batch: int
    main_epochs: int
    main_model: List[str] = field(default_factory=list)  # --opts for main.py's model


GPU_PLAN = Plan(overrides={}, train_batch=64, infer_batch=128, rounds=3, iters=10, warmup=3,
                main_images=160, main_img_size=224, main_batch=32, main_epochs=4,
                main_model=['MODEL.TYPE', 'swin', 'MODEL.NAME', 'swin_tiny_gpu_check'])
CPU_PLAN = Plan(overrides=dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
                train_batch=2, infer_batch=2, rounds=1, iters=1, warmup=1,
                main_images=4, main_img_size=32, main_batch=4, main_epochs=1,
                main_model=['MODEL.TYPE', 'swin', 'MODEL.NAME', 'swin_micro_cpu_check', 'MODEL.SWIN.EMBED_DIM', '16',
                            'MODEL.SWIN.DEPTHS', '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[1, 2]',
                            'MODEL.SWIN.WINDOW_SIZE', '4'])


class Report:
    """Results of the checks, in order; a check that raised is a failure with its last error line."""

    def __init__(self):
        self.checks: List[dict] = []

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        start = time.time()
        try:
            result = {'name': name, 'ok': True, **fn()}
        except Exception as e:  # a check's failure is reported; the others still run
            traceback.print_exc()
            result = {'name': name, 'ok': False, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
        result['seconds'] = round(time.time() - start, 1)
        self.checks.append(result)
        print(f"[{'ok' if result['ok'] else 'FAILED'}] {name} ({result['seconds']} s)", flush=True)


def cpu_fp16_autocast() -> bool:
    """Whether this PyTorch runs fp16 autocast on the CPU (the CPU run then checks the fp16 path too)."""
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            return torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float16
    except RuntimeError:
        return False


def step_speed(device: torch.device, plan: Plan, precisions: List[str]) -> dict:
    """Sections 1 and 2: ours against timm, model code alone, for both architectures."""
    rows = []
    modes = [f'{kind}-{p}' for kind in ('train', 'infer') for p in precisions]
    for arch in ('swin-t', 'swinv2-t'):
        overrides = dict(plan.overrides)
        if arch == 'swinv2-t' and overrides:
            overrides['window_size'] = 4
        rows += [dict(r, arch=arch) for r in speed.run(
            'model', modes, {'train': plan.train_batch, 'infer': plan.infer_batch}, plan.rounds, plan.iters,
            plan.warmup, device, arch, names=['ours', 'timm'], overrides=overrides or None)]
    for arch in ('swin-t', 'swinv2-t'):
        print(f"-- {arch}\n" + speed.format_rows([r for r in rows if r['arch'] == arch]), flush=True)
    return {'rows': rows}


def compile_step(device: torch.device, plan: Plan, dtype: Optional[torch.dtype], backend: str) -> dict:
    """Section 3: one torch.compile training step of ours; its loss must match eager mode's."""
    torch.manual_seed(0)  # no stochastic depth: the compiled graph draws its random numbers differently
    model = speed.build_model('ours-ref', 'swin-t', device, **plan.overrides, drop_path_rate=0.0).to(device).train()
    img = plan.overrides.get('img_size', speed.ARCHS['swin-t'][2])
    x = torch.randn(plan.train_batch, 3, img, img, device=device)
    target = torch.randint(0, 1000, (plan.train_batch,), device=device)
    with speed._autocast(device, dtype):
        eager = F.cross_entropy(model(x), target).item()
    compiled = torch.compile(model, backend=backend)
    times = []
    for _ in range(2):
        speed._sync(device)
        start = time.perf_counter()
        with speed._autocast(device, dtype):
            loss = F.cross_entropy(compiled(x), target)
        loss.backward()
        speed._sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    loss = loss.item()
    tol = 0.05 * max(1.0, abs(eager)) if dtype is not None else 1e-3 * max(1.0, abs(eager))
    if not abs(loss - eager) <= tol:
        raise AssertionError(f"compiled loss {loss:.5f} vs eager {eager:.5f}")
    return {'backend': backend, 'compile_and_first_step_s': round(times[0], 2), 'second_step_s': round(times[1], 4),
            'loss': loss, 'eager_loss': eager}


def write_images(root: Path, per_class: int, size: int, classes: int = 10) -> None:
    """An ImageFolder train/val pair of JPEGs: each class a colour, plus noise (learnable, not trivial)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (('train', per_class), ('val', max(1, per_class // 4))):
        for c in range(classes):
            folder = root / split / f'class_{c:02d}'
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.float32)
            for i in range(n):
                noise = rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f'{i}.jpg')


_SKIPPED = re.compile(r'EPOCH \d+: (\d+) optimizer steps skipped')
_TRAIN_TIME = re.compile(r'EPOCH \d+ training takes (\d+):(\d+):(\d+)')


def main_run(device: torch.device, plan: Plan, data: Path, out: Path, procs: int, amp_dtype: str) -> dict:
    """Section 4: ``torchrun main.py`` on the generated images; exit status, steps, skipped steps, accuracy."""
    cfg = out / 'gpu_check.yaml'
    cfg.write_text(f"DATA:\n  IMG_SIZE: {plan.main_img_size}\nMODEL:\n  NUM_CLASSES: 10\n")
    output = out / f'main_{procs}proc_{amp_dtype}'
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='2')
    if device.type == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # the CPU run stays on the CPU even on a GPU machine
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}',
           str(REPO / 'main.py'), '--cfg', str(cfg), '--data-path', str(data), '--output', str(output),
           '--batch-size', str(plan.main_batch), '--amp-dtype', amp_dtype,
           '--opts', *plan.main_model, 'TRAIN.EPOCHS', str(plan.main_epochs), 'TRAIN.WARMUP_EPOCHS', '1',
           'DATA.NUM_WORKERS', '4' if device.type == 'cuda' else '0', 'PRINT_FREQ', '10', 'TRAIN.KEEP_CKPTS', '1',
           'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0']
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=480)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"main.py exited {proc.returncode}: {log.strip().splitlines()[-1] if log.strip() else ''}")
    per_rank = plan.main_images * 10 // (plan.main_batch * procs)
    steps = per_rank * plan.main_epochs
    seconds = sum(int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in _TRAIN_TIME.findall(log))
    acc = re.findall(r'\* Acc@1 ([\d.]+)', log)
    return {'processes': procs, 'amp_dtype': amp_dtype, 'optimizer_steps': steps,
            'skipped_steps': sum(int(n) for n in _SKIPPED.findall(log)),
            'train_img_s': round(steps * plan.main_batch * procs / seconds, 1) if seconds else None,
            'final_acc1': float(acc[-1]) if acc else None}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile's backend (the CPU test takes aot_eager: no C++ code generation)")
    p.add_argument('--out', default=None, help='folder for the report, the data and the runs (default: a temp dir)')
    args = p.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, nothing checked (--device cpu checks the script on the CPU)")
        return 0
    device = torch.device(args.device)
    plan = GPU_PLAN if device.type == 'cuda' else CPU_PLAN
    out = Path(args.out or tempfile.mkdtemp(prefix='gpu_check_'))
    out.mkdir(parents=True, exist_ok=True)
    precisions = ['fp16', 'bf16'] if device.type == 'cuda' or cpu_fp16_autocast() else ['bf16']
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f"gpu_check on {name}, torch {torch.__version__}, output {out}", flush=True)
    report, start = Report(), time.time()
    report.run('training and evaluation steps vs timm', lambda: step_speed(device, plan, precisions))
    report.run('torch.compile training step', lambda: compile_step(
        device, plan, torch.bfloat16 if device.type == 'cpu' else torch.float16, args.compile_backend))
    data = out / 'images'
    write_images(data, plan.main_images, plan.main_img_size)
    main_dtype = 'float16' if device.type == 'cuda' else 'bfloat16'  # main.py refuses fp16 on a CPU
    report.run(f'main.py, 1 process, {main_dtype}', lambda: main_run(device, plan, data, out, 1, main_dtype))
    if device.type == 'cuda' and torch.cuda.device_count() >= 2:
        report.run('main.py, 2 processes, bfloat16', lambda: main_run(device, plan, data, out, 2, 'bfloat16'))
    (out / 'report.json').write_text(json.dumps({'device': name, 'torch': torch.__version__,
                                                 'checks': report.checks}, indent=1))
    failed = [c['name'] for c in report.checks if not c['ok']]
    print(f"gpu_check: {len(report.checks) - len(failed)}/{len(report.checks)} checks passed in "
          f"{time.time() - start:.0f} s; report {out / 'report.json'}" + (f"; FAILED: {', '.join(failed)}"
                                                                            if failed else ''))
    for check in report.checks:
        print(json.dumps({k: v for k, v in check.items() if k != 'rows'}))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
