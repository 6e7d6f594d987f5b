"""TRAIN.SHARDING fsdp through main.py on 2 gloo processes: it trains as ddp does, its gathered checkpoint is
the official single file, and its sharded checkpoints consolidate, resume on 1 process and, after SIGTERM
to every process mid-epoch, on 2 bit-identically."""
from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest
import torch
import yaml

from cli import TINY_CONFIG, run_main, signal_whole_job, start_torchrun, torchrun, write_tiny_config
from conftest import needs_cpu_fsdp, write_image_folder

TWO = ['--standalone', '--nproc_per_node=2']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """84 training images: 10 steps per epoch on 2 ranks of batch 4, so 2 epochs are 20 steps."""
    root = tmp_path_factory.mktemp('sharding')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=28, val_per_class=4)
    return root, write_tiny_config(root), data


def _args(setup, name, opts, flags=()):
    root, cfg, data = setup
    return ['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / name), '--disable_amp', *flags,
            '--opts', 'TRAIN.EPOCHS', '2', 'TRAIN.EMA.ENABLE', 'True', *opts]


def _train(setup, name, *opts, launch=TWO, flags=()):
    root = setup[0]
    args = _args(setup, name, opts, flags)
    result = torchrun(launch, args, cwd=root) if launch else run_main(args, cwd=root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root / name / 'tiny_test' / 'default', result.stdout + result.stderr


def _train_side_by_side(setup, runs: dict, flags=()) -> dict:
    """Several 2-process runs at once (their start-up, mostly imports, overlaps): {name: (folder, output)}."""
    root = setup[0]
    procs = {name: start_torchrun(TWO, _args(setup, name, opts, flags), root) for name, opts in runs.items()}
    done = {}
    for name, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-4000:]
        done[name] = (root / name / 'tiny_test' / 'default', output)
    return done


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _acc1s(text: str) -> list[float]:
    return [float(a) for a in re.findall(r' \* Acc@1 ([\d.]+)', text)]


@pytest.fixture(scope='module')
def ddp_and_fsdp(setup):
    runs = _train_side_by_side(setup, {'ddp': (), 'fsdp': ('TRAIN.SHARDING', 'fsdp')})
    (ddp, _), (fsdp, log) = runs['ddp'], runs['fsdp']
    return ddp, fsdp, log


@needs_cpu_fsdp
def test_fsdp_trains_20_steps_as_ddp_does_and_logs_what_each_rank_holds(ddp_and_fsdp):
    ddp, fsdp, log = ddp_and_fsdp
    a = torch.load(ddp / 'ckpt_epoch_1.pth', weights_only=True)
    b = torch.load(fsdp / 'ckpt_epoch_1.pth', weights_only=True)
    assert _max_diff(a['model'], b['model']) < 1e-5 and _max_diff(a['model_ema'], b['model_ema']) < 1e-5
    rows = [line.split(',') for line in (fsdp / 'summary.csv').read_text().splitlines()[1:]]
    ddp_rows = [line.split(',') for line in (ddp / 'summary.csv').read_text().splitlines()[1:]]
    assert [float(r[2]) for r in rows] == pytest.approx([float(r[2]) for r in ddp_rows], abs=1e-5)  # train loss
    held = [int(n) for n in re.findall(r'rank 1 holds parameters (\d+) bytes',
                                       (fsdp / 'log_rank1.txt').read_text())]
    full = sum(t.numel() * t.element_size() for t in b['model'].values() if t.is_floating_point())
    assert held and 0.4 < held[0] / full < 0.6  # half of the weights each


@needs_cpu_fsdp
def test_the_gathered_checkpoint_is_the_official_file_and_evaluates_in_one_plain_process(ddp_and_fsdp, setup):
    root, cfg, data = setup
    ddp, fsdp, log = ddp_and_fsdp
    ckpt = torch.load(fsdp / 'ckpt_epoch_1.pth', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config'} <= set(ckpt)
    result = run_main(['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'eval'), '--eval',
                       '--resume', str(fsdp / 'ckpt_epoch_1.pth'), '--disable_amp'], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_log = (ddp / 'log_rank0.txt').read_text()
    # the last model validations of the fsdp and ddp runs
    assert _acc1s(result.stdout + result.stderr)[-1] == _acc1s(log)[-2] == _acc1s(ddp_log)[-2]


@needs_cpu_fsdp
def test_fsdp_with_accumulation_and_activation_checkpointing_trains_as_ddp(setup):
    flags = ['--accumulation-steps', '2', '--use-checkpoint']
    runs = _train_side_by_side(setup, {'ddp_acc': ('TRAIN.EPOCHS', '1'),
                                       'fsdp_acc': ('TRAIN.EPOCHS', '1', 'TRAIN.SHARDING', 'fsdp')}, flags=flags)
    ddp, fsdp = runs['ddp_acc'][0], runs['fsdp_acc'][0]
    a = torch.load(ddp / 'ckpt_epoch_0.pth', weights_only=True)['model']
    b = torch.load(fsdp / 'ckpt_epoch_0.pth', weights_only=True)['model']
    assert _max_diff(a, b) < 1e-5


@pytest.fixture(scope='module')
def stopped(setup):
    """A sharded-checkpoint run stopped by SIGTERM to every process in epoch 1, then run again to its end."""
    root, cfg, data = setup
    out = root / 'stopped'
    run_dir = out / 'tiny_test' / 'default'
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(out), '--disable_amp', '--opts',
            'TRAIN.EPOCHS', '2', 'TRAIN.EMA.ENABLE', 'True', 'TRAIN.SHARDING', 'fsdp', 'TRAIN.SHARDED_CKPT', 'True',
            'TRAIN.SAVE_STEPS', '1']
    proc = start_torchrun(TWO, args, root, new_group=True)
    try:
        deadline = time.time() + 240
        while not list(run_dir.glob('ckpt_epoch_1_step_*.dcp')):
            assert proc.poll() is None and time.time() < deadline, 'the run ended before a step checkpoint'
            time.sleep(0.05)
        signal_whole_job(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stop_logs = [(run_dir / f'log_rank{rank}.txt').read_text() for rank in (0, 1)]
    after_stop = sorted(p.name for p in run_dir.iterdir())
    again = torchrun(TWO, args, cwd=root)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    return run_dir, stop_logs, after_stop, again.stdout + again.stderr


def _consolidated(folder, out):
    done = run_main([str(folder), str(out)], cwd=out.parent, script='tools/consolidate.py')
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out, weights_only=True)


@needs_cpu_fsdp
def test_sigterm_to_every_process_mid_epoch_writes_a_sharded_step_checkpoint_and_the_rerun_ends_identical(
        ddp_and_fsdp, stopped, tmp_path):
    _, gathered, _ = ddp_and_fsdp
    run_dir, stop_logs, after_stop, rerun = stopped
    assert all('stopped by a signal after writing a checkpoint' in log for log in stop_logs)
    assert 'ckpt_epoch_1.dcp' not in after_stop and any(re.match(r'ckpt_epoch_1_step_\d+\.dcp', n) for n in after_stop)
    assert re.search(r'Resuming from \S+ckpt_epoch_1_step_\d+\.dcp', rerun)
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == '.dcp') == [
        'ckpt_epoch_0.dcp', 'ckpt_epoch_1.dcp', 'model_best.dcp']  # the step folders superseded
    # consolidated, the sharded checkpoint is exactly the file an uninterrupted gathered run wrote
    single = _consolidated(run_dir / 'ckpt_epoch_1.dcp', tmp_path / 'one.pth')
    whole = torch.load(gathered / 'ckpt_epoch_1.pth', weights_only=True)
    assert _max_diff(single['model'], whole['model']) == 0.0 and single['epoch'] == 1
    assert _max_diff(single['model_ema'], whole['model_ema']) == 0.0
    assert all(torch.equal(single['optimizer']['state'][n]['exp_avg_sq'], st['exp_avg_sq'])
               for n, st in whole['optimizer']['state'].items())


@needs_cpu_fsdp
def test_a_sharded_checkpoint_resumes_on_1_process(stopped, setup):
    root = setup[0]
    run_dir, stop_logs, _, _ = stopped
    one = root / 'one'
    shutil.copytree(run_dir.parent.parent, one)
    shutil.rmtree(one / 'tiny_test' / 'default' / 'ckpt_epoch_1.dcp')
    _, text = _train(setup, 'one', 'TRAIN.SHARDING', 'fsdp', 'TRAIN.SHARDED_CKPT', 'True', launch=None)
    assert 'nothing to shard' in text and 'ckpt_epoch_0.dcp' in text and 'Train: [1/2]' in text
    # the shards, read whole, score what the 2-process run measured after epoch 0
    assert _acc1s(text.split('Resuming from')[-1])[0] == _acc1s(stop_logs[0])[0]


def test_sharded_checkpoints_without_fsdp_are_a_config_error():
    from types import SimpleNamespace
    from config import get_config
    from utils.errors import UserError
    with pytest.raises(UserError, match='TRAIN.SHARDED_CKPT True needs TRAIN.SHARDING fsdp'):
        get_config(SimpleNamespace(cfg=None, opts=['TRAIN.SHARDED_CKPT', 'True']))
    config = get_config(SimpleNamespace(cfg=None, opts=['TRAIN.SHARDED_CKPT', 'True', 'TRAIN.SHARDING', 'fsdp']))
    assert config.TRAIN.SHARDED_CKPT is True and config.TRAIN.SHARDING == 'fsdp'


def _v2_config() -> str:
    """The tiny recipe of tests/cli.py with a Swin V2 model, sharded."""
    recipe = yaml.safe_load(TINY_CONFIG)
    recipe['MODEL'] = {'TYPE': 'swinv2', 'NAME': 'tiny_v2', 'NUM_CLASSES': 3,
                       'SWINV2': {'EMBED_DIM': 16, 'DEPTHS': [1, 1], 'NUM_HEADS': [1, 2], 'WINDOW_SIZE': 4}}
    recipe['TRAIN'].update(EPOCHS=1, WARMUP_EPOCHS=0, SHARDING='fsdp')
    return yaml.safe_dump(recipe)


@needs_cpu_fsdp
def test_fsdp_trains_resumes_and_evaluates_swin_v2_in_bf16(setup):
    """Under FSDP's bf16 policy the position-bias MLP is an fp32 unit of its own: it used to be cast to bf16 and
    fail against the fp32 coordinates table ('mat1 and mat2 must have the same dtype')."""
    root, _, data = setup
    cfg = root / 'tiny_v2.yaml'
    cfg.write_text(_v2_config())
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'v2'), '--amp-dtype', 'bfloat16']
    first = torchrun(TWO, args, cwd=root)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    again = torchrun(TWO, [*args, '--opts', 'TRAIN.EPOCHS', '2'], cwd=root)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-4000:]
    assert 'ckpt_epoch_0.pth' in text and 'Train: [1/2]' in text and 'Train: [0/2]' not in text
    ckpt = root / 'v2' / 'tiny_v2' / 'default' / 'ckpt_epoch_1.pth'
    evaluated = run_main(['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'v2_eval'), '--eval',
                          '--resume', str(ckpt), '--amp-dtype', 'bfloat16'], cwd=root)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert _acc1s(evaluated.stdout)[-1] == _acc1s(text)[-1]
