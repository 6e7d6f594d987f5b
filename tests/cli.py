"""Helpers for tests that run main.py as users do: a tiny config, subprocesses, free ports."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

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


def run_main(args: list[str], cwd: Path, timeout: int = 240, script: str = 'main.py') -> subprocess.CompletedProcess:
    """``python main.py ARGS`` (or another script of the repository) in ``cwd``: one process, no launcher."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_main(args: list[str], cwd: Path, new_group: bool = False) -> subprocess.Popen:
    """``python main.py ARGS`` started in the background (stderr kept), for tests that signal it; with
    ``new_group`` in a process group of its own, which a test can signal as a scheduler signals a job."""
    return subprocess.Popen([sys.executable, str(REPO / 'main.py'), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=new_group)


def start_ranks(args: list[str], cwd: Path, world_size: int) -> list[subprocess.Popen]:
    """``world_size`` processes of ``python main.py ARGS`` that rendezvous by themselves, as srun starts
    them (no agent watching them: a rank that fails must end the others on its own)."""
    port, procs = free_port(), []
    for rank in range(world_size):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO / 'main.py'), *args], cwd=cwd, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def torchrun(launch: list[str], args: list[str], cwd: Path, timeout: int = 300,
             script: str = 'main.py') -> subprocess.CompletedProcess:
    """``torchrun LAUNCH main.py ARGS`` (or another script) in ``cwd``."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launch, str(REPO / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_torchrun(launch: list[str], args: list[str], cwd: Path, new_group: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launch, str(REPO / 'main.py'), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_group)


def torchrun_workers(launcher_pid: int) -> dict[int, int]:
    """torchrun's worker processes, as {rank: pid}."""
    workers = {}
    for pid in Path(f'/proc/{launcher_pid}/task/{launcher_pid}/children').read_text().split():
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
