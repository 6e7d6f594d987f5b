"""Swin-MoE per-rank checkpoints read on any number of processes: the experts regrouped on load.

A Swin-MoE job of W ranks writes ``NAME.pth.rank0`` .. ``NAME.pth.rank{W-1}`` (the release layout adds
``NAME.pth.master``, everything but the experts, and leaves only the experts in the rank files). Rank R's file
holds its share of the experts: with NUM_LOCAL_EXPERTS n > 0 the whole experts R*n .. R*n+n-1 (``batched_fc1_w``
and the rest with a leading experts dimension of n); with n < 0 the (R mod s)-th of the s = -n slices, by hidden
unit, of expert R // s. Everything else (the gates included) is the same in every rank's file.

:func:`read_rank_files` gives each rank of this job the checkpoint it would have written itself: it reads the
writer's layout from the files (the gate's rows give the number of experts, the expert tensors' shapes the
experts per file or the slices per expert), gathers the experts this rank needs from the files that hold them
(memory-mapped: only those tensors are read), and cuts them to this job's layout. The number of experts must be
the same; how they are spread over the ranks may differ. Optimizer moments of the experts are regrouped the same
way, so a training run resumes on another number of processes.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.moe import Experts
from utils.fileio import load_file_safe
from utils.distributed import get_rank
from utils.errors import UserError

__all__ = ['ExpertLayout', 'moe_base', 'rank_file', 'model_layout', 'writer_layout', 'regroup_expert',
           'read_rank_files']

EXPERT_PARAMS = ('batched_fc1_w', 'batched_fc2_w', 'batched_fc1_bias', 'batched_fc2_bias')
_RANK_OR_MASTER = re.compile(r'\.(rank\d+|master)$')


@dataclass(frozen=True)
class ExpertLayout:
    """How a job of ``world_size`` ranks holds its experts: ``local_experts`` whole ones per rank, or (``shards``
    > 1) one expert split over ``shards`` ranks."""
    world_size: int
    local_experts: int
    shards: int = 1

    @property
    def num_experts(self) -> int:
        return self.world_size * self.local_experts // self.shards

    def share(self) -> str:
        """One rank's share, for the log: '2' (experts) or '1/4 of one'."""
        return f"1/{self.shards} of one" if self.shards > 1 else str(self.local_experts)


def moe_base(path: str) -> str:
    """``NAME.pth`` from ``NAME.pth``, ``NAME.pth.rank{R}`` or ``NAME.pth.master``."""
    return _RANK_OR_MASTER.sub('', str(path))


def rank_file(base: str, rank: int) -> str:
    """``NAME.pth.rank{rank}``: what writer rank ``rank`` of a Swin-MoE job wrote for ``NAME.pth``."""
    return f'{base}.rank{rank}'


def _experts_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def model_layout(model: nn.Module) -> Optional[ExpertLayout]:
    """The layout of ``model``'s experts in this job (None: a model without experts)."""
    found = _experts_modules(model)
    if not found:
        return None
    p = found[0][1].parallel
    return ExpertLayout(p.world_size, p.local_experts, p.shards)


def _gate_rows(state: dict, layer_prefix: str) -> Optional[int]:
    """The number of experts a layer's gate scores: the linear router's rows, the cosine router's columns."""
    if layer_prefix + 'gates.0.wg.weight' in state:
        return state[layer_prefix + 'gates.0.wg.weight'].shape[0]
    if layer_prefix + 'gates.0.sim_matrix' in state:
        return state[layer_prefix + 'gates.0.sim_matrix'].shape[1]
    return None


def writer_layout(state: dict, model: nn.Module, path: str) -> ExpertLayout:
    """The layout of the job that wrote ``state`` (its rank 0 file, merged with the master file if any), from the
    shapes of the first MoE layer: the gate gives the number of experts, ``batched_fc1_w`` ``[n, H', C]`` the
    experts per rank (H' the whole width) or the ranks per expert (H' a slice of it)."""
    name, experts = _experts_modules(model)[0]
    key = f'{name}.batched_fc1_w'
    num_experts = _gate_rows(state, name[:-len('experts')])
    if key not in state or num_experts is None:
        raise UserError(f"{path}: no experts or gate of {name} (not a Swin-MoE checkpoint of this model?)")
    held, width = state[key].shape[:2], experts.batched_fc1_w.shape[1] * experts.parallel.shards
    if held[1] == width:
        local, shards = held[0], 1
    elif width % held[1] == 0 and held[0] == 1:
        local, shards = 1, width // held[1]
    else:
        raise UserError(f"{path}: {key} {list(state[key].shape)} fits no layout of this model's experts "
                        f"(width {width}; another MLP_RATIO or EMBED_DIM?)")
    if (num_experts * shards) % local:
        raise UserError(f"{path}: {num_experts} experts do not come in files of {local}")
    return ExpertLayout(num_experts * shards // local, local, shards)


def check_same_experts(writer: ExpertLayout, reader: ExpertLayout, path: str) -> None:
    """A UserError telling which NUM_LOCAL_EXPERTS fits, when the checkpoint's expert count is not the model's."""
    found, have, world = writer.num_experts, reader.num_experts, reader.world_size
    if found == have:
        return
    if found % world == 0:
        hint = f"MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS {found // world}"
    elif world % found == 0:
        hint = f"MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS {-(world // found)} (each expert split over {world // found} ranks)"
    else:
        hint = f"a number of processes that divides or is a multiple of {found}"
    raise UserError(f"{path}: checkpoint has {found} experts, this model has {have} on {world} process"
                    f"{'es' if world > 1 else ''}; to read it here use {hint}")


def regroup_expert(part: Callable[[int], torch.Tensor], name: str, writer: ExpertLayout, reader: ExpertLayout,
                   rank: int, model_dim: int) -> torch.Tensor:
    """This rank's ``name`` tensor (one of :data:`EXPERT_PARAMS`, or an optimizer moment of one) in the reader's
    layout, from the writer ranks' tensors ``part(R)``; only the ranks holding a needed expert are asked.

    Each expert is first made whole (its slices joined along the hidden units, the fc2 bias cut back to
    ``model_dim``), then this rank's experts are stacked, or its slice cut (the fc2 bias padded as
    :class:`~models.moe.Experts` pads it)."""
    def held(r: int) -> torch.Tensor:
        t = part(r)
        return t.reshape(t.shape[0], -1) if name.endswith('bias') else t  # 2022 files: [E, 1, H] biases

    def whole(e: int) -> torch.Tensor:
        if writer.shards == 1:
            return held(e // writer.local_experts)[e % writer.local_experts]
        t = torch.cat([held(e * writer.shards + j)[0] for j in range(writer.shards)])
        return t[:model_dim] if name == 'batched_fc2_bias' else t

    if reader.shards == 1:
        first = rank * reader.local_experts
        return torch.stack([whole(e) for e in range(first, first + reader.local_experts)])
    t = whole(rank // reader.shards)
    if name == 'batched_fc2_bias':
        size = -(-model_dim // reader.shards)
        t = F.pad(t, (0, size * reader.shards - t.shape[0]))
    else:
        size = t.shape[0] // reader.shards
    j = rank % reader.shards
    return t[j * size:(j + 1) * size].unsqueeze(0).clone()


class _RankFiles:
    """The writer's rank files, each read (memory-mapped: tensors stay on disk until used) when first needed."""

    def __init__(self, base: str, master: dict):
        self.base, self.master, self._read = base, master, {}

    def __call__(self, rank: int) -> dict:
        if rank not in self._read:
            self._read[rank] = load_file_safe(rank_file(self.base, rank), mmap=True)
        return self._read[rank]

    def entry(self, rank: int, section: str, key: str) -> torch.Tensor:
        """``file[section][key]`` of writer rank ``rank`` (section 'model' also takes a bare state dict)."""
        ckpt = self(rank)
        state = ckpt.get(section, ckpt if section == 'model' else None)
        if section == 'model' and isinstance(state, dict) and key not in state and key in self.master:
            # an expert tensor that never trains (the zero fc2 bias without MLP_FC2_BIAS) went to the master
            # file with the shared weights: the same on every rank
            return self.master[key]
        if not isinstance(state, dict) or key not in state:
            raise UserError(f"{rank_file(self.base, rank)}: no {section} entry {key} (files of different jobs?)")
        return state[key]


def _regroup_weights(files: _RankFiles, section: str, model: nn.Module, writer: ExpertLayout,
                     reader: ExpertLayout, rank: int) -> dict:
    """This rank's expert tensors of ``section`` ('model' or 'model_ema'), by state-dict name."""
    out = {}
    for name, experts in _experts_modules(model):
        for param in EXPERT_PARAMS:
            key = f'{name}.{param}'
            out[key] = regroup_expert(lambda r, k=key: files.entry(r, section, k), param, writer, reader, rank,
                                      experts.model_dim)
    return out


def _names_in_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of.get(id(p), '') for group in optimizer.param_groups for p in group['params']]


def _regroup_moments(files: _RankFiles, own: int, index, key: str, regroup: Callable) -> Optional[dict]:
    """One expert parameter's optimizer state (``state[index]`` of writer rank ``own``) for this rank: entries shaped
    like the parameter (Adam's moments, momentum) regrouped as the weights are (``regroup``: :func:`regroup_expert`
    with the layouts, rank and width bound), scalars (the step) kept; None when an entry has another shape and
    cannot be regrouped."""
    shape = files.entry(own, 'model', key).shape
    param, out = key.rsplit('.', 1)[1], {}
    for what, value in files(own)['optimizer']['state'][index].items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            out[what] = regroup(lambda r: files(r)['optimizer']['state'][index][what], param)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            return None
        else:
            out[what] = value
    return out


def _regroup_optimizer(files: _RankFiles, own: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                       writer: ExpertLayout, reader: ExpertLayout, rank: int) -> tuple[dict, list[str]]:
    """Writer rank ``own``'s optimizer state with the experts' state regrouped as their weights are (the other
    parameters' state is the same on every rank). State that cannot be regrouped is left out (that parameter's
    moments start afresh); the names of those parameters come back with it."""
    saved = files(own)['optimizer']
    groups = saved['param_groups']
    keyed_by_name = bool(groups and groups[0]['params']) and isinstance(groups[0]['params'][0], str)
    number = {n: i for i, n in enumerate(_names_in_order(model, optimizer))}
    state, dropped = dict(saved['state']), []
    for name, experts in _experts_modules(model):
        for param in EXPERT_PARAMS:
            key = f'{name}.{param}'
            index = key if keyed_by_name else number.get(key)
            if index not in state:
                continue  # not optimised (the frozen fc2 bias) or not stepped yet
            regroup = functools.partial(regroup_expert, writer=writer, reader=reader, rank=rank,
                                        model_dim=experts.model_dim)
            state[index] = _regroup_moments(files, own, index, key, regroup)
            if state[index] is None:
                del state[index]
                dropped.append(key)
    return {**saved, 'state': state}, dropped


def _master_weights(base: str) -> dict:
    """The release layout's ``NAME.pth.master`` (everything but the experts), or {} where there is none."""
    master = f'{base}.master'
    if not os.path.isfile(master):
        return {}
    held = load_file_safe(master, mmap=True)
    return held.get('model', held)


def _with_master(ckpt: dict, master: dict, name: str, base: str, logger: logging.Logger) -> dict:
    if not master:
        return ckpt
    logger.info(f"merged {name} with {base}.master")
    return {**ckpt, 'model': {**ckpt.get('model', ckpt), **master}}


def read_rank_files(base: str, model: nn.Module, logger: logging.Logger,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[dict, str]:
    """This rank's checkpoint from the files ``base.rank{R}`` (and ``base.master``) written by any number of
    processes whose experts add up to this model's; returns it with a name for messages.

    Written by a job of this layout: this rank's own file, as it is. Otherwise the experts (their EMA, and with
    ``optimizer`` their optimizer moments) are regrouped from the files that hold them, the rest taken from one
    writer file, and one line logs the regrouping. A different number of experts is a UserError saying which
    NUM_LOCAL_EXPERTS would fit."""
    rank, reader = get_rank(), model_layout(model)
    own, master = rank_file(base, rank), _master_weights(base)
    files = _RankFiles(base, master)
    first = files(0)
    writer = writer_layout({**first.get('model', first), **master}, model, rank_file(base, 0))
    if writer == reader:
        return _with_master(load_file_safe(own), master, own, base, logger), own
    check_same_experts(writer, reader, rank_file(base, 0))
    absent = [rank_file(base, r) for r in range(writer.world_size) if not os.path.isfile(rank_file(base, r))]
    if absent:
        raise UserError(f"{absent[0]}: missing; the checkpoint's {writer.num_experts} experts in files of "
                        f"{writer.share()} need {writer.world_size} rank files")
    source = rank % writer.world_size  # the non-expert weights are the same in every file: spread the reads
    ckpt = _with_master(dict(files(source)), master, rank_file(base, source), base, logger)
    ckpt['model'] = {**ckpt.get('model', ckpt), **_regroup_weights(files, 'model', model, writer, reader, rank)}
    if isinstance(ckpt.get('model_ema'), dict):
        ckpt['model_ema'] = {**ckpt['model_ema'], **_regroup_weights(files, 'model_ema', model, writer, reader, rank)}
    note = ''
    if optimizer is not None and isinstance(ckpt.get('optimizer'), dict):
        ckpt['optimizer'], dropped = _regroup_optimizer(files, source, model, optimizer, writer, reader, rank)
        note = '; optimizer state regrouped too'
        if dropped:
            logger.warning(f"optimizer state of {len(dropped)} expert tensors could not be regrouped and restarts "
                           f"(e.g. {dropped[0]})")
    world = reader.world_size
    logger.info(f"regrouped {writer.world_size} ranks' experts ({writer.share()} each) into {world} "
                f"rank{'s' if world > 1 else ''} ({reader.share()} local){note}")
    return ckpt, f"{base}.rank0..rank{writer.world_size - 1}"
