"""Mixture-of-experts MLP for Swin-MoE, in plain PyTorch on ``torch.distributed`` (no tutel).

The routing follows tutel's (the library the official Swin-MoE trains with), so official configs mean the same:

1. a gate gives fp32 logits ``[T, E]`` for the T local tokens and E global experts: a linear router (``wg``) or
   a cosine router (projection, L2-normalised, against a normalised ``sim_matrix``, times a clamped learned
   temperature);
2. in training, noise ``gate_noise * N(0, 1) / E`` is added to the logits; ``scores = softmax`` over all experts;
3. each token picks its top-k experts by score; its gate value for a choice is that score (divided by the sum of
   its k scores when ``normalize_gate`` and k > 1);
4. every expert takes ``capacity = k * int(capacity_factor * ceil(T / E))`` tokens (``capacity_factor`` 0: as many
   as needed; negative: as needed but at most ``-capacity_factor``'s capacity), rounded up to a multiple of the
   shard count. When tokens travel between ranks, T and the slots needed are the largest of any rank's (one MAX
   all-reduce), so every rank sends chunks of one size even when their batches differ (a last validation
   batch). Slots are given in token order, or, with batch-prioritised routing, in order of each token's best
   score (highest first); all first choices before any second choice. A choice that finds
   its expert full is dropped: it adds nothing, so for a token dropped everywhere the block passes its residual;
5. the auxiliary load-balancing loss: GShard's (``E * sum_e mean_t(scores) * share of first choices``) or the
   importance + load loss of Shazeer et al. (the mean of two squared coefficients of variation), as tutel has it.

Expert parallelism: ``num_local_experts`` n > 0 puts n experts on every rank (E = n * world); n < 0 splits each
of E = world / -n experts over -n ranks by its hidden units. Tokens travel to their expert's rank and back with
all-to-all; an expert split over ranks gathers its slices for the forward pass. On one process every expert is
local and no collective runs. Expert parameters carry ``skip_allreduce = True``: data-parallel training must leave
them out of its all-reduce (:func:`exclude_experts_from_ddp`).

State-dict names are the official ones (``_moe_layer.experts.batched_fc1_w``, ``_moe_layer.gates.0.wg.weight``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import init_weights, trunc_normal_

__all__ = ['ExpertParallel', 'Routing', 'route', 'agree_over_ranks', 'gshard_loss', 'load_importance_loss',
           'TopKGate', 'CosineTopKGate', 'Experts', 'MoELayer', 'exclude_experts_from_ddp']


class ExpertParallel:
    """Where the experts live: this rank, the world, the experts per rank (or the ranks per expert).

    Built once per model. With ``num_local_experts < 0`` it holds the process groups of the ranks that share an
    expert. A deep copy (the EMA model) shares it: process groups cannot be copied. ``world_size`` plans rank 0's
    share of a job of that size without running one (e.g. to count a 32-GPU model's parameters).
    """

    def __init__(self, num_local_experts: int, world_size: Optional[int] = None):
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size or (dist.get_world_size() if distributed else 1)
        self.rank = dist.get_rank() if distributed and not world_size else 0
        self.planned = bool(world_size)
        n = int(num_local_experts)
        if n == 0:
            raise ValueError("num_local_experts must not be 0")
        if n < -1 and self.world_size > 1 and self.world_size % -n:
            raise ValueError(f"num_local_experts {n}: the world size {self.world_size} is not a multiple of {-n}")
        if n > 0 or n == -1:
            self.local_experts, self.shards = abs(n), 1
            self.num_experts = abs(n) * self.world_size
        elif self.world_size == 1:  # one process: one whole expert per "shard group" of one (tutel refuses)
            self.local_experts, self.shards, self.num_experts = 1, 1, 1
        else:
            self.local_experts, self.shards = 1, -n
            self.num_experts = self.world_size // -n
        self.shard_group = None
        if self.shards > 1 and distributed and not world_size:
            for e in range(self.num_experts):  # every rank creates every group, in the same order
                group = dist.new_group(list(range(e * self.shards, (e + 1) * self.shards)))
                if self.rank // self.shards == e:
                    self.shard_group = group

    @property
    def distributed(self) -> bool:
        """Whether tokens travel between ranks (a planned ``world_size`` runs as one process)."""
        return self.world_size > 1 and not self.planned and dist.is_available() and dist.is_initialized()

    def __deepcopy__(self, memo) -> 'ExpertParallel':
        return self


@dataclass
class Routing:
    """Where each token's k choices go: ``experts``, ``locations`` (slot in the expert), ``gates`` (weights), all
    ``[T, k]``; ``capacity`` slots per expert; ``kept``: ``locations < capacity``."""
    experts: torch.Tensor
    locations: torch.Tensor
    gates: torch.Tensor
    capacity: int

    @property
    def kept(self) -> torch.Tensor:
        return self.locations < self.capacity

    def placement(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the kept choices: their tokens, their flat slots in ``[E * capacity]`` and their gate values."""
        kept = self.kept
        tokens = torch.arange(kept.shape[0], device=kept.device).unsqueeze(1).expand_as(kept)[kept]
        slots = (self.experts * self.capacity + self.locations)[kept]
        return tokens, slots, self.gates[kept]


def _slot_in_expert(mask: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """``[T, E]`` one-hot choices -> ``[T, E]`` running count - 1 per expert, in token order or in ``order``."""
    if order is None:
        return torch.cumsum(mask, dim=0) - 1
    ranked = torch.cumsum(mask[order], dim=0) - 1
    out = torch.empty_like(ranked)
    out[order] = ranked
    return out


def route(scores: torch.Tensor, k: int, capacity_factor: float, batch_prioritized: bool, normalize_gate: bool,
          alignment: int = 1, agree: Optional[Callable] = None) -> Routing:
    """Top-k choices, their gate values, slots and the capacity, from ``scores`` (softmax probabilities ``[T, E]``,
    fp32). See the module docstring; ties in the priority order are broken by token order. ``agree(T, needed)``
    returns the largest token count and slot need over the ranks that exchange tokens (see
    :func:`agree_over_ranks`); without it the capacity is this process's own."""
    num_tokens, num_experts = scores.shape
    k = min(k, num_experts)
    experts = torch.topk(scores, k, dim=1).indices
    gates = scores.gather(1, experts)
    order = torch.argsort(-scores.max(dim=1).values, stable=True) if batch_prioritized else None
    locations, before = [], torch.zeros(num_experts, dtype=torch.long, device=scores.device)
    for j in range(k):
        mask = F.one_hot(experts[:, j], num_experts)
        slots = _slot_in_expert(mask, order) + before  # every earlier choice comes first
        locations.append((slots * mask).sum(dim=1))
        before = before + mask.sum(dim=0)
    locations = torch.stack(locations, dim=1)
    if normalize_gate and k > 1:
        gates = gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    capacity = _capacity(locations, num_tokens, num_experts, k, capacity_factor, agree)
    capacity = -(-capacity // alignment) * alignment
    return Routing(experts, locations, gates, capacity)


def _capacity(locations: torch.Tensor, num_tokens: int, num_experts: int, k: int, capacity_factor: float,
              agree: Optional[Callable]) -> int:
    needed = locations.max() + 1 if locations.numel() else locations.new_zeros(())
    if agree is not None:
        num_tokens, needed = agree(num_tokens, needed)
    per_expert = -(-num_tokens // num_experts)
    if capacity_factor > 0:  # one process: no host sync on this path (needed is not read)
        return k * int(capacity_factor * per_expert)
    capacity = max(int(needed), 1)
    if capacity_factor < 0:
        capacity = min(capacity, k * int(-capacity_factor * per_expert))
    return capacity


def agree_over_ranks(num_tokens: int, needed: torch.Tensor) -> tuple[int, int]:
    """The largest token count and slot need (``needed``, a device scalar) of all ranks, in one MAX all-reduce.

    The all-to-all sends every rank's ``[E, capacity, C]`` in equal chunks, so all ranks must compute the same
    capacity in every forward, also where their batches differ (exact evaluation gives the ranks unequal last
    batches); training batches are equal, and there this changes nothing."""
    both = torch.stack([needed.new_tensor(num_tokens), needed.reshape(())])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return int(both[0]), int(both[1])


def gshard_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """GShard's balance loss: ``E * sum_e mean_t(scores[:, e]) * (first choices of e) / T`` (1 when balanced)."""
    num_tokens, num_experts = scores.shape
    first = F.one_hot(experts[:, 0], num_experts).to(scores.dtype)
    return num_experts * (scores.mean(dim=0) * first.mean(dim=0)).sum()


def load_importance_loss(probs: torch.Tensor, noisy_logits: torch.Tensor, experts: torch.Tensor,
                         gate_noise: float) -> torch.Tensor:
    """The mean of the importance and load losses (Shazeer et al. 2017) as tutel computes them.

    probs: softmax of the logits without noise; the load compares them with the noisy logit of each token's
    k-th choice under a Normal(0, gate_noise / E) (tutel's formula, kept as it is for the official weights).
    """
    num_experts = probs.shape[1]

    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        if x.numel() < 2:  # one expert: nothing to balance (its variance would be NaN)
            return x.new_zeros(())
        return x.var() / (x.mean() ** 2 + 1e-10)

    importance = probs.float().sum(dim=0)
    threshold = noisy_logits.gather(1, experts[:, -1:]).float()
    sigma = gate_noise / num_experts
    load = (0.5 * (1 + torch.erf((probs.float() - threshold) / (sigma * math.sqrt(2))))).sum(dim=0)
    return (cv_squared(importance) + cv_squared(load)) / 2


class TopKGate(nn.Module):
    """Linear router: fp32 logits ``wg(x)`` (no bias)."""

    def __init__(self, model_dim: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.wg.weight.float())


class CosineTopKGate(nn.Module):
    """Cosine router: ``exp(min(temperature, log 100)) * cos(projector(x), sim_matrix[:, e])``, in fp32."""

    def __init__(self, model_dim: int, num_experts: int, proj_dim: int = 256, init_t: float = 0.5):
        super().__init__()
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.randn(proj_dim, num_experts) * 0.01)
        self.clamp_max = math.log(1.0 / 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cosine_projector
        tokens = F.normalize(F.linear(x.float(), p.weight.float(), p.bias.float()), dim=1)
        logits = tokens @ F.normalize(self.sim_matrix.float(), dim=0)
        return logits * torch.clamp(self.temperature, max=self.clamp_max).exp()


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over equal chunks of dim 0; its gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.group), None


class _GatherShards(torch.autograd.Function):
    """The slices of one expert's tensor held by the ranks of ``group``, concatenated on ``dim``; the gradient of
    the whole (each rank's tokens give one part) is summed over the group and sliced back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        index = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, index * ctx.size, ctx.size).contiguous(), None, None


class Experts(nn.Module):
    """This rank's experts, as batched FFNs: ``dropout(gelu(x W1^T + b1)) W2 + b2`` (official parameter layout:
    ``batched_fc1_w [E, H, C]``, ``batched_fc2_w [E, H, C]`` (transposed), biases ``[E, H]``, ``[E, C]``; with
    experts split over ranks, each holds ``H / shards`` hidden units and ``ceil(C / shards)`` of the fc2 bias)."""

    def __init__(self, model_dim: int, hidden_dim: int, parallel: ExpertParallel, drop: float = 0.0):
        super().__init__()
        n, s = parallel.local_experts, parallel.shards
        if hidden_dim % s:
            raise ValueError(f"the MLP width {hidden_dim} cannot be split over {s} ranks")
        self.model_dim, self.parallel = model_dim, parallel
        self.batched_fc1_w = nn.Parameter(torch.empty(n, hidden_dim // s, model_dim))
        self.batched_fc2_w = nn.Parameter(torch.empty(n, hidden_dim // s, model_dim))
        self.batched_fc1_bias = nn.Parameter(torch.zeros(n, hidden_dim // s))
        self.batched_fc2_bias = nn.Parameter(torch.zeros(n, -(-model_dim // s)))
        self.drop = nn.Dropout(drop)
        trunc_normal_(self.batched_fc1_w, std=.02)  # the model re-initialises with its INIT_STD
        trunc_normal_(self.batched_fc2_w, std=.02)
        for p in self.parameters():
            p.skip_allreduce = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints of 2022 (the released Swin-MoE weights) carry biases as [E, 1, H]
        for name, param in self.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != param.shape and state_dict[key].numel() == param.numel():
                state_dict[key] = state_dict[key].reshape(param.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """fc1 weight, fc1 bias, fc2 weight, fc2 bias of the whole local experts (slices gathered)."""
        w1, b1, w2, b2 = self.batched_fc1_w, self.batched_fc1_bias, self.batched_fc2_w, self.batched_fc2_bias
        group = self.parallel.shard_group
        if group is not None:
            w1, b1, w2 = (_GatherShards.apply(t, group, 1) for t in (w1, b1, w2))
            b2 = _GatherShards.apply(b2, group, 1)[:, :self.model_dim]
        return w1, b1, w2, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[local experts, tokens, C]`` -> the same shape."""
        w1, b1, w2, b2 = self.weights()
        h = self.drop(F.gelu(torch.baddbmm(b1.unsqueeze(1).to(x.dtype), x, w1.transpose(1, 2).to(x.dtype))))
        return torch.baddbmm(b2.unsqueeze(1).to(h.dtype), h, w2.to(h.dtype))


class MoELayer(nn.Module):
    """Gate, dispatch, experts (local or over the ranks), combine; returns ``(y, l_aux)``.

    ``gates`` is a list of one gate, as in tutel (the official keys read ``gates.0.*``).
    """

    def __init__(self, model_dim: int, hidden_dim: int, parallel: ExpertParallel, k: int = 1,
                 capacity_factor: float = 1.25, gate_noise: float = 1.0, batch_prioritized_routing: bool = True,
                 normalize_gate: bool = False, is_gshard_loss: bool = False, cosine_router: bool = False,
                 cosine_router_dim: int = 256, cosine_router_init_t: float = 0.5, moe_drop: float = 0.0):
        super().__init__()
        if not is_gshard_loss and gate_noise <= 0:
            raise ValueError("the load loss (IS_GSHARD_LOSS False) needs GATE_NOISE > 0: its spread is GATE_NOISE / E")
        self.parallel, self.num_experts = parallel, parallel.num_experts
        self.k, self.capacity_factor, self.gate_noise = k, capacity_factor, gate_noise
        self.batch_prioritized_routing, self.normalize_gate = batch_prioritized_routing, normalize_gate
        self.is_gshard_loss = is_gshard_loss
        gate = (CosineTopKGate(model_dim, self.num_experts, cosine_router_dim, cosine_router_init_t) if cosine_router
                else TopKGate(model_dim, self.num_experts))
        self.gates = nn.ModuleList([gate])
        self.experts = Experts(model_dim, hidden_dim, parallel, drop=moe_drop)

    @property
    def collective_forward(self) -> bool:
        """Whether every rank must run each forward together (tokens travel between them): a rank with fewer
        batches than the others keeps joining (engine.join_collective_forwards)."""
        return self.parallel.distributed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, tokens = x.shape, x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            routing, l_aux = self.route(tokens)
            placement = routing.placement()
            dispatched = self.dispatch(tokens.float(), placement, routing.capacity)
        out = self.run_experts(dispatched.to(x.dtype), routing.capacity)
        with torch.autocast(x.device.type, enabled=False):
            y = self.combine(out.float(), placement, tokens.shape[0])
        return y.to(x.dtype).reshape(shape), l_aux

    def route(self, tokens: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        logits = self.gates[0](tokens)
        noisy = logits
        if self.training and self.gate_noise > 0:
            noisy = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
        scores = F.softmax(noisy, dim=1)
        routing = route(scores, self.k, self.capacity_factor, self.batch_prioritized_routing, self.normalize_gate,
                        alignment=self.parallel.shards, agree=agree_over_ranks if self.parallel.distributed else None)
        if self.is_gshard_loss:
            l_aux = gshard_loss(scores, routing.experts)
        else:
            l_aux = load_importance_loss(F.softmax(logits, dim=1), noisy, routing.experts, self.gate_noise)
        return routing, l_aux

    def dispatch(self, tokens: torch.Tensor, placement: tuple, capacity: int) -> torch.Tensor:
        """``[E, capacity, C]``: every kept choice's token in its expert's slot, zeros elsewhere."""
        token_ids, slots, _ = placement
        buffer = tokens.new_zeros(self.num_experts * capacity, tokens.shape[1])
        return buffer.index_add(0, slots, tokens[token_ids]).view(self.num_experts, capacity, -1)

    def run_experts(self, dispatched: torch.Tensor, capacity: int) -> torch.Tensor:
        """Send each expert's slots to the rank that holds it, run the experts there, and send the results back."""
        p = self.parallel
        if not p.distributed:
            return self.experts(dispatched)
        c = dispatched.shape[-1]
        # rank r receives, from every rank, the slots of its experts (its slice of the capacity when shared)
        chunks = dispatched.reshape(p.world_size, -1, c)
        received = _AllToAll.apply(chunks, None)  # [source rank, local experts * slots, C]
        per_expert = received.view(p.world_size, p.local_experts, -1, c).transpose(0, 1).reshape(p.local_experts, -1, c)
        out = self.experts(per_expert)
        out = out.view(p.local_experts, p.world_size, -1, c).transpose(0, 1).reshape(p.world_size, -1, c)
        return _AllToAll.apply(out.contiguous(), None).view(self.num_experts, capacity, c)

    def combine(self, out: torch.Tensor, placement: tuple, num_tokens: int) -> torch.Tensor:
        """``y[t] = sum over t's kept choices of gate * expert output``; dropped choices add nothing."""
        token_ids, slots, gates = placement
        picked = out.reshape(-1, out.shape[-1])[slots] * gates.unsqueeze(1)
        return out.new_zeros(num_tokens, out.shape[-1]).index_add(0, token_ids, picked)


def init_moe_weights(m: nn.Module, std: float) -> None:
    """Official initialisation of the MoE model: :func:`~models.layers.init_weights` (Linear weights, gates and cosine
    projectors included, N(0, std) truncated, biases 0; LayerNorm 1 and 0), and expert weights N(0, std) truncated,
    biases 0. The cosine ``sim_matrix`` keeps its N(0, 0.01)."""
    init_weights(m, std)
    if isinstance(m, Experts):
        trunc_normal_(m.batched_fc1_w, std=std)
        trunc_normal_(m.batched_fc2_w, std=std)
        nn.init.zeros_(m.batched_fc1_bias)
        nn.init.zeros_(m.batched_fc2_bias)


def exclude_experts_from_ddp(model: nn.Module, world_size: int) -> list[str]:
    """Before wrapping ``model`` in DistributedDataParallel: leave its expert parameters (``skip_allreduce``) out of
    DDP's broadcast and all-reduce, and divide their gradients by ``world_size``, so that they are means over the
    ranks' tokens as DDP makes the others (the official ``main_moe.py`` does the same). Returns their names."""
    names = []
    for name, p in model.named_parameters():
        if getattr(p, 'skip_allreduce', False) and p.requires_grad:
            names.append(name)
            if world_size > 1:
                p.register_hook(lambda g, w=world_size: g / w)
    model._ddp_params_and_buffers_to_ignore = names
    return names


def moe_param_counts(model: nn.Module) -> tuple[int, int]:
    """The official ``main_moe.py`` counts of trainable parameters: "single" with one expert (or one expert's
    slices) per MoE layer, "whole" with all the job's experts."""
    parallel = next((m.parallel for m in model.modules() if isinstance(m, Experts)), None)
    single = whole = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, 'skip_allreduce', False):
            one = p.numel() // parallel.local_experts * parallel.shards
            single, whole = single + one, whole + one * parallel.num_experts
        else:
            single, whole = single + p.numel(), whole + p.numel()
    return single, whole
