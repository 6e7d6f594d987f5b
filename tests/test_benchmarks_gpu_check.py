"""benchmarks.gpu_check as CI runs it: ``--device cpu --out DIR`` once, in a process where yacs and termcolor are
importable only from pure-Python wheels (as on a bare GPU machine that got them from ``make gpu-wheels``) and pip
not at all; one launch serves every assertion. And the one-line answer on a machine without a GPU."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cli import REPO, _env
from utils.sharding import fsdp_runs_on_cpu

# A sitecustomize for the check and every process it starts: yacs and termcolor come from a sys.path entry outside
# site-packages (a carried wheel) or not at all, and pip cannot be imported (the check must never install).
HIDE_INSTALLED = textwrap.dedent('''
    import importlib.machinery, site, sys

    _SITE = tuple(site.getsitepackages())

    class OnlyFromWheels:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] == 'pip':
                raise ModuleNotFoundError('pip is hidden in this test', name=name)
            if name in ('yacs', 'termcolor'):
                spec = importlib.machinery.PathFinder.find_spec(
                    name, [p for p in sys.path if not p.startswith(_SITE)])
                if spec is None:
                    raise ModuleNotFoundError(f'No module named {name!r} (hidden in this test)', name=name)
                return spec
            return None

    sys.meta_path.insert(0, OnlyFromWheels())
''')

CUDA_ONLY = {'host syncs between log steps', 'train fp16 (grad scaler) vs timm', 'main.py --throughput fp16'}
FSDP_RUNS = ('main.py torchrun FSDP swin-t bf16', 'main.py torchrun FSDP swinv2-t bf16')
# FSDP2 runs on CPU tensors from torch 2.7 on; on an older torch those checks say why they are skipped
SKIPPED_HERE = CUDA_ONLY | (set() if fsdp_runs_on_cpu() else set(FSDP_RUNS))


def wheel_of_installed(name: str, folder: Path) -> Path:
    """A pure-Python wheel of an installed distribution: the files its RECORD lists (what pip unpacked from the
    wheel it installed), without byte code; what ``make gpu-wheels`` downloads, built without a network."""
    dist = importlib.metadata.distribution(name)
    path = folder / f"{dist.metadata['Name']}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, 'w') as z:
        for f in dist.files:
            if '__pycache__' not in f.parts and not str(f).startswith('..'):
                z.write(f.locate(), str(f))
    return path


@pytest.fixture(scope='module')
def cpu_check(tmp_path_factory):
    """One ``--device cpu`` run: (its folder, the process, report.json, its temp folder, seconds)."""
    root = tmp_path_factory.mktemp('gpu_check')
    (root / 'hide').mkdir()
    (root / 'hide' / 'sitecustomize.py').write_text(HIDE_INSTALLED)
    (root / 'wheels').mkdir()
    for name in ('yacs', 'termcolor'):
        wheel_of_installed(name, root / 'wheels')
    (root / 'tmp').mkdir()
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(root / 'hide'), str(REPO)]), TMPDIR=str(root / 'tmp'))
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', '--device', 'cpu', '--out',
                           str(root / 'out'), '--wheels', str(root / 'wheels')], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    report_path = root / 'out' / 'report.json'
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return root, proc, report, time.time() - start


def test_the_hiding_works_so_the_run_below_means_something(tmp_path):
    (tmp_path / 'sitecustomize.py').write_text(HIDE_INSTALLED)
    proc = subprocess.run([sys.executable, '-c', 'import yacs'], env=dict(_env(), PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'hidden in this test' in proc.stderr


def test_cpu_run_passes_and_leaves_only_the_report(cpu_check):
    root, proc, report, seconds = cpu_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(root / 'out')) == ['gpu_check.log', 'report.json']
    assert os.listdir(root / 'tmp') == []  # the images, the main.py runs and their checkpoints are gone
    print(f'gpu_check --device cpu took {seconds:.0f} s')


def test_every_check_has_an_ok_flag_and_only_cuda_checks_are_skipped(cpu_check):
    _, _, report, _ = cpu_check
    checks = report['checks']
    assert {c['name'] for c in checks if c['ok'] is None} == SKIPPED_HERE
    assert all(c['ok'] is True and c['status'] == 'ok' for c in checks if c['name'] not in SKIPPED_HERE)
    assert all(c['reason'] == 'needs CUDA' for c in checks if c['name'] in CUDA_ONLY)
    names = {c['name'] for c in checks}
    for expected in ('SDPA kernel, training (bfloat16)', 'eval logits, default vs math SDPA',
                     'swin-t vs timm, fp32 logits + grads', 'swinv2-t vs timm, fp32 logits + grads',
                     'resume continues bit-identically', 'main.py torchrun FSDP swin-t bf16',
                     'main.py torchrun FSDP swinv2-t bf16', 'train swin-t bf16 b2 vs timm',
                     'train swinv2-t bf16 b4 vs timm', 'main.py --throughput Swin-T fp32, b16'):
        assert expected in names
    assert any(name.startswith('main.py torchrun --compile') for name in names)


def test_the_main_py_runs_learn_in_a_gloo_group_with_the_wheels(cpu_check):
    root, _, report, _ = cpu_check
    checks = {c['name']: c for c in report['checks']}
    ddp = checks['main.py torchrun DDP swin-t bf16']['data']
    assert ddp['losses'][-1] < ddp['losses'][0] and ddp['steps'] == 40 and ddp['skipped_steps'] == 0
    for name in ('main.py torchrun DDP swin-t bf16', *(n for n in FSDP_RUNS if n not in SKIPPED_HERE)):
        data = checks[name]['data']
        assert data['process_group'] == {'backend': 'gloo', 'world_size': 1}
        assert data['losses'][-1] < data['losses'][0]
        assert all(str(root / 'wheels') in data['imports'][m] for m in ('yacs', 'termcolor'))
    assert all(str(root / 'wheels') in report['imports'][m] for m in ('yacs', 'termcolor'))
    # the sync watch told the steps apart (20 a epoch, PRINT_FREQ 5: steps 0, 5, 10, 15 and 19 log)
    assert checks['host syncs between log steps']['data']['steps'] == {'log': 10, 'between': 30}


def test_the_output_ends_with_the_table(cpu_check):
    _, proc, report, _ = cpu_check
    lines = proc.stdout.rstrip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ['check', 'status', 'figure'])
    assert len(lines) - head - 2 == len(report['checks'])  # the header, its rule, one line per check
    assert lines[head - 1].startswith('gpu_check: ') and ' 0 FAIL' in lines[head - 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is here: the check would run')
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', '--out', str(tmp_path / 'out')],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().count('\n') == 0 and 'no CUDA GPU' in proc.stdout
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- the GPU-only logic, fed by hand (no launch)


def test_the_sync_watch_counts_only_the_syncs_of_steps_between_log_steps():
    """What the worker does on a GPU with torch.cuda.set_sync_debug_mode('warn'), with the warnings raised by
    hand: a sync in a log step is by design, one in a step between is counted, with where it came from."""
    import warnings
    from types import SimpleNamespace

    from benchmarks import gpu_check

    def train_one_epoch(config, ctx, data_loader, epoch, logger, mid=None):
        for _, batch in enumerate(data_loader, start=mid.start_step if mid else 0):
            ctx.loss_fn(ctx, batch)

    def loss_fn(ctx, batch):
        if batch in (3, 5):  # step 5 is a log step (PRINT_FREQ 5), step 3 is not
            warnings.warn('called a synchronizing CUDA operation')

    watch = gpu_check.SyncWatch()
    ctx = SimpleNamespace(loss_fn=loss_fn, device=torch.device('cpu'))
    with warnings.catch_warnings():
        gpu_check._Warnings(watch.on_sync)
        watch.wrap(train_one_epoch)(SimpleNamespace(PRINT_FREQ=5), ctx, list(range(12)), 0, None)
    assert watch.counts == {'log': 1, 'between': 1}
    assert watch.steps == {'log': 4, 'between': 8}  # steps 0, 5, 10 and the last, 11, log
    assert len(watch.where) == 1 and 'tests/test_benchmarks_gpu_check.py' in watch.where[0]
    assert ctx.loss_fn is loss_fn and watch.current is None


def test_speed_rows_and_the_dense_peak_of_a_card(monkeypatch):
    from benchmarks import gpu_check
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100 PCIe')
    assert gpu_check.dense_peak_tflops(torch.device('cuda', 0)) == 756.0
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100 80GB HBM3')
    assert gpu_check.dense_peak_tflops(torch.device('cuda', 0)) == 989.0
    pair = {'ours': {'img_s': 2000.0, 'mem_gb': 20.0}, 'timm': {'img_s': 1600.0, 'mem_gb': 25.0}}
    row = gpu_check._speed_row('swin-t', 'bf16', 256, pair, 6 * 4.5e9, 989.0)
    assert row.figure == '2000 img/s, 20.0 GB, MFU 5%'  # 2000 x 27 GFLOP = 54 TFLOP/s of 989
    assert row.peer == 'timm 1600 img/s, 25.0 GB' and row.ratio == '1.25 img/s, 0.80 memory (ours/timm)'
    row = gpu_check._speed_row('swin-t', 'fp16', 256, {'ours': None, 'timm': pair['timm']}, 1.0, None)
    assert row.status == 'FAIL' and row.reason == 'does not fit (timm does)'
