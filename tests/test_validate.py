"""validate.py: a folder or glob of checkpoints evaluated as --eval does, sorted by Acc@1, written as CSV."""
from __future__ import annotations

import csv
import re

import pytest

from cli import run_main, torchrun, write_tiny_config
from conftest import write_image_folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Three epoch checkpoints of a tiny run (11 validation images: no world size of 2 divides them)."""
    root = tmp_path_factory.mktemp('validate')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=8, val_per_class=4)
    (next((data / 'val' / 'class_2').iterdir())).unlink()
    cfg = write_tiny_config(root)
    result = run_main(['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'out'),
                       '--opts', 'TRAIN.EPOCHS', '3', 'TRAIN.SAVE_BEST', 'False'], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / 'out' / 'tiny_test' / 'default'
    accs = [float(a) for a in re.findall(r' \* Acc@1 ([\d.]+)', (out / 'log_rank0.txt').read_text())]
    return root, cfg, data, out, accs


def _validate(root, cfg, data, spec, results, launch=None, extra=()):
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'eval'), '--checkpoints', str(spec),
            '--results-file', str(results), *extra]
    if launch:
        return torchrun(launch, args, cwd=root, script='validate.py')
    return run_main(args, cwd=root, script='validate.py')


def _rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def one_process(trained):
    """validate.py in one process over the run's folder: (its output, its CSV rows)."""
    root, cfg, data, out, _ = trained
    result = _validate(root, cfg, data, out, root / 'one.csv')
    assert result.returncode == 0, result.stderr[-3000:]
    return result, _rows(root / 'one.csv')


def test_a_folder_of_three_checkpoints_gives_a_table_sorted_by_acc1(trained, one_process):
    accs = trained[-1]
    result, rows = one_process
    assert sorted(int(r['epoch']) for r in rows) == [0, 1, 2]
    acc1 = [float(r['acc1']) for r in rows]
    assert acc1 == sorted(acc1, reverse=True)
    for r in rows:  # each checkpoint scores what the run measured after that epoch
        assert float(r['acc1']) == pytest.approx(accs[int(r['epoch'])], abs=1e-3)
        assert r['checkpoint'] in result.stdout and r['error'] == ''
    assert any(line.startswith('checkpoint') and 'Acc@1' in line for line in result.stdout.splitlines())


def test_two_processes_give_the_same_figures_as_one(trained, one_process):
    root, cfg, data, out, _ = trained
    two = _validate(root, cfg, data, str(out / 'ckpt_epoch_*.pth'), root / 'two.csv',
                    launch=['--standalone', '--nproc_per_node=2'])
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    single, double = one_process[1], _rows(root / 'two.csv')
    assert [(r['checkpoint'], r['acc1'], r['acc5']) for r in single] == [(r['checkpoint'], r['acc1'], r['acc5'])
                                                                          for r in double]
    # the loss is a float sum whose order follows the batches: equal to rounding
    assert [float(r['loss']) for r in single] == pytest.approx([float(r['loss']) for r in double], rel=1e-5)


def test_an_unreadable_checkpoint_gets_a_failed_row_and_exit_1_after_the_others(trained, tmp_path):
    root, cfg, data, out, _ = trained
    folder = tmp_path / 'ckpts'
    folder.mkdir()
    (folder / 'good.pth').write_bytes((out / 'ckpt_epoch_1.pth').read_bytes())
    (folder / 'broken.pth').write_bytes(b'not a checkpoint')
    result = _validate(root, cfg, data, folder, tmp_path / 'r.csv')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: 1 of 2 checkpoints could not be evaluated')
    rows = _rows(tmp_path / 'r.csv')
    assert [r['checkpoint'].split('/')[-1] for r in rows] == ['good.pth', 'broken.pth']
    assert rows[0]['error'] == '' and 'not a PyTorch checkpoint' in rows[1]['error']


def test_no_checkpoints_there_is_one_line_and_exit_2(tmp_path, capsys):
    from validate import cli
    cfg = write_tiny_config(tmp_path)
    status = cli(['--cfg', str(cfg), '--data-path', str(tmp_path), '--output', str(tmp_path / 'eval'),
                  '--checkpoints', str(tmp_path / 'nothing-*.pth'), '--results-file', str(tmp_path / 'r.csv')])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and 'no checkpoint files' in err
    assert not (tmp_path / 'r.csv').exists()


def test_use_ema_loads_the_ema_weights_and_names_a_file_without_them(tmp_path):
    import torch
    from utils.checkpoint import load_weights
    from utils.errors import UserError
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save({'model': model.state_dict(), 'model_ema': ema.state_dict(), 'epoch': 4}, tmp_path / 'e.pth')
    target = torch.nn.Linear(3, 2)
    assert load_weights(str(tmp_path / 'e.pth'), target, use_ema=True) == {'epoch': 4}
    assert torch.equal(target.weight, ema.weight)
    torch.save({'model': model.state_dict()}, tmp_path / 'plain.pth')
    with pytest.raises(UserError, match="plain.pth: no 'model_ema' entry"):
        load_weights(str(tmp_path / 'plain.pth'), target, use_ema=True)
