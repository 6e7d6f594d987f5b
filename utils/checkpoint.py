"""Training checkpoints: naming, saving, pruning, auto-resume, and strict weight loading.

Files and keys are the official ones: ``<OUTPUT>/ckpt_epoch_{epoch}.pth`` holding 'model',
'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config' (+ 'model_ema' when EMA is on).
Writes are atomic and loads never run code (:mod:`utils.fileio`); 'config' is saved as YAML text
(``config.dump()``), which any loader can read.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Any, Iterable, Optional

import torch

from utils.distributed import get_rank, unwrap_model
from utils.errors import UserError
from utils.fileio import load_file_safe, local_path, save_file_atomic
from utils.sharding import (full_model_state, full_optimizer_state, is_sharded, is_sharded_checkpoint, load_sharded,
                            load_model_state_into, load_optimizer_state, save_sharded)

# ckpt_epoch_{N}.pth after a whole epoch; ckpt_epoch_{N}_step_{S}.pth when a run was stopped after
# step S of epoch N (preemption), which resumes mid-epoch. ``.dcp`` instead of ``.pth``: a folder of shards
# (TRAIN.SHARDED_CKPT).
CKPT_PATTERN = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.(?:pth|dcp)(\.rank\d+|\.global)?$')
# Buffers the model recomputes from its architecture: absent or stale in old files, never an error.
TOLERATED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')
_STANDARD_KEYS = ('model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config', 'model_ema',
                  'step')


# ------------------------------------------------------------------------------------- save and find

def _state_or_none(obj: Any) -> Any:
    return obj.state_dict() if obj is not None else None


def _progress(match: re.Match) -> tuple[int, float]:
    """(epoch, steps done in it): a whole-epoch file counts as further on than any of its step files."""
    step = match.group(2)
    return int(match.group(1)), float(step) if step is not None else float('inf')


def checkpoint_tag(config, rank: Optional[int] = None) -> str:
    """What ends this rank's checkpoint file names after ``.pth``: nothing (rank 0 writes one file), or for
    Swin-MoE the official layout: ``.rank{r}`` (every rank writes its own, with its experts), ``.global`` (rank 0
    alone, with TRAIN.MOE.SAVE_MASTER)."""
    if config.MODEL.TYPE != 'swin_moe':
        return ''
    return '.global' if config.TRAIN.MOE.SAVE_MASTER else f'.rank{get_rank() if rank is None else rank}'


def writes_checkpoints(config, rank: int) -> bool:
    """Whether ``rank`` writes checkpoint files (rank 0; every rank for Swin-MoE's per-rank files)."""
    return rank == 0 or checkpoint_tag(config, rank).startswith('.rank')


def checkpoint_files(output_dir: str, whole_epochs_only: bool = False, tag: str = '') -> list[tuple[int, str]]:
    """(epoch, path) of every checkpoint in ``output_dir`` whose name ends in ``tag``, least progress first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(_progress(m), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := CKPT_PATTERN.match(name)) and (m.group(3) or '') == tag]
    if whole_epochs_only:
        found = [item for item in found if item[0][1] == float('inf')]
    return [(progress[0], path) for progress, path in sorted(found)]


def prune_checkpoints(output_dir: str, keep: int, logger=None, tag: str = '') -> list[str]:
    """Delete all but the ``keep`` newest epoch checkpoints (keep <= 0: delete nothing); returns the removed."""
    if keep <= 0:
        return []
    removed = []
    for _, path in checkpoint_files(output_dir, whole_epochs_only=True, tag=tag)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            _remove(path)
            removed.append(path)
    if removed and logger is not None:
        logger.info(f"removed old checkpoints (TRAIN.KEEP_CKPTS={keep}): {[os.path.basename(p) for p in removed]}")
    return removed


def checkpoint_state(config, epoch: int, model: torch.nn.Module, max_accuracy: float, optimizer, lr_scheduler,
                     scaler, model_ema=None) -> dict:
    """The official checkpoint dict (plus 'model_ema' when EMA is on).

    For a model sharded by TRAIN.SHARDING fsdp the tensors are gathered (a collective: every rank calls
    this; rank 0 receives them, the optimizer state keyed by parameter name).
    """
    model = unwrap_model(model)
    if is_sharded(model):
        weights = full_model_state(model)
        optim_state = full_optimizer_state(model, optimizer) if optimizer is not None else None
        ema_state = full_model_state(model_ema.module) if model_ema is not None else None
    else:
        weights, optim_state = model.state_dict(), _state_or_none(optimizer)
        ema_state = model_ema.state_dict() if model_ema is not None else None
    state = {
        'model': weights,
        'optimizer': optim_state,
        'lr_scheduler': _state_or_none(lr_scheduler),
        'max_accuracy': float(max_accuracy),
        'scaler': _state_or_none(scaler),
        'epoch': int(epoch),
        'config': config.dump(),
    }
    if model_ema is not None:
        state['model_ema'] = ema_state
    return state


def _checkpoint_name(epoch: int, step: Optional[int], ext: str, tag: str) -> str:
    return f"ckpt_epoch_{epoch}{'' if step is None else f'_step_{step}'}.{ext}{tag}"


def _with_extra(state: dict, extra: Optional[dict], step: Optional[int]) -> dict:
    if extra:
        clash = set(extra) & set(_STANDARD_KEYS)
        if clash:
            raise ValueError(f"extra checkpoint entries may not replace standard ones: {sorted(clash)}")
        state.update(extra)
    if step is not None:
        state['step'] = int(step)
    return state


def _after_write(config, path: str, epoch: int, logger, tag: str) -> None:
    """A new epoch checkpoint supersedes the step checkpoints of its epoch and before; then KEEP_CKPTS."""
    _remove_step_files(config.OUTPUT, up_to_epoch=epoch, keep=path, tag=tag)
    prune_checkpoints(config.OUTPUT, int(config.TRAIN.get('KEEP_CKPTS', 0)), logger, tag=tag)


def _write_epoch_checkpoint(config, state: dict, epoch: int, step: Optional[int], extra: Optional[dict],
                            logger) -> str:
    """``state`` (+ ``extra``) atomically to ``ckpt_epoch_{epoch}[_step_{step}].pth{tag}``, then the clean-up."""
    tag = checkpoint_tag(config)
    path = os.path.join(config.OUTPUT, _checkpoint_name(epoch, step, 'pth', tag))
    logger.info(f"{path} saving......")
    save_file_atomic(_with_extra(state, extra, step), path)
    logger.info(f"{path} saved !!!")
    _after_write(config, path, epoch, logger, tag)
    return path


def save_checkpoint(config, epoch: int, model: torch.nn.Module, max_accuracy: float, optimizer, lr_scheduler,
                    scaler, logger, model_ema=None, extra: Optional[dict] = None, step: Optional[int] = None) -> str:
    """Write ``<OUTPUT>/ckpt_epoch_{epoch}.pth`` atomically (call on rank 0 only); returns its path.

    With ``step`` (``step`` batches of ``epoch`` done: a stop signal, or TRAIN.SAVE_STEPS) the file is
    ``ckpt_epoch_{epoch}_step_{step}.pth`` and resumes mid-epoch; it replaces the step files before it,
    and all are removed once a whole-epoch checkpoint at or after their epoch is written.
    For a sharded model call :func:`save_training_checkpoint` on every rank instead.
    """
    state = checkpoint_state(config, epoch, model, max_accuracy, optimizer, lr_scheduler, scaler, model_ema)
    return _write_epoch_checkpoint(config, state, epoch, step, extra, logger)


def save_training_checkpoint(config, rank: int, epoch: int, model: torch.nn.Module, max_accuracy: float, optimizer,
                             lr_scheduler, scaler, logger, model_ema=None, extra: Optional[dict] = None,
                             step: Optional[int] = None, best: bool = False) -> Optional[str]:
    """The training loop's checkpoint write, called on every rank; returns the path where this rank wrote.

    Rank 0 (every rank for Swin-MoE) writes the official single file as :func:`save_checkpoint`; a model sharded
    by TRAIN.SHARDING fsdp is gathered for it first (a collective), or with TRAIN.SHARDED_CKPT every rank writes
    its shards into ``ckpt_epoch_{epoch}[_step_{S}].dcp``. ``best``: the file is ``model_best.pth`` (or
    ``model_best.dcp``), outside the epoch names, so never pruned nor auto-resumed.
    """
    model = unwrap_model(model)
    sharded = is_sharded(model)
    if sharded and config.TRAIN.SHARDED_CKPT:
        return _save_sharded_checkpoint(config, rank, epoch, model, max_accuracy, optimizer, lr_scheduler, scaler,
                                        logger, model_ema, extra, step, best)
    writes = writes_checkpoints(config, rank)
    if not (writes or sharded):
        return None
    state = checkpoint_state(config, epoch, model, max_accuracy, optimizer, lr_scheduler, scaler, model_ema)
    path = None
    if writes:
        path = _write_best(config, epoch, state, logger) if best else \
            _write_epoch_checkpoint(config, state, epoch, step, extra, logger)
    if sharded and torch.distributed.is_initialized():  # the others wait for the gathered file
        torch.distributed.barrier()
    return path


def best_checkpoint_path(config, sharded_folder: bool = False) -> str:
    """Where TRAIN.SAVE_BEST keeps the best checkpoint: ``model_best.pth`` (with Swin-MoE's rank tag), or the
    folder ``model_best.dcp`` when a sharded model writes sharded checkpoints."""
    name = 'model_best.dcp' if sharded_folder else f'model_best.pth{checkpoint_tag(config)}'
    return os.path.join(config.OUTPUT, name)


def _write_best(config, epoch: int, state: dict, logger) -> str:
    path = best_checkpoint_path(config)
    save_file_atomic(state, path)
    logger.info(f"{os.path.basename(path)} saved (score {state['max_accuracy']:.3f} at epoch {epoch})")
    return path


def _save_sharded_checkpoint(config, rank: int, epoch: int, model: torch.nn.Module, max_accuracy: float, optimizer,
                             lr_scheduler, scaler, logger, model_ema, extra: Optional[dict], step: Optional[int],
                             best: bool) -> str:
    """Every rank writes its shards (torch.distributed.checkpoint); meta.pth holds the rest of the official
    entries, so tools.consolidate turns the folder into the single file."""
    path = (best_checkpoint_path(config, sharded_folder=True) if best
            else os.path.join(config.OUTPUT, _checkpoint_name(epoch, step, 'dcp', '')))
    meta = _with_extra({'lr_scheduler': _state_or_none(lr_scheduler), 'max_accuracy': float(max_accuracy),
                        'scaler': _state_or_none(scaler), 'epoch': int(epoch), 'config': config.dump(),
                        'has_ema': model_ema is not None, 'has_optimizer': optimizer is not None},
                       None if best else extra, None if best else step)
    logger.info(f"{path} saving (each rank its shards)......")
    save_sharded(path, model, optimizer, model_ema.module if model_ema is not None else None, meta, rank)
    logger.info(f"{path} saved !!!")
    if rank == 0 and not best:
        _after_write(config, path, epoch, logger, '')
    return path


def save_best_checkpoint(config, epoch: int, model: torch.nn.Module, accuracy: float, optimizer, lr_scheduler,
                         scaler, logger, model_ema=None, rank: int = 0) -> Optional[str]:
    """Write ``<OUTPUT>/model_best.pth`` (TRAIN.SAVE_BEST) atomically: the epoch checkpoint's layout, with the
    best score as its max_accuracy, so ``--eval --resume`` and ``--pretrained`` take it. Its name matches no
    epoch pattern: pruning (TRAIN.KEEP_CKPTS) never removes it and auto-resume never picks it. Call on every
    rank (a sharded model is gathered)."""
    return save_training_checkpoint(config, rank, epoch, model, accuracy, optimizer, lr_scheduler, scaler, logger,
                                    model_ema=model_ema, best=True)


def save_moe_final(config, model: torch.nn.Module, rank: int, logger) -> None:
    """Swin-MoE's final weights in the official release layout (every rank): ``ckpt_epoch_final.pth.rank{R}``
    with this rank's expert parameters, and from rank 0 ``ckpt_epoch_final.pth.master`` with the rest (the files
    of the released models; ``--pretrained .../ckpt_epoch_final.pth`` merges them back)."""
    model = unwrap_model(model)
    experts = set(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))
    state = model.state_dict()
    base = os.path.join(config.OUTPUT, 'ckpt_epoch_final.pth')
    save_file_atomic({'model': {k: v for k, v in state.items() if k in experts}}, f'{base}.rank{rank}')
    if rank == 0:
        save_file_atomic({'model': {k: v for k, v in state.items() if k not in experts}}, f'{base}.master')
    logger.info(f"{base}.rank{rank} saved !!!")


def _remove_step_files(output_dir: str, up_to_epoch: int, keep: str, tag: str = '') -> None:
    """Mid-epoch checkpoints are superseded by any newer checkpoint (``keep``) of the same or a later epoch."""
    for name in os.listdir(output_dir):
        m = CKPT_PATTERN.match(name)
        if (m and m.group(2) is not None and (m.group(3) or '') == tag and int(m.group(1)) <= up_to_epoch
                and name != os.path.basename(keep)):
            with contextlib.suppress(FileNotFoundError):
                _remove(os.path.join(output_dir, name))


def _remove(path: str) -> None:
    """A checkpoint file, or a sharded checkpoint folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def auto_resume_helper(output_dir: str, logger=None, tag: str = '') -> Optional[str]:
    """The newest readable ``ckpt_epoch_N.pth`` (by N; names ending in ``tag``, see :func:`checkpoint_tag`) in
    ``output_dir``; unreadable ones are skipped. Swin-MoE ranks all look at the ``.rank0`` files, so a job of
    another size than the writer's picks the same checkpoint on every rank (``load_checkpoint`` regroups it)."""
    if re.fullmatch(r'\.rank\d+', tag):  # Swin-MoE: every job has a rank 0, whatever its size (files regrouped)
        tag = '.rank0'
    found = checkpoint_files(output_dir, tag=tag)
    if logger is not None:
        logger.info(f"All checkpoints found in {output_dir}: {[os.path.basename(p) for _, p in found]}")
    for _, path in reversed(found):
        try:
            if os.path.isdir(path):  # a sharded checkpoint: complete once its metadata and meta.pth are there
                if not is_sharded_checkpoint(path):
                    raise UserError(f"{path}: an incomplete sharded checkpoint")
            # mmap: only the pickle is read, the tensors stay on disk until the real load.
            elif 'model' not in load_file_safe(path, mmap=True):
                raise UserError(f"{path}: no 'model' entry")
        except UserError as e:
            if logger is not None:
                logger.warning(f"auto-resume skips an unreadable checkpoint: {e}")
            continue
        if logger is not None:
            logger.info(f"The latest checkpoint found: {path}")
        return path
    return None


# ------------------------------------------------------------------------------------------- loading

def _is_tolerated(key: str) -> bool:
    return any(name in key for name in TOLERATED_BUFFERS)


def _strip_wrapper_prefixes(state: dict) -> dict:
    """Keys saved from a DDP- or compile-wrapped model carry 'module.' / '_orig_mod.' prefixes."""
    for prefix in ('module.', '_orig_mod.'):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _model_state(ckpt: dict, path: str) -> dict:
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise UserError(f"{path}: no 'model' entry (found keys: {sorted(ckpt)[:8]})")


def _first(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> str:
    """Strict load except for recomputable buffers; UserError naming the first mismatching keys/shapes."""
    state = {k: v for k, v in _strip_wrapper_prefixes(state).items() if not _is_tolerated(k)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not _is_tolerated(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = [f"{k} checkpoint {list(v.shape)} vs model {list(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, 'shape') and v.shape != own[k].shape]
    problems = []
    if shapes:
        problems.append(f"shape {_first(shapes)}")
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if problems:
        raise UserError(f"{path}: weights do not match the model (another architecture?): {'; '.join(problems)}")
    if is_sharded(model):  # every rank holds the whole state; each keeps its shards of it
        load_model_state_into(model, state)
    else:
        model.load_state_dict(state, strict=False)
    return f"loaded {len(state)} tensors from {path} ({len(own) - len(state)} buffers recomputed)"


def load_weights(path: str, model: torch.nn.Module, use_ema: bool = False) -> dict:
    """Load only the weights of a checkpoint (``.pth`` of any layout we read, or ``.safetensors``) into
    ``model``: its 'model' entry, or 'model_ema' with ``use_ema``. Returns ``{'epoch': E or None}``;
    UserError naming ``path`` when it cannot be read or does not fit."""
    ckpt = load_file_safe(local_path(str(path)))
    if use_ema and not isinstance(ckpt.get('model_ema'), dict):
        raise UserError(f"{path}: no 'model_ema' entry (trained without TRAIN.EMA.ENABLE?)")
    load_model_state(unwrap_model(model), ckpt['model_ema'] if use_ema else _model_state(ckpt, path), path)
    epoch = ckpt.get('epoch')
    return {'epoch': int(epoch) if isinstance(epoch, int) else None}


def _load_training_state(ckpt: dict, path: str, model: torch.nn.Module, optimizer, lr_scheduler, scaler,
                         logger) -> None:
    try:  # torch's numbered layout (DDP runs, the official files) or the name-keyed one (gathered fsdp runs)
        if ckpt.get('optimizer') is not None:
            load_optimizer_state(model, optimizer, ckpt['optimizer'])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit this optimizer "
                        f"(different parameter groups or TRAIN.OPTIMIZER?): {e}") from None
    if lr_scheduler is not None and ckpt.get('lr_scheduler') is not None:
        lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
    if scaler is not None and ckpt.get('scaler'):
        if hasattr(scaler, 'enabled') and not scaler.enabled:
            logger.info("loss scaler state in the checkpoint ignored: this run does not scale the loss")
        scaler.load_state_dict(ckpt['scaler'])


def _load_ema(ckpt: dict, path: str, model: torch.nn.Module, model_ema, logger) -> None:
    if 'model_ema' in ckpt:
        load_model_state(model_ema.module, ckpt['model_ema'], path)
    else:
        model_ema.set(model)
        logger.warning(f"{path} has no 'model_ema': the EMA restarts from the loaded weights")


def load_checkpoint(config, path: str, model: torch.nn.Module, optimizer, lr_scheduler, scaler, logger,
                    model_ema=None, *, extra_out: Optional[dict] = None) -> tuple[float, int]:
    """Resume from ``path`` (usually MODEL.RESUME or auto-resume's pick); returns (max_accuracy, start_epoch).

    For a mid-epoch checkpoint start_epoch is its own epoch and ``extra_out['step']`` the batches done.

    EVAL_MODE, or a weights-only file: only the model is loaded, and (0.0, TRAIN.START_EPOCH) comes
    back. ``extra_out``, if given, receives the checkpoint's non-standard entries (e.g. RNG states).
    """
    tag = checkpoint_tag(config)
    if tag and str(path).endswith('.pth'):  # official main_moe: --resume NAME.pth reads this rank's NAME.pth.rankR
        path = f'{path}{tag}'
    elif tag.startswith('.rank'):  # any rank's file names the checkpoint (auto-resume finds rank 0's)
        path = re.sub(r'\.rank\d+$', tag, str(path))
    logger.info(f"==============> Resuming from {path}....................")
    if os.path.isdir(path):
        return _load_sharded_checkpoint(config, path, model, optimizer, lr_scheduler, scaler, logger, model_ema,
                                        extra_out)
    model = unwrap_model(model)
    ckpt, path = _read_checkpoint(config, str(path), model, None if config.EVAL_MODE else optimizer, logger)
    logger.info(load_model_state(model, _model_state(ckpt, path), path))
    if extra_out is not None:
        extra_out.update({k: v for k, v in ckpt.items() if k not in _STANDARD_KEYS})
    start_epoch = config.TRAIN.START_EPOCH
    if config.EVAL_MODE:
        return 0.0, start_epoch
    if not all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')) or ckpt['optimizer'] is None:
        logger.warning(f"{path} holds weights only: training starts at epoch {start_epoch} with a fresh optimizer")
        if model_ema is not None:
            model_ema.set(model)
        return 0.0, start_epoch
    _load_training_state(ckpt, path, model, optimizer, lr_scheduler, scaler, logger)
    if model_ema is not None:
        _load_ema(ckpt, path, model, model_ema, logger)
    logger.info(f"=> loaded successfully '{path}' (epoch {ckpt['epoch']})")
    result = _resume_point(ckpt, extra_out)
    del ckpt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _read_checkpoint(config, path: str, model: torch.nn.Module, optimizer, logger) -> tuple[dict, str]:
    """The checkpoint dict at ``path`` and the name to report it by. Swin-MoE's per-rank files are read on any
    number of processes: the experts regrouped to this job's (utils.moe_checkpoint)."""
    if checkpoint_tag(config).startswith('.rank'):
        from utils.moe_checkpoint import moe_base, rank_file, read_rank_files
        base = moe_base(path)
        if os.path.isfile(rank_file(base, 0)):
            return read_rank_files(base, model, logger, optimizer)
    return load_file_safe(local_path(path)), path


def _resume_point(ckpt: dict, extra_out: Optional[dict]) -> tuple[float, int]:
    """(max_accuracy, start_epoch): a mid-epoch checkpoint continues its own epoch (at extra_out['step']),
    a whole-epoch one the next."""
    max_accuracy, epoch = float(ckpt.get('max_accuracy', 0.0)), int(ckpt['epoch'])
    step = ckpt.get('step')
    if extra_out is not None and step is not None:
        extra_out['step'] = int(step)
    return max_accuracy, epoch if step is not None else epoch + 1


def _load_sharded_checkpoint(config, path: str, model: torch.nn.Module, optimizer, lr_scheduler, scaler, logger,
                             model_ema, extra_out: Optional[dict]) -> tuple[float, int]:
    """Resume from a sharded checkpoint folder (TRAIN.SHARDED_CKPT), resharded to this run's world size
    (and read whole by one plain process)."""
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path}: not a complete sharded checkpoint (no .metadata and meta.pth)")
    model = unwrap_model(model)
    training = not config.EVAL_MODE
    ema = model_ema.module if training and model_ema is not None else None
    meta = load_sharded(path, model, optimizer if training else None, ema)
    logger.info(f"loaded the shards of {path} into this run's {'sharded ' if is_sharded(model) else ''}model")
    if extra_out is not None:
        extra_out.update({k: v for k, v in meta.items() if k not in _STANDARD_KEYS + ('has_ema', 'has_optimizer')})
    if not training:
        return 0.0, config.TRAIN.START_EPOCH
    # the optimizer's shards came with the model's; meta.pth holds the scheduler and the scaler
    _load_training_state(meta, path, model, optimizer, lr_scheduler, scaler, logger)
    if ema is not None and not meta.get('has_ema'):
        model_ema.set(model)
        logger.warning(f"{path} has no 'model_ema': the EMA restarts from the loaded weights")
    logger.info(f"=> loaded successfully '{path}' (epoch {meta['epoch']})")
    return _resume_point(meta, extra_out)
