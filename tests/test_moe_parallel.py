"""Expert parallelism: 2 processes x 1 local expert (and 2 processes sharing 1 expert, NUM_LOCAL_EXPERTS -2) give
the outputs and gradients of 1 process holding every expert, on the same tokens (gloo, all-to-all), and every
rank measures the same gradient norm, the one process's; ranks with unequal numbers of tokens agree on one
capacity. The experts of per-rank checkpoints regroup between any two layouts of the same experts."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from utils.distributed import cleanup
from cli import fork_ranks, free_port
from models.moe import ExpertParallel, Experts, MoELayer, exclude_experts_from_ddp
from utils.amp import job_grad_norm
from utils.moe_checkpoint import EXPERT_PARAMS, ExpertLayout, regroup_expert, writer_layout

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


def _rank_share(full: dict, rank: int, num_local_experts: int, capacity_factor: float) -> MoELayer:
    """This rank's layer of 2, with its share of the one-process layer's weights ``full``."""
    layer = MoELayer(C, H, ExpertParallel(num_local_experts), capacity_factor=capacity_factor,
                     gate_noise=1.0).eval()  # eval: no noise
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(full['gates.0.wg.weight'])
        for name, p in layer.experts.named_parameters():
            whole = full[f'experts.{name}']
            if num_local_experts > 0:  # rank r holds expert r
                p.copy_(whole[rank:rank + 1])
            else:  # both hold a half of expert 0's hidden units (and of the fc2 bias)
                size = p.shape[1]
                p.copy_(whole[:, rank * size:(rank + 1) * size])
    return layer


def _worker(rank: int, port: int, num_local_experts: int, reference: dict, results: str) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    layer = _rank_share(reference['state'], rank, num_local_experts, capacity_factor=1.0)
    exclude_experts_from_ddp(layer, 2)
    y, l_aux = layer(_tokens(rank))
    _loss(y, l_aux).backward()
    gate_grad = layer.gates[0].wg.weight.grad.clone()
    dist.all_reduce(gate_grad)  # what DDP does for the shared parameters (mean over ranks)
    layer.gates[0].wg.weight.grad = gate_grad / 2
    norm = job_grad_norm(list(layer.parameters()))
    torch.save({'y': y.detach(), 'gate': gate_grad / 2, 'norm': norm,
                'experts': {n: p.grad for n, p in layer.experts.named_parameters()}}, f'{results}/{rank}.pt')
    cleanup()  # waits for gloo to free the last work (torch 2.6 can deadlock otherwise)


@pytest.mark.parametrize('num_local_experts, num_experts', [(1, 2), (-2, 1)])
def test_two_processes_equal_one_process_holding_every_expert(tmp_path, num_local_experts, num_experts):
    layer, outs, grads = _single_process(num_experts)
    reference = {'state': {k: v.detach().clone() for k, v in layer.state_dict().items()}}
    fork_ranks(_worker, (free_port(), num_local_experts, reference, str(tmp_path)))
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


def _uneven_worker(rank: int, port: int, state: dict, results: str) -> None:
    """Rank 0 routes 12 tokens, rank 1 six (a last validation batch of 1 image where rank 0 has 2)."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    tokens = _tokens(rank)[:2 - rank]
    layer = _rank_share(state, rank, 1, capacity_factor=0.0)
    with torch.no_grad():
        out = {'kept_all': layer(tokens)[0]}
        layer.capacity_factor = 1.25  # the capacity follows the token count: each rank's own would differ
        out['capacity'] = layer.route(tokens.reshape(-1, C))[0].capacity
        out['y'] = layer(tokens)[0]
    torch.save(out, f'{results}/{rank}.pt')
    cleanup()  # waits for gloo to free the last work (torch 2.6 can deadlock otherwise)


def test_ranks_with_unequal_token_counts_agree_on_one_capacity(tmp_path):
    layer, _, _ = _single_process(2)
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    fork_ranks(_uneven_worker, (free_port(), state, str(tmp_path)))
    layer.capacity_factor = 0.0
    for rank in range(2):
        got = torch.load(tmp_path / f'{rank}.pt', weights_only=True)
        # capacity factor 0 keeps every token: each rank's tokens come out as on one process
        with torch.no_grad():
            torch.testing.assert_close(got['kept_all'], layer(_tokens(rank)[:2 - rank])[0], rtol=1e-5, atol=1e-6)
        assert got['capacity'] == int(1.25 * 12 / 2)  # from the larger rank's 12 tokens on both
        assert got['y'].shape == (2 - rank, 6, C)


# every way to hold 4 experts of width 8 (model width 6: the fc2 bias of a 4-way split is padded to 8)
LAYOUTS = [ExpertLayout(1, 4), ExpertLayout(2, 2), ExpertLayout(4, 1), ExpertLayout(8, 1, 2), ExpertLayout(16, 1, 4)]


def _all_ranks(parts: list, name: str, writer: ExpertLayout, reader: ExpertLayout) -> list:
    return [regroup_expert(lambda r: parts[r], name, writer, reader, rank, model_dim=6)
            for rank in range(reader.world_size)]


def test_experts_regroup_between_any_two_layouts_of_the_same_experts():
    whole = Experts(6, 8, ExpertParallel(4))
    for name in EXPERT_PARAMS:
        full = torch.randn_like(getattr(whole, name))
        for writer in LAYOUTS:
            parts = _all_ranks([full], name, LAYOUTS[0], writer)
            n = -writer.shards if writer.shards > 1 else writer.local_experts
            held = getattr(Experts(6, 8, ExpertParallel(n, world_size=writer.world_size)), name)
            assert all(p.shape == held.shape for p in parts), (name, writer)
            for reader in LAYOUTS:
                back = _all_ranks(_all_ranks(parts, name, writer, reader), name, reader, LAYOUTS[0])
                assert torch.equal(back[0], full), (name, writer, reader)
    fc1 = torch.randn(4, 8, 6)
    parts = _all_ranks([fc1], 'batched_fc1_w', LAYOUTS[0], ExpertLayout(8, 1, 2))
    assert torch.equal(parts[5], fc1[2:3, 4:])  # rank 5: the second half of expert 2's hidden units
    bias = _all_ranks([torch.randn(4, 6)], 'batched_fc2_bias', LAYOUTS[0], ExpertLayout(16, 1, 4))
    assert torch.equal(bias[3], torch.zeros(1, 2))  # the padding past the model width


def test_the_writer_layout_is_read_from_the_gate_and_the_expert_shapes():
    layer = MoELayer(6, 8, ExpertParallel(4))
    for local, width, found in [(1, 8, ExpertLayout(4, 1)), (2, 8, ExpertLayout(2, 2)), (1, 2, ExpertLayout(16, 1, 4))]:
        state = {'experts.batched_fc1_w': torch.zeros(local, width, 6), 'gates.0.wg.weight': torch.zeros(4, 6)}
        assert writer_layout(state, layer, 'x.pth.rank0') == found
