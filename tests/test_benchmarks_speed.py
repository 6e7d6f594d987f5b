"""benchmarks.speed and benchmarks.gpu_check run end to end (tiny models): the two labelled comparisons,
and the GPU check script on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import speed
from tests.cli import REPO, _env

TINY = dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))


def test_speed_prints_both_comparisons_with_a_ratio_per_model():
    rows = []
    for comparison in ('model', 'framework'):
        rows += speed.run(comparison, ['infer-fp32', 'train-fp32'], {'infer': 2, 'train': 2}, rounds=1, iters=1,
                          warmup=0, device=torch.device('cpu'), names=['ours', 'ours-ref', 'timm'], overrides=TINY)
    assert {(r['comparison'], r['mode'], r['model']) for r in rows} == {
        (c, m, n) for c in ('model', 'framework') for m in ('infer-fp32', 'train-fp32')
        for n in ('ours', 'ours-ref', 'timm')}
    assert all(r['img_s'] > 0 for r in rows)
    text = speed.format_rows(rows)
    assert text.count('== model code alone') == 1 and text.count('== framework defaults') == 1
    assert len([line for line in text.splitlines() if line.split()[:2] == ['train-fp32', 'timm']]) == 2


def test_the_ours_model_is_the_cpu_swap_and_ours_ref_the_reference():
    from models.cpu.modules import WindowAttention
    ours = speed.build_model('ours', device=torch.device('cpu'), **TINY)
    ref = speed.build_model('ours-ref', device=torch.device('cpu'), **TINY)
    assert type(ours.layers[0].blocks[0].attn) is WindowAttention
    assert type(ref.layers[0].blocks[0].attn) is not WindowAttention


def _gpu_check(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is here: the check would run')
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    proc = _gpu_check()
    assert proc.returncode == 0 and proc.stdout.strip().count('\n') == 0 and 'no CUDA GPU' in proc.stdout


def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    proc = _gpu_check('--device', 'cpu', '--out', str(tmp_path), '--compile-backend', 'aot_eager')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    checks = {c['name']: c for c in report['checks']}
    assert all(c['ok'] for c in checks.values())
    rows = checks['training and evaluation steps vs timm']['rows']
    assert {(r['arch'], r['model']) for r in rows} == {(a, m) for a in ('swin-t', 'swinv2-t') for m in ('ours', 'timm')}
    assert {r['mode'] for r in rows} >= {'train-bf16', 'infer-bf16'}
    run = checks['main.py, 1 process, bfloat16']
    assert run['optimizer_steps'] == 10 and run['skipped_steps'] == 0 and run['final_acc1'] is not None
