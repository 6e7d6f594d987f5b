"""Expert parallelism: 2 processes x 1 local expert (and 2 processes sharing 1 expert, NUM_LOCAL_EXPERTS -2) give
the outputs and gradients of 1 process holding every expert, on the same tokens (gloo, all-to-all), and every
rank measures the same gradient norm, the one process's."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cli import free_port
from models.moe import ExpertParallel, MoELayer, exclude_experts_from_ddp
from utils.amp import job_grad_norm

C, H = 8, 16


def _tokens(rank: int) -> torch.Tensor:
    return torch.randn(2, 6, C, generator=torch.Generator().manual_seed(100 + rank))


def _loss(y: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, C)).sum() + l_aux


def _single_process(num_experts: int) -> tuple[MoELayer, list, dict]:
    """One process, every expert local: each rank's tokens routed on their own (as each rank routes its own),
    the loss the mean of the ranks' losses, as DDP averages."""
    torch.manual_seed(0)
    layer = MoELayer(C, H, ExpertParallel(num_experts), capacity_factor=1.0, gate_noise=1.0).eval()  # eval: no noise
    outs = [layer(_tokens(r)) for r in range(2)]
    (sum(_loss(*o) for o in outs) / 2).backward()
    return layer, [y.detach() for y, _ in outs], {n: p.grad.clone() for n, p in layer.named_parameters()}


def _worker(rank: int, port: int, num_local_experts: int, reference: dict, results: str) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    layer = MoELayer(C, H, ExpertParallel(num_local_experts), capacity_factor=1.0, gate_noise=1.0).eval()  # eval: no noise
    full = reference['state']
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(full['gates.0.wg.weight'])
        for name, p in layer.experts.named_parameters():
            whole = full[f'experts.{name}']
            if num_local_experts > 0:  # rank r holds expert r
                p.copy_(whole[rank:rank + 1])
            else:  # both hold a half of expert 0's hidden units (and of the fc2 bias)
                size = p.shape[1]
                p.copy_(whole[:, rank * size:(rank + 1) * size])
    exclude_experts_from_ddp(layer, 2)
    y, l_aux = layer(_tokens(rank))
    _loss(y, l_aux).backward()
    gate_grad = layer.gates[0].wg.weight.grad.clone()
    dist.all_reduce(gate_grad)  # what DDP does for the shared parameters (mean over ranks)
    layer.gates[0].wg.weight.grad = gate_grad / 2
    norm = job_grad_norm(list(layer.parameters()))
    torch.save({'y': y.detach(), 'gate': gate_grad / 2, 'norm': norm,
                'experts': {n: p.grad for n, p in layer.experts.named_parameters()}}, f'{results}/{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.parametrize('num_local_experts, num_experts', [(1, 2), (-2, 1)])
def test_two_processes_equal_one_process_holding_every_expert(tmp_path, num_local_experts, num_experts):
    layer, outs, grads = _single_process(num_experts)
    reference = {'state': {k: v.detach().clone() for k, v in layer.state_dict().items()}}
    mp.spawn(_worker, args=(free_port(), num_local_experts, reference, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f'{rank}.pt', weights_only=True)
        torch.testing.assert_close(got['y'], outs[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got['gate'], grads['gates.0.wg.weight'], rtol=1e-5, atol=1e-6)
        # every rank clips by the norm of the whole job's gradient (the one process's norm)
        torch.testing.assert_close(got['norm'], torch.nn.utils.get_total_norm(list(grads.values())), rtol=1e-5, atol=0)
        for name, grad in got['experts'].items():
            whole = grads[f'experts.{name}']
            if num_local_experts > 0:
                expected = whole[rank:rank + 1]
            else:
                size = grad.shape[1]
                expected = whole[:, rank * size:(rank + 1) * size]
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)
