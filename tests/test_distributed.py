"""Launch detection (torchrun, SLURM, none), SLURM host lists, and the collectives over two gloo processes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from utils import distributed as D
from cli import fork_ranks, free_port

LAUNCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_LOCALID',
               'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'SLURM_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_STEP_NODELIST')


@pytest.mark.parametrize('hostlist, hosts', [
    ('node07', ['node07']),
    ('node[01-03,07],gpu7', ['node01', 'node02', 'node03', 'node07', 'gpu7']),
    ('a[8-10]', ['a8', 'a9', 'a10']),
    ('rack[1-2]-n[1,3]', ['rack1-n1', 'rack1-n3', 'rack2-n1', 'rack2-n3']),
    ('10.0.0.5,10.0.0.6', ['10.0.0.5', '10.0.0.6']),
])
def test_expand_slurm_hostlist(hostlist, hosts):
    assert D.expand_hostlist(hostlist) == hosts


def test_slurm_ranks_and_master_from_the_first_node():
    env = {'SLURM_PROCID': '5', 'SLURM_LOCALID': '1', 'SLURM_NTASKS': '8', 'SLURM_STEP_NUM_TASKS': '8',
           'SLURM_JOB_NODELIST': 'gpu[07-08],cpu1'}
    info = D.resolve_launch(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size) == ('slurm', 5, 1, 8)
    assert (info.master_addr, info.master_port) == ('gpu07', D.DEFAULT_MASTER_PORT)
    info = D.resolve_launch({**env, 'MASTER_PORT': '1234', 'SLURM_STEP_NODELIST': 'x[3-4]'})
    assert (info.master_addr, info.master_port) == ('x3', 1234)  # the step's own node list wins


def test_sbatch_script_without_srun_runs_one_process_instead_of_hanging():
    with pytest.warns(UserWarning, match='srun'):
        info = D.resolve_launch({'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_NTASKS': '4',
                                 'SLURM_JOB_NODELIST': 'gpu[1-4]'})
    assert (info.launcher, info.world_size) == ('none', 1)


def test_torchrun_variables_win_over_slurm():
    env = {'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'h', 'MASTER_PORT': '4',
           'SLURM_PROCID': '0', 'SLURM_NTASKS': '1', 'SLURM_STEP_NUM_TASKS': '1'}
    info = D.resolve_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ('torchrun', 1, 2, 1)


def test_no_launcher_is_one_process_without_a_group(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    env = D.init_distributed('cpu')
    assert (env.rank, env.world_size, env.device, env.is_main, env.distributed) == (0, 1, torch.device('cpu'),
                                                                                   True, False)
    assert not torch.distributed.is_initialized()
    t = torch.tensor([2.0])
    assert D.all_reduce_sum(t) is t and D.all_reduce_mean(t) is t
    assert (D.get_rank(), D.get_world_size()) == (0, 1)
    D.barrier()
    D.cleanup()


def _slurm_worker(rank: int, port: int, out_dir: str) -> None:
    for var in LAUNCH_VARS:
        os.environ.pop(var, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS='2', SLURM_STEP_NUM_TASKS='2',
                      SLURM_JOB_NODELIST='127.0.0.1', MASTER_PORT=str(port))
    env = D.init_distributed('cpu')
    total = D.all_reduce_sum(torch.tensor([rank + 1.0]))
    mean = D.all_reduce_mean(torch.tensor([rank + 1.0]))
    D.barrier()
    result = {'rank': env.rank, 'world': D.get_world_size(), 'sum': total.item(), 'mean': mean.item(),
              'master': os.environ['MASTER_ADDR']}
    D.cleanup()
    with open(os.path.join(out_dir, f'{rank}.json'), 'w') as f:
        json.dump(result, f)


def test_two_gloo_processes_launched_like_srun_reduce_together(tmp_path):
    fork_ranks(_slurm_worker, (free_port(), str(tmp_path)))
    results = [json.loads((tmp_path / f'{r}.json').read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert res == {'rank': rank, 'world': 2, 'sum': 3.0, 'mean': 1.5, 'master': '127.0.0.1'}


def test_a_slurm_job_without_master_port_takes_its_port_from_the_job_id():
    env = {'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_NTASKS': '2', 'SLURM_STEP_NUM_TASKS': '2',
           'SLURM_JOB_NODELIST': 'gpu01'}
    ports = {D.resolve_launch({**env, 'SLURM_JOB_ID': job}).master_port for job in ('4711', '4712')}
    assert len(ports) == 2 and all(1024 < p < 65536 for p in ports)  # two jobs sharing gpu01 do not collide
    assert D.resolve_launch({**env, 'SLURM_JOB_ID': '4711', 'MASTER_PORT': '1234'}).master_port == 1234


@pytest.mark.parametrize('env', [{}, {'TORCHELASTIC_USE_AGENT_STORE': 'False'},
                                 {'TORCHELASTIC_USE_AGENT_STORE': 'True', 'GROUP_WORLD_SIZE': '2'}])
def test_env_rendezvous_makes_the_store_unless_one_torchrun_agent_shares_its_own(env):
    # only one agent's restart count is the same on every rank; elsewhere env:// (and torch's own opt-out)
    assert D.restart_round_store(env, '127.0.0.1', 1, 2) is None
