"""Trackers (--log wandb|mlflow): one recorder fans the run's metrics out to TensorBoard and the trackers; a run
resumed after kill -9 continues the same tracker runs without sending a step twice."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from cli import TINY_CONFIG, start_main, write_tiny_config
from config import get_default_config, parse_command_line
from conftest import write_image_folder
from engine import TrainContext, train_one_epoch
from tracking import MARKS_FILE, RunRecorder, build_recorder, read_marks
from utils.amp import GradScalerWithNorm
from utils.errors import UserError
from utils.summary import COLUMNS, read_summary


class FakeTracker:
    """Records what a tracker is sent; ``fail_on`` names a method that raises."""

    def __init__(self, name='fake', run_id='r1', fail_on=None):
        self.name, self.run_id, self.fail_on, self.calls = name, run_id, fail_on, []

    def _record(self, method, *args):
        if method == self.fail_on:
            raise ConnectionError('tracker down')
        self.calls.append((method, *args))

    def log_step(self, metrics, step):
        self._record('log_step', dict(metrics), step)

    def log_epoch(self, row, step):
        self._record('log_epoch', dict(row), step)

    def close(self, ok):
        self._record('close', ok)


def test_a_resumed_tracker_run_is_sent_only_the_steps_and_epochs_it_lacks(tmp_path):
    tracker, marks_file = FakeTracker(), str(tmp_path / MARKS_FILE)
    recorder = RunRecorder(trackers=[tracker], marks={'fake': {'run_id': 'r1', 'step': 7, 'epoch': 0}},
                           marks_file=marks_file)
    for step in (6, 7, 8):
        recorder.log_step(step, {'train/loss': 1.0})
    recorder.log_epoch(0, 12, {}, {'epoch': 0, 'val_acc1': 50.0})
    recorder.log_epoch(1, 24, {}, {'epoch': 1, 'val_acc1': 60.0, 'ema_acc1': None})
    assert tracker.calls == [('log_step', {'train/loss': 1.0}, 8), ('log_epoch', {'epoch': 1, 'val_acc1': 60.0}, 24)]
    entry = {'run_id': 'r1', 'step': 8, 'epoch': 1}
    assert recorder.checkpoint_entry() == {'trackers': {'fake': entry}}
    assert json.loads(Path(marks_file).read_text()) == {'fake': entry}


def test_marks_of_another_tracker_run_are_not_taken():
    recorder = RunRecorder(trackers=[FakeTracker(run_id='new')], marks={'fake': {'run_id': 'old', 'step': 99}})
    recorder.log_step(0, {'train/loss': 1.0})
    assert recorder.trackers[0].calls == [('log_step', {'train/loss': 1.0}, 0)]


def test_the_marks_file_is_newer_than_the_checkpoint_only_for_the_same_run_id(tmp_path):
    path = tmp_path / MARKS_FILE
    path.write_text(json.dumps({'wandb': {'run_id': 'a', 'step': 20, 'epoch': 1},
                                'mlflow': {'run_id': 'other', 'step': 50, 'epoch': 3}}))
    saved = {'wandb': {'run_id': 'a', 'step': 11, 'epoch': 1}, 'mlflow': {'run_id': 'b', 'step': 11, 'epoch': 1}}
    assert read_marks(saved, str(path)) == {'wandb': {'run_id': 'a', 'step': 20, 'epoch': 1},
                                            'mlflow': {'run_id': 'b', 'step': 11, 'epoch': 1}}
    assert read_marks(None, str(path)) == {}  # no checkpoint: new tracker runs


def test_a_failing_tracker_is_switched_off_with_one_warning_and_the_others_go_on(caplog):
    down, up = FakeTracker('down', fail_on='log_step'), FakeTracker('up')
    recorder = RunRecorder(trackers=[down, up], logger=logging.getLogger('t'))
    with caplog.at_level(logging.WARNING, logger='t'):
        recorder.log_step(0, {'train/loss': 1.0})
        recorder.log_step(1, {'train/loss': 0.5})
    assert [m for m in caplog.messages if 'down' in m] == [
        '--log down: ConnectionError: tracker down; down is off for the rest of this run']
    assert [c[-1] for c in up.calls] == [0, 1] and recorder.trackers == [up]


def test_log_is_repeatable_or_a_comma_list_and_refuses_unknown_trackers(tmp_path):
    cfg = write_tiny_config(tmp_path)
    _, config = parse_command_line(['--cfg', str(cfg), '--log', 'wandb', '--log', 'mlflow,wandb'])
    assert config.LOG.BACKENDS == ['wandb', 'mlflow']
    assert parse_command_line(['--cfg', str(cfg)])[1].LOG.BACKENDS == []
    with pytest.raises(UserError, match=r"LOG.BACKENDS \(--log\): 'neptune'"):
        parse_command_line(['--cfg', str(cfg), '--log', 'neptune'])


@pytest.mark.parametrize('name, install', [('wandb', 'pip install wandb'), ('mlflow', 'pip install mlflow-skinny')])
def test_a_missing_tracker_package_is_one_line_saying_what_to_install(tmp_path, monkeypatch, name, install):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    _, config = parse_command_line(['--cfg', str(write_tiny_config(tmp_path)), '--output', str(tmp_path),
                                    '--log', name])
    with pytest.raises(UserError, match=f'--log {name} .*needs the {name} package.*{install}'):
        build_recorder(config, 0, None, logging.getLogger('t'))
    assert build_recorder(config, 1, None, logging.getLogger('t')).trackers == []  # other ranks log nothing


def test_the_log_steps_reach_the_recorder_and_the_official_line_keeps_its_format(caplog):
    """#30: log_train_step takes the epoch's progress object; the line is byte for byte the official format."""
    torch.manual_seed(0)
    model, tracker = torch.nn.Linear(3, 3), FakeTracker()
    ctx = TrainContext(model=model, criterion=torch.nn.CrossEntropyLoss(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.05),
                       lr_scheduler=type('S', (), {'step_update': lambda self, n: None})(),
                       loss_scaler=GradScalerWithNorm(enabled=False), device=torch.device('cpu'), amp_dtype=None,
                       recorder=RunRecorder(trackers=[tracker]))
    config = get_default_config()
    config.PRINT_FREQ, config.TRAIN.EPOCHS = 2, 4
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])) for _ in range(5)]
    with caplog.at_level(logging.INFO, logger='t'):
        train_one_epoch(config, ctx, batches, 1, logging.getLogger('t'))
    lines = [m for m in caplog.messages if m.startswith('Train:')]
    n = r'-?\d+\.\d{4}'
    official = (r'Train: \[1/4\]\[IDX/5\]\teta \d+:\d\d:\d\d lr 0\.100000\t wd 0\.0500\t'
                rf'time {n} \({n}\)\tloss {n} \({n}\)\tgrad_norm {n} \({n}\)\t'
                r'loss_scale 1\.0000 \(1\.0000\)\tmem \d+MB')
    matches = [re.fullmatch(official.replace('IDX', str(i)), line) for i, line in zip((0, 2, 4), lines)]
    assert len(lines) == 3 and all(matches), lines
    assert [(c[2], sorted(c[1])) for c in tracker.calls] == [
        (step, ['train/grad_norm', 'train/loss', 'train/lr']) for step in (5, 7, 9)]


# ------------------------------------------------------------------------- real trackers, one killed run

def _wandb_history(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of every offline W&B run under ``run_dir``, oldest first: the .wandb files are
    LevelDB-style logs of protobuf records (32 KiB blocks, 7-byte record headers after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    runs = []
    for path in sorted(glob.glob(str(run_dir / 'wandb' / 'offline-run-*' / 'run-*.wandb'))):
        data, pos, pending, rows = Path(path).read_bytes(), 7, b'', []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
            if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
                break
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b''
                if record.WhichOneof('record_type') == 'history':
                    rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
        runs.append((re.search(r'run-(\w+)\.wandb$', path).group(1), rows))
    return runs


def _wandb_flushed(run_dir: Path, step: int) -> bool:
    """Whether W&B's offline file holds epoch 0's row and a training step at or past ``step``."""
    rows = [row for _, history in _wandb_history(run_dir) for row in history]
    return any('val_acc1' in row for row in rows) and any(row.get('_step', -1) >= step and 'train/loss' in row
                                                          for row in rows)


# batches per epoch: 48 images in batches of 4. The kill lands after step STEPS + 2 reached W&B's file: the 10 steps
# left in epoch 1 keep it inside that epoch on a busy machine (W&B loses what it had not written when killed).
STEPS = 12


def _wandb_epochs(run_dir: Path) -> set:
    """The epochs whose summary row W&B's offline files hold."""
    return {row['epoch'] for _, history in _wandb_history(run_dir) for row in history if 'epoch' in row}


@pytest.fixture(scope='module')
def tracked(tmp_path_factory):
    """A 3-epoch run logging to W&B (offline) and MLflow (file store), killed (SIGKILL, the whole process group)
    in epoch 1 after its tracker had received steps past the epoch-0 checkpoint, then auto-resumed to the end."""
    pytest.importorskip('wandb')
    pytest.importorskip('mlflow')
    root = tmp_path_factory.mktemp('tracked')
    data = write_image_folder(root / 'data', num_classes=3, train_per_class=16, val_per_class=2)
    cfg = write_tiny_config(root, TINY_CONFIG.replace('EPOCHS: 2', 'EPOCHS: 3').replace('PRINT_FREQ: 2',
                                                                                        'PRINT_FREQ: 1'))
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(root / 'out'), '--log', 'wandb,mlflow']
    run_dir = root / 'out' / 'tiny_test' / 'default'
    with pytest.MonkeyPatch.context() as env:
        env.setenv('WANDB_MODE', 'offline')
        env.setenv('WANDB_SILENT', 'true')
        env.setenv('WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL', '0.05')  # W&B writes its file every 15 s by default
        env.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
        env.delenv('MLFLOW_TRACKING_URI', raising=False)
        proc = start_main(args, root, new_group=True)
        deadline = time.time() + 240
        while not _wandb_flushed(run_dir, STEPS + 2):
            assert proc.poll() is None, f'the run ended before the kill: {proc.stderr.read()[-2000:]}'
            assert time.time() < deadline, 'timed out waiting for the run'
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = _wandb_history(run_dir)
        assert not (run_dir / 'ckpt_epoch_1.pth').exists()  # killed inside epoch 1
        env.chdir(root)
        env.setenv('WANDB_CONSOLE', 'off')  # in this process: W&B leaves pytest's output alone
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the launched run (OMP_NUM_THREADS=1): two threads only fight on busy cores
        try:
            assert main.run(args) == 0  # the restart, in process (it saves a Python start and the imports)
        finally:
            torch.set_num_threads(threads)
        deadline = time.time() + 60  # W&B's service writes its file after the run has finished, in its own time
        while not _wandb_epochs(run_dir) >= {0, 1, 2} and time.time() < deadline:
            time.sleep(0.1)
        yield run_dir, killed


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri='file:' + str(run_dir / 'mlruns'))
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_wandb_offline_and_mlflow_file_store_record_the_epoch_rows_of_summary_csv(tracked):
    run_dir, _ = tracked
    summary = read_summary(str(run_dir / 'summary.csv'))
    assert [int(r['epoch']) for r in summary] == [0, 1, 2]
    wandb_rows = {row['epoch']: row for _, history in _wandb_history(run_dir) for row in history if 'epoch' in row}
    client, run = _mlflow_run(run_dir)
    for expected in summary:
        epoch = int(expected['epoch'])
        for column in COLUMNS:
            if expected[column] == '':
                assert column not in wandb_rows[epoch], column
                continue
            assert wandb_rows[epoch][column] == pytest.approx(float(expected[column]), rel=1e-5), (epoch, column)
            if column != 'epoch':
                history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, column)}
                assert history[epoch] == pytest.approx(float(expected[column]), rel=1e-5), (epoch, column)
    assert run.data.params['MODEL.NAME'] == 'tiny_test' and run.data.params['TRAIN.EPOCHS'] == '3'


def test_after_kill_9_and_auto_resume_the_same_tracker_runs_have_no_duplicated_steps(tracked):
    run_dir, killed = tracked
    runs = _wandb_history(run_dir)
    assert len(killed) == 1 and len(runs) == 2 and runs[0][0] == runs[1][0] == killed[0][0]  # one W&B run id
    before_kill = [row['_step'] for row in killed[0][1] if 'train/loss' in row]
    assert max(before_kill) >= STEPS + 2  # steps past the epoch-0 checkpoint the resumed run trains again
    steps = [row['_step'] for _, history in runs for row in history if 'train/loss' in row]
    assert len(steps) == len(set(steps)) and max(steps) == 3 * STEPS - 1, steps
    assert all(a < b for a, b in zip(steps, steps[1:]))  # one axis, increasing across the restart
    client, run = _mlflow_run(run_dir)
    for name in ('train/loss', 'train/lr', 'train/grad_norm'):
        logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert logged == list(range(3 * STEPS)), (name, logged)  # MLflow writes at once: every step, once
    assert run.info.status == 'FINISHED'


def test_checkpoints_keep_the_tracker_run_ids_beside_the_official_entries(tracked):
    run_dir, killed = tracked
    ckpt = torch.load(run_dir / 'ckpt_epoch_2.pth', weights_only=True)
    assert set(ckpt) == {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config',
                         'best_score', 'trackers'}
    _, run = _mlflow_run(run_dir)
    assert ckpt['trackers']['wandb']['run_id'] == killed[0][0]
    assert ckpt['trackers']['mlflow']['run_id'] == run.info.run_id
