"""utils/sharding.py on 2 gloo processes: FSDP2 trains as DDP does, holds half per rank, and its sharded
checkpoints read back on 2 or 1 process and consolidate to the gathered single file."""
from __future__ import annotations

import json

import torch

from cli import REPO, run_main, torchrun


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


def test_fsdp_matches_ddp_and_its_sharded_checkpoint_reshards_and_consolidates(tmp_path):
    worker = str(REPO / 'tests' / 'sharding_worker.py')
    launch = ['--standalone', '--nproc_per_node=2']
    first = _result(torchrun(launch, ['compare', str(tmp_path)], cwd=tmp_path, script=worker))
    assert len(first['fsdp']) == 20
    assert max(abs(a - b) for a, b in zip(first['ddp'], first['fsdp'])) < 1e-5  # fp32: the same training
    whole = torch.load(tmp_path / 'gathered.pth', weights_only=True)
    full_bytes = sum(t.numel() * t.element_size() for t in whole['model'].values())
    assert abs(first['held']['parameters'] / full_bytes - 0.5) < 0.05  # each rank holds about half
    on_two = _result(torchrun(launch, ['resume', str(tmp_path)], cwd=tmp_path, script=worker))
    on_one = _result(run_main(['resume', str(tmp_path)], cwd=tmp_path, script=worker))
    assert on_two['max_diff'] == 0.0 == on_one['max_diff'] and on_two['epoch'] == 0
    assert abs(on_two['next'][0] - on_one['next'][0]) < 1.0  # both train on from the same weights
    consolidated = tmp_path / 'one.pth'
    done = run_main([str(tmp_path / 'ckpt_epoch_0.dcp'), str(consolidated)], cwd=tmp_path,
                    script='tools/consolidate.py')
    assert done.returncode == 0, done.stderr[-2000:]
    single = torch.load(consolidated, weights_only=True)
    assert set(single['model']) == set(whole['model'])
    assert all(torch.equal(single['model'][k], v) for k, v in whole['model'].items())
    assert all(torch.equal(single['model_ema'][k], v) for k, v in whole['model_ema'].items())
    assert all(torch.equal(single['optimizer']['state'][n]['exp_avg_sq'], s['exp_avg_sq'])
               for n, s in whole['optimizer']['state'].items())
    assert single['epoch'] == 0
