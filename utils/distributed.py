"""Process-group setup for the three ways a run is launched, and the few collectives the loop needs.

``init_distributed`` reads the launcher's environment and returns a ``DistEnv``:

* torchrun (or any ``env://`` launcher): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``;
* SLURM ``srun`` without torchrun: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS`` (srun's
  task count; the batch script itself only has ``SLURM_NTASKS`` and runs as one process), and the
  master address taken from the first host of the (compact) node list, so no ``scontrol`` is needed;
* nothing: a single process, without a process group.

NCCL on CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU. The helpers below are no-ops, or
return the single-process answer, when no process group exists, so callers need no special case.
"""
from __future__ import annotations

import itertools
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from utils.errors import UserError

DEFAULT_MASTER_PORT = 29500
_SLURM_NODELIST_VARS = ('SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST')


@dataclass
class DistEnv:
    """Where this process stands: its ranks, the number of processes and the device it computes on."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class LaunchInfo:
    """The launcher's answer before any process group exists (pure data, testable without a cluster)."""
    launcher: str  # 'torchrun', 'slurm' or 'none'
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _split_top_level(text: str) -> list[str]:
    """Split a SLURM host list on the commas that are not inside brackets."""
    parts, depth, current = [], 0, ''
    for ch in text:
        depth += (ch == '[') - (ch == ']')
        if ch == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping the zero padding of the range start."""
    values = []
    for item in body.split(','):
        if '-' in item:
            lo, hi = item.split('-', 1)
            values.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        else:
            values.append(item)
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a compact SLURM node list, e.g. ``node[01-03,07],gpu7`` or ``rack[1-2]-n[1-2]``."""
    hosts = []
    for part in _split_top_level(hostlist):
        # Alternate literal text and bracket bodies; a host is one pick from each bracket.
        pieces = re.split(r'\[([^\]]*)\]', part)
        choices = [[p] if i % 2 == 0 else _expand_range_list(p) for i, p in enumerate(pieces)]
        hosts.extend(''.join(combo) for combo in itertools.product(*choices))
    return hosts


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def slurm_job_port(env: Mapping[str, str]) -> int:
    """The rendezvous port of a SLURM job without MASTER_PORT: 15000 + SLURM_JOB_ID mod 20000, so two jobs whose
    first node is the same do not both take 29500 (the default without a job id)."""
    if env.get('SLURM_JOB_ID', '').isdigit():
        return 15000 + int(env['SLURM_JOB_ID']) % 20000
    return DEFAULT_MASTER_PORT


def resolve_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read ranks and the rendezvous address from the launcher's variables (torchrun first, then SLURM)."""
    env = os.environ if env is None else env
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return LaunchInfo('torchrun', rank=_int_env(env, 'RANK'), world_size=_int_env(env, 'WORLD_SIZE'),
                          local_rank=_int_env(env, 'LOCAL_RANK') if 'LOCAL_RANK' in env else 0,
                          master_addr=env.get('MASTER_ADDR'),
                          master_port=_int_env(env, 'MASTER_PORT') if 'MASTER_PORT' in env else None)
    if 'SLURM_PROCID' in env and 'SLURM_STEP_NUM_TASKS' in env:  # a task started by srun
        nodelist = next((env[k] for k in _SLURM_NODELIST_VARS if env.get(k)), None)
        hosts = expand_hostlist(nodelist) if nodelist else []
        addr = env.get('MASTER_ADDR') or (hosts[0] if hosts else '127.0.0.1')
        port = _int_env(env, 'MASTER_PORT') if 'MASTER_PORT' in env else slurm_job_port(env)
        return LaunchInfo('slurm', rank=_int_env(env, 'SLURM_PROCID'),
                          world_size=_int_env(env, 'SLURM_STEP_NUM_TASKS'),
                          local_rank=_int_env(env, 'SLURM_LOCALID') if 'SLURM_LOCALID' in env else 0,
                          master_addr=addr, master_port=port)
    if env.get('SLURM_NTASKS', '1') not in ('', '1'):
        # The batch script itself (sbatch --ntasks=N, no srun) also has SLURM_PROCID=0 and
        # SLURM_NTASKS=N; waiting there for N-1 peers that never start would hang the job.
        warnings.warn(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: "
                      "running a single process (launch with `srun python main.py ...` to use every task)")
    return LaunchInfo('none')


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        # With one GPU bound per task (srun --gpus-per-task=1) each process sees only device 0.
        index = local_rank if local_rank < count else 0 if count == 1 else None
        if index is None:
            raise UserError(f"LOCAL_RANK {local_rank} but only {count} CUDA devices are visible")
        torch.cuda.set_device(index)
        return torch.device('cuda', index)
    if device != 'cpu':
        raise UserError(f"unknown device {device!r}: expected 'auto', 'cuda' or 'cpu'")
    return torch.device('cpu')


def restart_round_store(env: Mapping[str, str], master_addr: str, master_port: int,
                        world_size: int) -> Optional[dist.Store]:
    """The store of a restarted single-node torchrun group, or None to let ``env://`` make it.

    torchrun (torch >= 2.5) shares its own store with the workers and keeps it across ``--max-restarts``
    rounds without a per-round prefix (pytorch#135712): a restarted rank can read an address its dead
    predecessor published and hang or fail in gloo's connectFullMesh (NCCL's unique id alike). One agent's
    restart count is the same for all its workers, so it prefixes the round. With several nodes the agents'
    counts differ; there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` is torch's own fix (README, On a cluster).
    """
    if env.get('TORCHELASTIC_USE_AGENT_STORE') != 'True' or env.get('GROUP_WORLD_SIZE', '1') != '1':
        return None
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                          timeout=dist.constants.default_pg_timeout)
    return dist.PrefixStore(f"swin/restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str = 'auto') -> DistEnv:
    """Set up this process from the launcher's environment; a process group only when world_size > 1."""
    info = resolve_launch()
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UserError(f"{info.launcher}: rank {info.rank} is outside world size {info.world_size}")
    torch_device = _pick_device(device, info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        if info.launcher == 'slurm':
            # env:// reads these; srun does not set them.
            os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                              LOCAL_RANK=str(info.local_rank), MASTER_ADDR=info.master_addr,
                              MASTER_PORT=str(info.master_port))
        cuda = torch_device.type == 'cuda'
        store = restart_round_store(os.environ, info.master_addr, info.master_port, info.world_size)
        where = {'store': store} if store is not None else {'init_method': 'env://'}
        # device_id binds NCCL to this process's GPU up front (no guessing in barrier()).
        dist.init_process_group(backend='nccl' if cuda else 'gloo', rank=info.rank, world_size=info.world_size,
                                **where, **({'device_id': torch_device} if cuda else {}))
    return DistEnv(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, device=torch_device)


def is_dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_ready() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_ready() else 1


def barrier() -> None:
    if is_dist_ready() and get_world_size() > 1:
        dist.barrier()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """``op`` over all processes, as a new tensor (``t`` itself when there is one process)."""
    if not is_dist_ready() or get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes, as a new tensor (``t`` itself when there is one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all processes (``t`` itself when there is one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes (floating tensors)."""
    world = get_world_size()
    if world == 1 or not is_dist_ready():
        return t
    return all_reduce_sum(t) / world


def cleanup() -> None:
    """Destroy the process group if this process created one. gloo's worker threads free the last collectives'
    work (their tensors need the GIL) just after they end; on torch 2.6, destroying the group meanwhile can
    deadlock the process, so the collectives are given a moment to be freed first."""
    if is_dist_ready():
        time.sleep(0.1)
        dist.destroy_process_group()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
