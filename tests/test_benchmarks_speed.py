"""benchmarks.speed runs end to end (tiny models): the two labelled comparisons. (benchmarks.gpu_check:
tests/test_benchmarks_gpu_check.py.)"""
from __future__ import annotations

import torch

from benchmarks import speed

TINY = dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))


def test_speed_prints_both_comparisons_with_a_ratio_per_model(monkeypatch):
    monkeypatch.setattr(speed, 'START_METHOD', 'forkserver')
    schedule = speed.Schedule(['infer-fp32', 'train-fp32'], {'infer': 2, 'train': 2}, rounds=1, iters=1, warmup=0)
    rows = []
    for comparison in ('model', 'framework'):
        setup = speed.Setup(device=torch.device('cpu'), threads=1, comparison=comparison, overrides=TINY)
        rows += speed.run(setup, schedule, names=['ours', 'ours-ref', 'timm'])
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
