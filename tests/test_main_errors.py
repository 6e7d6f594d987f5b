"""A bad launch gets one clear line naming the culprit, exit status 2 and no traceback."""
from __future__ import annotations

import pytest

from cli import run_main, write_tiny_config


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


def test_missing_config_file_is_named(tmp_path):
    _fails_cleanly(run_main(['--cfg', 'no_such.yaml', '--data-path', '.'], cwd=tmp_path), 'no_such.yaml')


@pytest.mark.parametrize('opts, needle', [(['TRAIN.NO_SUCH_KEY', '1'], 'TRAIN.NO_SUCH_KEY'),
                                          (['TRAIN.EPOCHS', 'many'], 'TRAIN.EPOCHS')])
def test_bad_opts_are_named(tmp_path, image_folder, opts, needle):
    cfg = write_tiny_config(tmp_path)
    result = run_main(['--cfg', str(cfg), '--data-path', str(image_folder), '--opts', *opts], cwd=tmp_path)
    _fails_cleanly(result, needle)


def test_unknown_key_in_yaml_is_named(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path, 'MODEL:\n  SWIN:\n    EMBED_DIMS: 16\n')
    _fails_cleanly(run_main(['--cfg', str(cfg), '--data-path', str(image_folder)], cwd=tmp_path),
                   'MODEL.SWIN.EMBED_DIMS')


def test_yaml_that_does_not_parse_is_named(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path, 'MODEL: [unclosed\n')
    _fails_cleanly(run_main(['--cfg', str(cfg), '--data-path', str(image_folder)], cwd=tmp_path), 'tiny.yaml')


def test_unwritable_output_is_named(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    blocker = tmp_path / 'file_not_dir'
    blocker.write_text('x')
    result = run_main(['--cfg', str(cfg), '--data-path', str(image_folder), '--output', str(blocker)], cwd=tmp_path)
    _fails_cleanly(result, str(blocker))


def test_eval_without_weights_is_an_error(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    result = run_main(['--cfg', str(cfg), '--data-path', str(image_folder), '--eval', '--output',
                       str(tmp_path / 'o')], cwd=tmp_path)
    _fails_cleanly(result, '--resume')
