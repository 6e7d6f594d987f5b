"""TRAIN.SHARDING fsdp: parameters, gradients and optimizer state sharded over the ranks with PyTorch's FSDP2.

DDP keeps a whole copy of the weights, their gradients and the AdamW moments on every rank. With
``fully_shard`` (``torch.distributed.fsdp``) each rank holds 1/N of each: every Swin block, the patch
embedding and the rest of the model (patch merging, final norm, head: the root group) are sharded
units whose parameters are all-gathered just before their forward and backward and freed after.
Gradients are reduce-scattered in fp32 (``TRAIN.FSDP.REDUCE_DTYPE``); under AMP the all-gathered
copies are in the AMP dtype while the sharded master weights stay fp32.

State dicts use the parameters' own names (FSDP2 adds no prefix), so:

* :func:`full_model_state` / :func:`full_optimizer_state` gather the official single-file layout
  (collectives: every rank calls them, rank 0 gets the tensors);
* :func:`load_model_state_into` loads a full state dict into a sharded or a plain model;
* the optimizer state is converted between torch's own layout (parameters numbered in the order of
  the optimizer's groups, what DDP runs save) and the name-keyed layout of
  ``torch.distributed.checkpoint.state_dict`` (what FSDP runs save), so either resumes the other;
* :func:`save_sharded` / :func:`load_sharded` write and read ``torch.distributed.checkpoint`` folders,
  one file per rank, resharded on load to whatever world size reads them.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Optional

import torch
from torch import nn

from utils.errors import UserError
from utils.fileio import fsync_dir, load_file_safe, save_file_atomic

SHARDINGS = ('ddp', 'fsdp')
_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
SHARDED_META = 'meta.pth'  # inside a sharded checkpoint folder: epoch, scheduler, scaler, config, ...


# ---------------------------------------------------------------------------------------- sharding

def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or what it wraps) was sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return isinstance(model, FSDPModule)


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one, in forward order: the patch embedding, then every block."""
    units = [model.patch_embed]
    for layer in model.layers:
        units += list(layer.blocks)
    return units


def shard_model(model: nn.Module, config, device: torch.device, amp_dtype: Optional[torch.dtype]) -> nn.Module:
    """``fully_shard`` every block, the stem and the root (in place); returns the model.

    Call after loading weights into the plain model and before building the optimizer: FSDP replaces
    the parameters by their shards (DTensors), which are what the optimizer must hold.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if config.MODEL.TYPE == 'swin_moe':
        raise UserError("TRAIN.SHARDING fsdp does not cover MODEL.TYPE swin_moe (its experts are already split "
                        "over the ranks); use ddp")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UserError("TRAIN.SHARDING fsdp needs several processes: launch with torchrun (or srun), or use ddp")
    if device.type == 'cpu' and not fsdp_runs_on_cpu():
        raise UserError(f"TRAIN.SHARDING fsdp on the CPU needs torch 2.7 or newer (this is {torch.__version__}: its "
                        f"CPU streams lack what FSDP2 calls); use ddp here, or fsdp on GPUs")
    reduce_name = config.TRAIN.FSDP.REDUCE_DTYPE
    if reduce_name not in _DTYPES:
        raise UserError(f"bad value for config key TRAIN.FSDP.REDUCE_DTYPE: {reduce_name!r} "
                        f"(choose from {', '.join(_DTYPES)})")
    broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # Compute in the AMP dtype (the all-gathered copies); master weights and optimizer stay fp32.
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=_DTYPES[reduce_name])
    reshard = bool(config.TRAIN.FSDP.RESHARD_AFTER_FORWARD)
    split_out = []
    for unit in sharded_units(model):
        for fp32_unit, low_precision_children in full_precision_units(unit):
            for child in low_precision_children:
                fully_shard(child, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(fp32_unit, mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=reshard)
            split_out += [fp32_unit, *low_precision_children]
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    quiet_view_output_warning(split_out)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


def quiet_view_output_warning(units: list[nn.Module]) -> None:
    """Silence FSDP2's "returned a view tensor" warning for the classes of these sharded units (V1's attention,
    its ``qkv`` and ``proj``; V2's ``cpb_mlp``), in this process. A Linear of a 3-D input returns a view of its 2-D
    product, so they always trigger it; it warns that an in-place op on such an output would skip the all-gather,
    and Swin's forward never makes one (the blocks add the residual out of place: FSDP trains as DDP does,
    tests/test_main_sharding.py). Modules of other classes keep the warning."""
    if not units:
        return
    names = '|'.join(sorted({re.escape(type(unit).__name__) for unit in units}))  # FSDPLinear, ...: as wrapped
    warnings.filterwarnings('ignore', message=rf'FSDP2-wrapped module \(({names})\) returned a view tensor',
                            category=UserWarning)


def full_precision_units(unit: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """The modules of ``unit`` that FSDP must gather and reduce in fp32 whatever the AMP dtype, each with the
    children inside it that stay in the AMP dtype: the relative-position bias and its gradient (which sums over
    every window of the batch) are kept in fp32, as the unsharded model keeps them under autocast.

    * Swin V2's ``cpb_mlp`` runs outside autocast on the fp32 coordinates table: its weights must be fp32 too.
    * Swin V1's ``relative_position_bias_table`` is a parameter of the attention itself: the attention becomes an
      fp32 unit holding only the table, with its ``qkv`` and ``proj`` as low-precision units of their own.
    """
    found = []
    for module in unit.modules():
        if isinstance(getattr(module, 'cpb_mlp', None), nn.Module):
            found.append((module.cpb_mlp, []))
        if isinstance(getattr(module, 'relative_position_bias_table', None), nn.Parameter):
            found.append((module, [c for c in module.children() if any(True for _ in c.parameters())]))
    return found


def fsdp_runs_on_cpu() -> bool:
    """Whether FSDP2 can run on CPU tensors in this torch: it records events on the CPU stream, which torch 2.7
    made a no-op (2.6 has no such method)."""
    return hasattr(torch.cpu, 'Stream') and hasattr(torch.cpu.Stream, 'record_event')


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's weights and buffers, as DDP does when it wraps a model: ranks seed their
    initialisation differently, and ``fully_shard`` keeps each rank's own slice of what it holds."""
    for tensor in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP's counterpart of DDP's ``no_sync``: no reduce-scatter on the micro-batches that only accumulate."""
    getattr(model, '_orig_mod', model).set_requires_gradient_sync(sync)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a grad norm over sharded gradients), other tensors as they are."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


# ---------------------------------------------------------------------------------- held memory

def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = t.to_local() if hasattr(t, 'to_local') else t
        total += t.numel() * t.element_size()
    return total


def held_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients (the parameters' size and dtype: what a backward
    leaves, whether or not one has run yet) and optimizer state (what exists so far; AdamW makes its
    moments at the first step)."""
    params = list(model.parameters())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()]
    trainable = [p for p in params if p.requires_grad]
    return {'parameters': _local_bytes(params), 'gradients': _local_bytes(trainable),
            'optimizer': _local_bytes(state)}


def describe_held_bytes(held: dict[str, int], rank: int) -> str:
    """The log line: exact bytes (what a parser compares) and MiB (what a reader compares)."""
    parts = [f"{name} {held[key]} bytes ({held[key] / 2 ** 20:.1f} MiB)"
             for name, key in (('parameters', 'parameters'), ('gradients', 'gradients'),
                               ('optimizer state', 'optimizer'))]
    return f"rank {rank} holds " + ', '.join(parts)


# ------------------------------------------------------------------------------ full state dicts

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, on the CPU of rank 0 ({} elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, on rank 0 ({} elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_model_state_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the whole of it) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options(full_state_dict=True, strict=False))


# --------------------------------------------------------------------- optimizer state layouts

def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group['params']]


def is_name_keyed(optim_state: dict) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (FSDP runs) rather than by number (DDP)."""
    groups = optim_state.get('param_groups') or [{}]
    params = groups[0].get('params') or []
    return bool(params) and isinstance(params[0], str)


def to_name_keyed(optim_state: dict, names: list[str]) -> dict:
    """torch's numbered layout -> the name-keyed one (``names[i]`` is parameter number ``i``)."""
    return {'state': {names[i]: s for i, s in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in optim_state['param_groups']]}


def to_numbered(optim_state: dict, names: list[str]) -> dict:
    """The name-keyed layout -> torch's numbered one, numbering as this optimizer does (``names``)."""
    number = {n: i for i, n in enumerate(names)}
    return {'state': {number[n]: s for n, s in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [number[n] for n in g['params']]} for g in optim_state['param_groups']]}


# How an optimizer steps (its kernel), as opposed to what it optimizes: torch's load_state_dict takes these
# from the file's groups, so a state written by a plain AdamW (the official framework, timm, our older
# releases) would turn our fused AdamW into the single-tensor one, which refuses the found_inf we pass it.
IMPLEMENTATION_KEYS = ('fused', 'foreach', 'capturable', 'differentiable')


def with_own_implementation(optim_state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """``optim_state`` with every group's kernel settings replaced by this optimizer's, so that the optimizer
    we built decides how it steps (and torch places the loaded ``step`` counters for that kernel)."""
    groups = []
    for saved, ours in zip(optim_state['param_groups'], optimizer.param_groups):
        group = {k: v for k, v in saved.items() if k not in IMPLEMENTATION_KEYS}
        group.update({k: ours[k] for k in IMPLEMENTATION_KEYS if k in ours})
        groups.append(group)
    return {**optim_state, 'param_groups': groups + optim_state['param_groups'][len(groups):]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Load a saved optimizer state of either layout into a sharded or a plain model's optimizer; the
    optimizer keeps its own kernel settings (:func:`with_own_implementation`)."""
    names = _names_in_optimizer_order(model, optimizer)
    optim_state = with_own_implementation(optim_state, optimizer)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        if not is_name_keyed(optim_state):
            optim_state = to_name_keyed(optim_state, names)
        set_optimizer_state_dict(model, optimizer, optim_state, options=_options(full_state_dict=True))
        return
    if is_name_keyed(optim_state):
        optim_state = to_numbered(optim_state, names)
    optimizer.load_state_dict(optim_state)


# --------------------------------------------------------------------------- sharded checkpoints

def _dcp_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Optional[nn.Module]) -> dict:
    """What each rank writes or reads: its shards (or, in one plain process, whole tensors), by name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {'model': get_model_state_dict(model)}
    if optimizer is not None:
        state['optimizer'] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state['model_ema'] = get_model_state_dict(ema)
    return state


def save_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 ema: Optional[nn.Module], meta: dict, rank: int) -> None:
    """Every rank writes its shards into a folder that replaces ``path`` only once complete (collective).

    The folder is written as ``.{name}.partial`` beside ``path``; rank 0 adds ``meta.pth`` (the
    non-tensor state) and renames it into place after all ranks are done, so a crash mid-write leaves the
    previous checkpoint the newest complete one.
    """
    import torch.distributed.checkpoint as dcp
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f'.{name}.partial')
    if rank == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    _barrier()
    dcp.save(_dcp_state(model, optimizer, ema), checkpoint_id=partial, no_dist=not _distributed())
    _barrier()
    if rank == 0:
        save_file_atomic(meta, os.path.join(partial, SHARDED_META))
        if os.path.exists(path):  # an earlier write of the same checkpoint (a repeated step save)
            shutil.rmtree(path)
        os.replace(partial, path)
        fsync_dir(folder)
    _barrier()


def load_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 ema: Optional[nn.Module]) -> dict:
    """Read a sharded checkpoint into this run's model (and optimizer, EMA), resharding to its world
    size; returns the non-tensor state saved with it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    meta = load_file_safe(os.path.join(path, SHARDED_META))
    state = _dcp_state(model, optimizer if meta.get('has_optimizer') else None,
                       ema if meta.get('has_ema') else None)
    try:
        with warnings.catch_warnings():  # one plain process reading shards: the intended case, not a mistake
            warnings.filterwarnings('ignore', message='torch.distributed is disabled')
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except Exception as e:  # a wrong architecture: the saved shapes do not fit this model's
        raise UserError(f"{path}: the sharded checkpoint does not fit this model: {str(e).splitlines()[0]}") from None
    set_model_state_dict(model, state['model'])
    if 'optimizer' in state:
        set_optimizer_state_dict(model, optimizer, with_own_implementation(state['optimizer'], optimizer))
    elif optimizer is not None:
        raise UserError(f"{path}: the sharded checkpoint holds no optimizer state to resume")
    if 'model_ema' in state:
        set_model_state_dict(ema, state['model_ema'])
    return meta


def is_sharded_checkpoint(path: str) -> bool:
    """A complete sharded checkpoint folder: DCP's ``.metadata`` and our ``meta.pth``."""
    return os.path.isfile(os.path.join(path, '.metadata')) and os.path.isfile(os.path.join(path, SHARDED_META))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()
