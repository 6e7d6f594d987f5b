"""The step checks that train_one_epoch folds into one all-reduce at its log steps keep their guarantees over
two gloo processes: a NaN on one rank makes both skip the same optimizer step and keep identical weights, a
stop signal on one rank stops both after the same step, and too many non-finite steps fail both alike."""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist

from config import get_default_config
from engine import MidEpoch, TrainContext, train_one_epoch
from utils.amp import GradScalerWithNorm
from utils.distributed import cleanup
from utils.errors import UserError
from cli import fork_ranks, free_port


class _Scheduler:
    def step_update(self, num_updates: int) -> None:
        pass


class _Stop:
    """A PreemptionHandler stand-in whose signal 'arrives' on this rank after ``at`` batches were drawn."""

    def __init__(self, at: int | None):
        self.at, self.received = at, None


def _batches(rank: int, n: int, poison: set[int], stop: _Stop):
    g = torch.Generator().manual_seed(rank)
    for i in range(n):
        if stop.at is not None and i == stop.at:
            stop.received = 15  # SIGTERM, as the handler records it
        x = torch.randn(4, 3, generator=g)
        if i in poison:
            x[0, 0] = float('nan')
        yield x, torch.tensor([0, 1, 2, 0])


class _Loader(list):
    """A list of batches drawn lazily (so the stop flag is raised while the epoch runs)."""

    def __init__(self, rank, n, poison, stop):
        super().__init__(range(n))
        self.args = (rank, n, poison, stop)

    def __iter__(self):
        return _batches(*self.args)


def _worker(rank: int, port: int, out_dir: str, case: dict) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3), gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ctx = TrainContext(model=model, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                       lr_scheduler=_Scheduler(), loss_scaler=GradScalerWithNorm(enabled=False, device_type='cpu'),
                       device=torch.device('cpu'), amp_dtype=None)
    cfg = get_default_config()
    cfg.TRAIN.MAX_NONFINITE_STEPS, cfg.PRINT_FREQ = case['max_nonfinite'], case['print_freq']
    cfg.freeze()
    stop = _Stop(case['stop_at'].get(str(rank)))
    loader = _Loader(rank, case['steps'], set(case['poison'].get(str(rank), [])), stop)
    result = {}
    try:
        stats = train_one_epoch(cfg, ctx, loader, 0, logging.getLogger(f'rank{rank}'), MidEpoch(preemption=stop))
        result.update(stopped_at=stats['stopped_at'], skipped=stats['skipped_steps'],
                      weights=[p.detach().flatten().tolist() for p in model.parameters()],
                      steps=optimizer.state[next(model.parameters())]['step'].item())
    except UserError as e:
        result['error'] = str(e)
    with open(os.path.join(out_dir, f'{rank}.json'), 'w') as f:
        json.dump(result, f)
    cleanup()  # waits for gloo to free the last work (torch 2.6 can deadlock otherwise)


def _run(tmp_path, **case) -> list[dict]:
    case = {'steps': 8, 'print_freq': 3, 'max_nonfinite': 5, 'poison': {}, 'stop_at': {}, **case}
    fork_ranks(_worker, (free_port(), str(tmp_path), case))
    return [json.loads((tmp_path / f'{r}.json').read_text()) for r in (0, 1)]


def test_a_nan_on_one_rank_makes_both_skip_that_step_and_keep_identical_weights(tmp_path):
    rank0, rank1 = _run(tmp_path, poison={'1': [2]})
    assert rank0['skipped'] == rank1['skipped'] == 1
    assert rank0['steps'] == rank1['steps'] == 7  # 8 batches, one step skipped: AdamW's step count says so
    assert rank0['weights'] == rank1['weights']
    assert all(w == w for p in rank0['weights'] for w in p)  # no NaN reached the weights


def test_a_stop_signal_on_one_rank_stops_both_after_the_same_step(tmp_path):
    rank0, rank1 = _run(tmp_path, stop_at={'1': 4})  # arrives while batch 4 runs; the next check is at 6
    assert rank0['stopped_at'] == rank1['stopped_at'] == 7
    assert rank0['weights'] == rank1['weights'] and rank0['steps'] == 7


def test_too_many_nonfinite_steps_fail_both_ranks_with_the_same_error(tmp_path):
    rank0, rank1 = _run(tmp_path, poison={'0': [1, 2, 3]}, max_nonfinite=2, print_freq=5)
    assert 'error' in rank0 and rank0.get('error') == rank1.get('error')
    assert 'epoch 0 step 3' in rank0['error'] and 'TRAIN.MAX_NONFINITE_STEPS=2' in rank0['error']
