"""Helpers for tests that run main.py as users do: a tiny config, subprocesses, free ports.

``run_main``, ``torchrun``, ``start_main``, ``start_torchrun`` and ``start_ranks`` launch *warm* (tests/warm.py: a
process forked from a server that has imported torch once; the same argv, environment, streams, exit status and
signals as a fresh interpreter, seconds faster; ``torchrun_workers`` finds the workers behind their stand-ins).
``start_ranks(..., warm=False)`` starts fresh interpreters, for a test that stops a rank with SIGSTOP, which a
stand-in cannot pass on. ``SWIN_TEST_COLD=1`` makes every launch fresh.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
WARM = Path(__file__).resolve().parent / 'warm.py'

TINY_CONFIG = """\
MODEL:
  TYPE: swin
  NAME: tiny_test
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.1
  SWIN:
    PATCH_SIZE: 4
    EMBED_DIM: 16
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 4
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.01
PRINT_FREQ: 2
"""


def write_tiny_config(folder: Path, text: str = TINY_CONFIG) -> Path:
    path = Path(folder) / 'tiny.yaml'
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO)
    env['OMP_NUM_THREADS'] = '1'
    env.pop('RANK', None), env.pop('WORLD_SIZE', None), env.pop('LOCAL_RANK', None)
    return env


class _WarmServer:
    """This test process's warm-launch server: it imports torch once, then forks a child per launch."""

    def __init__(self):
        self.socket = os.path.join(tempfile.mkdtemp(prefix='swin-warm-'), 'sock')
        self.process = subprocess.Popen([sys.executable, str(WARM), 'serve', self.socket], env=_env(),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        atexit.register(self.process.kill)

    def child_file(self, client_pid: int) -> str:
        return os.path.join(os.path.dirname(self.socket), f'{client_pid}.child')

    def ready(self, wait: float = 120.0) -> Optional[str]:
        """The socket path once the server accepts; None if it died (launches then go cold)."""
        deadline = time.monotonic() + wait
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return self.socket


WARM_LAUNCHES = not os.environ.get('SWIN_TEST_COLD')
_WARM_SERVER: Optional[_WarmServer] = None


def warm_server() -> Optional[_WarmServer]:
    """This process's server, started on first use (a test worker that launches nothing imports nothing twice)."""
    global _WARM_SERVER
    if WARM_LAUNCHES and _WARM_SERVER is None:
        _WARM_SERVER = _WarmServer()
    return _WARM_SERVER


def python_command(*args: str) -> list[str]:
    """``python ARGS`` as a command line: through the warm server when there is one."""
    server = warm_server()
    sock = server.ready() if server is not None else None
    if sock is None:
        return [sys.executable, *args]
    return [sys.executable, str(WARM), 'run', sock, *args]


def run_main(args: list[str], cwd: Path, timeout: int = 240, script: str = 'main.py') -> subprocess.CompletedProcess:
    """``python main.py ARGS`` (or another script of the repository) in ``cwd``: one process, no launcher."""
    return subprocess.run(python_command(str(REPO / script), *args), cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_main(args: list[str], cwd: Path, new_group: bool = False) -> subprocess.Popen:
    """``python main.py ARGS`` started in the background (stderr kept), for tests that signal it; with
    ``new_group`` in a process group of its own, which a test can signal as a scheduler signals a job (the warm
    stand-in then forwards a signal to the run's whole group, otherwise to the run alone)."""
    return subprocess.Popen([*python_command(str(REPO / 'main.py')), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=new_group)


def start_ranks(args: list[str], cwd: Path, world_size: int, warm: bool = True) -> list[subprocess.Popen]:
    """``world_size`` processes of ``python main.py ARGS`` that rendezvous by themselves, as srun starts
    them (no agent watching them: a rank that fails must end the others on its own). ``warm`` False: fresh
    interpreters, for a test that stops a rank with SIGSTOP (a warm stand-in cannot pass that on)."""
    port, procs = free_port(), []
    python = python_command(str(REPO / 'main.py')) if warm else [sys.executable, str(REPO / 'main.py')]
    for rank in range(world_size):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        procs.append(subprocess.Popen([*python, *args], cwd=cwd, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def torchrun(launch: list[str], args: list[str], cwd: Path, timeout: int = 300,
             script: str = 'main.py') -> subprocess.CompletedProcess:
    """``torchrun LAUNCH main.py ARGS`` (or another script) in ``cwd``: the launcher and its workers warm."""
    worker = python_command(str(REPO / script))
    cmd = [*python_command('-m', 'torch.distributed.run'), *launch, '--no-python', *worker, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_torchrun(launch: list[str], args: list[str], cwd: Path, new_group: bool = False) -> subprocess.Popen:
    """``torchrun LAUNCH main.py ARGS`` in the background, output piped; with ``new_group`` in a process group of
    its own, which tests signal as a scheduler does (``signal_whole_job``) and whose workers they find
    (``torchrun_workers``)."""
    cmd = [*python_command('-m', 'torch.distributed.run'), *launch, '--no-python',
           *python_command(str(REPO / 'main.py')), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_group)


def _behind(pid: int) -> int:
    """The process a warm stand-in stands for (``pid`` itself for a fresh interpreter)."""
    if _WARM_SERVER is not None:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(_WARM_SERVER.child_file(pid)).read_text())
    return pid


def torchrun_workers(launcher_pid: int) -> dict[int, int]:
    """torchrun's worker processes (their warm stand-ins: a signal to one reaches the worker), as {rank: pid}."""
    workers, agent = {}, _behind(launcher_pid)
    for pid in Path(f'/proc/{agent}/task/{agent}/children').read_text().split():
        with contextlib.suppress(OSError):
            env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            rank = next(int(v[5:]) for v in env if v.startswith(b'RANK='))
            workers[rank] = int(pid)
    return workers


def signal_whole_job(launcher_pid: int, sig: int) -> None:
    """As SLURM signals a job step: every process. torchrun starts each worker in a session of its own (with
    its loader workers), so the launcher's group and each worker's group."""
    workers = torchrun_workers(launcher_pid)
    os.killpg(launcher_pid, sig)
    for pid in workers.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)


def train_tiny(tmp_path: Path, data: Path, *opts: str) -> tuple[list[str], Path, str]:
    """``python main.py`` on the tiny config with ``--opts OPTS``, which must succeed: (the common arguments
    for more runs on the same output, the run's folder, its rank-0 log)."""
    common = ['--cfg', str(write_tiny_config(tmp_path)), '--data-path', str(data), '--output', str(tmp_path / 'out')]
    result = run_main([*common, '--opts', *opts], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / 'out' / 'tiny_test' / 'default'
    return common, out, (out / 'log_rank0.txt').read_text()


def fork_ranks(worker, args: tuple, nprocs: int = 2) -> None:
    """``mp.spawn(worker, args, nprocs)`` (``worker(rank, *args)`` in each process, a failure raised here), the
    processes forked from the forkserver (its preload: tests/conftest.py) instead of spawned; one thread each."""
    import torch.multiprocessing as mp
    mp.start_processes(_one_thread, args=(worker, *args), nprocs=nprocs, join=True, start_method='forkserver')


def _one_thread(rank: int, worker, *args) -> None:
    import torch
    torch.set_num_threads(1)
    worker(rank, *args)

