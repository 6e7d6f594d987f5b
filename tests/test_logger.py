"""create_logger / create_tb_writer: official line format, per-rank files, colour on the console prefix only."""
from __future__ import annotations

import logging
import re

import pytest

from logger import create_logger, create_tb_writer

LINE = re.compile(r'^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\S+)\] \((\S+) (\d+)\): INFO (.*)$')


@pytest.fixture
def logger_name(request):
    name = f'test_logger.{request.node.name}'
    yield name
    for key in [k for k in logging.Logger.manager.loggerDict if k.startswith(name)]:
        log = logging.getLogger(key)
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()


def test_every_rank_writes_its_own_plain_file_and_only_rank0_prints(tmp_path, capsys, logger_name):
    for rank in (0, 1):
        create_logger(str(tmp_path), dist_rank=rank, name=f'{logger_name}.{rank}').info(f'hello from {rank}')
    out = capsys.readouterr().out
    assert 'hello from 0' in out and 'hello from 1' not in out
    assert LINE.match(out.strip()), out  # not a terminal: no escape codes on the console either
    for rank in (0, 1):
        line = (tmp_path / f'log_rank{rank}.txt').read_text().strip()
        match = LINE.match(line)
        assert match, line
        assert match.group(1) == f'{logger_name}.{rank}' and match.group(2) == 'test_logger.py'
        assert match.group(4) == f'hello from {rank}'


def test_calling_twice_does_not_duplicate_lines(tmp_path, capsys, logger_name):
    create_logger(str(tmp_path), 0, logger_name)
    log = create_logger(str(tmp_path), 0, logger_name)
    log.info('once')
    assert capsys.readouterr().out.count('once') == 1
    assert (tmp_path / 'log_rank0.txt').read_text().count('once') == 1
    assert log.propagate is False


def test_console_prefix_is_coloured_and_the_file_is_not(tmp_path, capsys, monkeypatch, logger_name):
    monkeypatch.delenv('NO_COLOR', raising=False)
    monkeypatch.setenv('FORCE_COLOR', '1')
    create_logger(str(tmp_path), 0, logger_name).info('tinted')
    out = capsys.readouterr().out
    prefix, message = out.split(': INFO ')
    assert '\x1b[32m[' in prefix and '\x1b[33m(' in prefix and '\x1b[' not in message
    assert '\x1b[' not in (tmp_path / 'log_rank0.txt').read_text()


def test_tensorboard_writer_only_on_rank0(tmp_path):
    assert create_tb_writer(str(tmp_path), dist_rank=1) is None
    writer = create_tb_writer(str(tmp_path), dist_rank=0)
    writer.add_scalar('train/loss', 1.0, 0)
    writer.close()
    assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


def test_messages_of_our_packages_reach_the_run_log(tmp_path):
    import logging
    create_logger(str(tmp_path), dist_rank=0, name='route_test')
    logging.getLogger('data.loader').warning('unreadable image skipped: x.jpg')
    for handler in logging.getLogger('route_test').handlers:
        handler.flush()
    assert 'unreadable image skipped: x.jpg' in (tmp_path / 'log_rank0.txt').read_text()
