"""A bad launch gets one clear line naming the culprit, exit status 2 and no traceback.

Most cases call ``main.run`` in this process (fast); the first runs ``python main.py`` for real.
"""
from __future__ import annotations

import subprocess

import pytest

import main
from cli import run_main, write_tiny_config


class _InProcess:
    """``main.run(argv)`` with its exit status and stderr, shaped like a CompletedProcess."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, argv, cwd=None):
        self.capsys.readouterr()
        code = main.run([str(a) for a in argv])
        return subprocess.CompletedProcess(argv, code, '', self.capsys.readouterr().err)


@pytest.fixture
def run_inprocess(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    return _InProcess(capsys)


def _fails_cleanly(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_data_path_is_named(tmp_path):
    cfg = write_tiny_config(tmp_path)
    result = run_main(['--cfg', str(cfg), '--data-path', str(tmp_path / 'nowhere')], cwd=tmp_path)
    _fails_cleanly(result, 'nowhere')


def test_missing_config_file_is_named(tmp_path, run_inprocess):
    _fails_cleanly(run_inprocess(['--cfg', 'no_such.yaml', '--data-path', '.'], cwd=tmp_path), 'no_such.yaml')


@pytest.mark.parametrize('opts, needle', [(['TRAIN.NO_SUCH_KEY', '1'], 'TRAIN.NO_SUCH_KEY'),
                                          (['TRAIN.EPOCHS', 'many'], 'TRAIN.EPOCHS')])
def test_bad_opts_are_named(tmp_path, image_folder, opts, needle, run_inprocess):
    cfg = write_tiny_config(tmp_path)
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--opts', *opts], cwd=tmp_path)
    _fails_cleanly(result, needle)


def test_unknown_key_in_yaml_is_named(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path, 'MODEL:\n  SWIN:\n    EMBED_DIMS: 16\n')
    _fails_cleanly(run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder)], cwd=tmp_path),
                   'MODEL.SWIN.EMBED_DIMS')


def test_yaml_that_does_not_parse_is_named(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path, 'MODEL: [unclosed\n')
    _fails_cleanly(run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder)], cwd=tmp_path), 'tiny.yaml')


def test_unwritable_output_is_named(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path)
    blocker = tmp_path / 'file_not_dir'
    blocker.write_text('x')
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(blocker)], cwd=tmp_path)
    _fails_cleanly(result, str(blocker))


def test_eval_without_weights_is_an_error(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path)
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--eval', '--output',
                       str(tmp_path / 'o')], cwd=tmp_path)
    _fails_cleanly(result, '--resume')


def _train_once(tmp_path, image_folder, text=None):
    cfg = write_tiny_config(tmp_path) if text is None else write_tiny_config(tmp_path, text)
    out = tmp_path / 'trained'
    result = run_main(['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(out),
                       '--opts', 'TRAIN.EPOCHS', '1'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return cfg, out / 'tiny_test' / 'default' / 'ckpt_epoch_0.pth'


def test_resume_from_a_file_that_is_not_a_checkpoint_is_named(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'definitely not a checkpoint')
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--resume', str(junk),
                       '--output', str(tmp_path / 'o')], cwd=tmp_path)
    _fails_cleanly(result, 'junk.pth')


def test_resume_from_another_architecture_names_keys_and_shapes(tmp_path, image_folder, run_inprocess):
    cfg, ckpt = _train_once(tmp_path, image_folder)
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--resume', str(ckpt), '--eval',
                       '--opts', 'MODEL.SWIN.EMBED_DIM', '32', '--output', str(tmp_path / 'o')], cwd=tmp_path)
    _fails_cleanly(result, 'ckpt_epoch_0.pth', 'patch_embed.proj.weight', '[16, 3, 4, 4]', '[32, 3, 4, 4]')


def test_batch_size_larger_than_the_data_set_is_named(tmp_path, image_folder, run_inprocess):
    cfg = write_tiny_config(tmp_path)
    result = run_inprocess(['--cfg', str(cfg), '--data-path', str(image_folder), '--batch-size', '64',
                       '--output', str(tmp_path / 'o')], cwd=tmp_path)
    _fails_cleanly(result, 'DATA.BATCH_SIZE')


def test_a_failed_launch_keeps_earlier_checkpoints(tmp_path, image_folder):
    cfg, ckpt = _train_once(tmp_path, image_folder)
    before = ckpt.read_bytes()
    result = run_main(['--cfg', str(cfg), '--data-path', str(tmp_path / 'gone'), '--output',
                       str(tmp_path / 'trained')], cwd=tmp_path)
    _fails_cleanly(result, 'gone')
    assert ckpt.read_bytes() == before
