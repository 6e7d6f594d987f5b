"""The warm launcher (tests/warm.py) that most launches of the suite go through behaves as a fresh interpreter:
argv, environment, working directory, streams, exit status, uncaught exceptions, and signals (a SIGKILL of the
stand-in ends the run)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from cli import WARM_LAUNCHES, python_command

pytestmark = pytest.mark.skipif(not WARM_LAUNCHES, reason='SWIN_TEST_COLD: every launch is fresh')

SCRIPT = """\
import os, signal, sys, time
print('argv', sys.argv[1:], 'cwd', os.path.basename(os.getcwd()), 'env', os.environ.get('PROBE'), flush=True)
print('to stderr', file=sys.stderr)
if sys.argv[1] == 'raise':
    raise ValueError('boom')
if sys.argv[1] == 'wait':
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(3))
    open('pid', 'w').write(str(os.getpid()))
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / 'probe.py'
    path.write_text(SCRIPT)
    return path


def _run(script, *args, **kw):
    return subprocess.run(python_command(str(script), *args), cwd=script.parent, capture_output=True, text=True,
                          env=dict(os.environ, PROBE='seen'), timeout=120, **kw)


def test_argv_cwd_environment_streams_and_exit_code_are_the_callers(script):
    done = _run(script, '7', 'x y')
    assert done.returncode == 7
    assert done.stdout == f"argv ['7', 'x y'] cwd {script.parent.name} env seen\n"
    assert done.stderr == 'to stderr\n'


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(script):
    done = _run(script, 'raise')
    assert done.returncode == 1
    assert 'Traceback' in done.stderr and 'ValueError: boom' in done.stderr


def _started(script) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(python_command(str(script), 'wait'), cwd=script.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pid_file = script.parent / 'pid'
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    return proc, int(pid_file.read_text())


def test_a_signal_to_the_stand_in_reaches_the_run_and_its_status_comes_back(script):
    proc, run_pid = _started(script)
    assert run_pid != proc.pid  # the run is the server's child; the stand-in forwards
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3


def test_sigkill_of_the_stand_in_kills_the_run(script):
    proc, run_pid = _started(script)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while os.path.exists(f'/proc/{run_pid}') and 'Z' not in _state(run_pid):
        assert time.time() < deadline, 'the run outlived its stand-in'
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return 'Z'
