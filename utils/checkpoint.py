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
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from models.windows import is_derived_buffer  # recomputed buffers: absent or stale in old files, never an error
from utils.distributed import unwrap_model
from utils.errors import UserError
from utils.fileio import load_file_safe, local_path, save_file_atomic
from utils.sharding import (full_model_state, full_optimizer_state, is_sharded, is_sharded_checkpoint, load_sharded,
                            load_model_state_into, load_optimizer_state, save_sharded)
from utils.weight_layouts import Layout, check_fits, detect_layout, is_snapshot_folder, read_snapshot, to_official

# ckpt_epoch_{N}.pth after a whole epoch; ckpt_epoch_{N}_step_{S}.pth when a run was stopped after
# step S of epoch N (preemption), which resumes mid-epoch. ``.dcp`` instead of ``.pth``: a folder of shards
# (TRAIN.SHARDED_CKPT).
CKPT_PATTERN = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.(?:pth|dcp)(\.rank\d+|\.global)?$')
_STANDARD_KEYS = ('model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config', 'model_ema',
                  'step')


# ------------------------------------------------------------------------------------- save and find

def _state_or_none(obj: Any) -> Any:
    return obj.state_dict() if obj is not None else None


def _progress(match: re.Match) -> tuple[int, float]:
    """(epoch, steps done in it): a whole-epoch file counts as further on than any of its step files."""
    step = match.group(2)
    return int(match.group(1)), float(step) if step is not None else float('inf')


def checkpoint_tag(moe: bool, save_master: bool, rank: int) -> str:
    """What ends a rank's checkpoint file names after ``.pth``: nothing (rank 0 writes one file), or for Swin-MoE
    the official layout: ``.rank{r}`` (every rank writes its own, with its experts), ``.global`` (rank 0 alone,
    with TRAIN.MOE.SAVE_MASTER)."""
    if not moe:
        return ''
    return '.global' if save_master else f'.rank{rank}'


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


@dataclass
class TrainingState:
    """What a training checkpoint holds besides its bookkeeping; ``model`` is the plain (or sharded) model, not
    its DDP / compile wrapper."""
    model: torch.nn.Module
    optimizer: Any = None
    lr_scheduler: Any = None
    scaler: Any = None
    model_ema: Any = None


@dataclass
class Resumed:
    """Where a resumed run starts: its epoch, the batches of it already done, the best accuracy so far, and the
    checkpoint's other entries (RNG states, best score)."""
    max_accuracy: float = 0.0
    epoch: int = 0
    step: int = 0
    extras: dict = field(default_factory=dict)


class Checkpointer:
    """A run's checkpoints: built once with the training state, one call per save, and the resume.

    Names are the official ones: ``ckpt_epoch_{N}.pth`` after a whole epoch, ``ckpt_epoch_{N}_step_{S}.pth`` after
    a stop signal or every TRAIN.SAVE_STEPS (they resume mid-epoch and are removed once a newer checkpoint of
    their epoch or a later one is written), ``model_best.pth`` (never pruned nor auto-resumed). Swin-MoE's
    files carry the rank tag (:func:`checkpoint_tag`). A sharded model (TRAIN.SHARDING fsdp) is gathered into
    the single file, or with ``sharded_files`` every rank writes its shards into ``.dcp`` folders of the same
    names. ``keep`` > 0 prunes all but the newest ``keep`` epoch checkpoints.
    """

    def __init__(self, state: TrainingState, output_dir: str, config_text: str, logger, rank: int = 0,
                 tag: str = '', keep: int = 0, sharded_files: bool = False):
        self.state, self.output_dir, self.config_text, self.logger = state, output_dir, config_text, logger
        self.rank, self.tag, self.keep, self.sharded_files = rank, tag, keep, sharded_files
        self.writes = rank == 0 or tag.startswith('.rank')  # Swin-MoE: every rank writes its experts

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the ranks (TRAIN.SHARDING fsdp)."""
        return is_sharded(self.state.model)

    @property
    def shard_files(self) -> bool:
        """Whether every rank writes its shards (TRAIN.SHARDED_CKPT with a sharded model)."""
        return self.sharded_files and self.sharded

    @property
    def best_path(self) -> str:
        name = 'model_best.dcp' if self.shard_files else f'model_best.pth{self.tag}'
        return os.path.join(self.output_dir, name)

    def save(self, epoch: int, max_accuracy: float, step: Optional[int] = None,
             extra: Optional[dict] = None) -> Optional[str]:
        """Write the checkpoint of ``epoch`` (``step`` batches into it: a mid-epoch one); call on every rank (a
        sharded model is gathered, or written shard by shard). Returns the path this rank wrote, if any."""
        name = f"ckpt_epoch_{epoch}{'' if step is None else f'_step_{step}'}"
        if self.shard_files:
            path = self._save_shards(os.path.join(self.output_dir, f'{name}.dcp'), epoch, max_accuracy,
                                     _with_extra({}, extra, step))
        else:
            path = self._save_file(os.path.join(self.output_dir, f'{name}.pth{self.tag}'), epoch, max_accuracy,
                                   lambda state: _with_extra(state, extra, step))
        if path is not None and (self.rank == 0 or not self.shard_files):
            _remove_step_files(self.output_dir, up_to_epoch=epoch, keep=path, tag=self.tag)
            prune_checkpoints(self.output_dir, self.keep, self.logger, tag=self.tag)
        return path

    def save_best(self, epoch: int, score: float) -> Optional[str]:
        """Write ``model_best.pth`` (or ``.dcp``): the epoch checkpoint's layout with ``score`` as its
        max_accuracy, so ``--eval --resume`` and ``--pretrained`` take it. Call on every rank."""
        if self.shard_files:
            return self._save_shards(self.best_path, epoch, score, {})
        path = self._save_file(self.best_path, epoch, score, lambda state: state, quiet=True)
        if path is not None:
            self.logger.info(f"{os.path.basename(path)} saved (score {score:.3f} at epoch {epoch})")
        return path

    def save_final(self) -> None:
        """Swin-MoE's final weights in the official release layout (every rank): ``ckpt_epoch_final.pth.rank{R}``
        with this rank's expert parameters, and from rank 0 ``ckpt_epoch_final.pth.master`` with the rest (the
        files of the released models; ``--pretrained .../ckpt_epoch_final.pth`` merges them back). Nothing for
        other models."""
        if not self.tag.startswith('.rank'):
            return
        model = self.state.model
        experts = set(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))
        weights = model.state_dict()
        base = os.path.join(self.output_dir, 'ckpt_epoch_final.pth')
        save_file_atomic({'model': {k: v for k, v in weights.items() if k in experts}}, f'{base}.rank{self.rank}')
        if self.rank == 0:
            save_file_atomic({'model': {k: v for k, v in weights.items() if k not in experts}}, f'{base}.master')
        self.logger.info(f"{base}.rank{self.rank} saved !!!")

    def _state(self, epoch: int, max_accuracy: float) -> dict:
        """The official checkpoint dict (+ 'model_ema'); a sharded model's tensors are gathered to rank 0 (a
        collective: every rank calls this), the optimizer state keyed by parameter name."""
        st = self.state
        if self.sharded:
            weights = full_model_state(st.model)
            optim_state = full_optimizer_state(st.model, st.optimizer) if st.optimizer is not None else None
            ema_state = full_model_state(st.model_ema.module) if st.model_ema is not None else None
        else:
            weights, optim_state = st.model.state_dict(), _state_or_none(st.optimizer)
            ema_state = st.model_ema.state_dict() if st.model_ema is not None else None
        state = {'model': weights, 'optimizer': optim_state, 'lr_scheduler': _state_or_none(st.lr_scheduler),
                 'max_accuracy': float(max_accuracy), 'scaler': _state_or_none(st.scaler), 'epoch': int(epoch),
                 'config': self.config_text}
        if st.model_ema is not None:
            state['model_ema'] = ema_state
        return state

    def _save_file(self, path: str, epoch: int, max_accuracy: float, finish, quiet: bool = False) -> Optional[str]:
        """The single file, written atomically by the ranks that write; the others wait for a gathered one."""
        if not (self.writes or self.sharded):
            return None
        state = self._state(epoch, max_accuracy)
        if self.writes:
            if not quiet:
                self.logger.info(f"{path} saving......")
            save_file_atomic(finish(state), path)
            if not quiet:
                self.logger.info(f"{path} saved !!!")
        if self.sharded and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path if self.writes else None

    def _save_shards(self, path: str, epoch: int, max_accuracy: float, extra: dict) -> str:
        """Every rank writes its shards (torch.distributed.checkpoint); meta.pth holds the rest of the official
        entries, so tools.consolidate turns the folder into the single file."""
        st = self.state
        meta = {'lr_scheduler': _state_or_none(st.lr_scheduler), 'max_accuracy': float(max_accuracy),
                'scaler': _state_or_none(st.scaler), 'epoch': int(epoch), 'config': self.config_text,
                'has_ema': st.model_ema is not None, 'has_optimizer': st.optimizer is not None, **extra}
        self.logger.info(f"{path} saving (each rank its shards)......")
        save_sharded(path, st.model, st.optimizer, st.model_ema.module if st.model_ema is not None else None, meta,
                     self.rank)
        self.logger.info(f"{path} saved !!!")
        return path

    def resume(self, path: str, training: bool = True, start_epoch: int = 0) -> Resumed:
        """Load ``path`` into the training state. ``training`` False (evaluation), or a weights-only file: the
        model alone, and the run starts at ``start_epoch``. Swin-MoE's ``NAME.pth`` means this rank's
        ``NAME.pth.rank{R}``, and per-rank files of another number of processes are regrouped."""
        if self.tag and str(path).endswith('.pth'):  # official main_moe: --resume NAME.pth reads NAME.pth.rankR
            path = f'{path}{self.tag}'
        elif self.tag.startswith('.rank'):  # any rank's file names the checkpoint (auto-resume finds rank 0's)
            path = re.sub(r'\.rank\d+$', self.tag, str(path))
        self.logger.info(f"==============> Resuming from {path}....................")
        if os.path.isdir(path) and not is_snapshot_folder(path):
            return self._resume_shards(path, training, start_epoch)
        st, logger = self.state, self.logger
        ckpt, path = _read_checkpoint(str(path), self.tag, st.model, st.optimizer if training else None, logger)
        state, layout = _model_state(ckpt, path)
        if _converted(layout):  # our own and official checkpoints load as saved: nothing to say
            logger.info(weights_line(path, layout))
        logger.info(load_converted(st.model, state, layout, path))
        extras = {k: v for k, v in ckpt.items() if k not in _STANDARD_KEYS}
        if not training:
            return Resumed(epoch=start_epoch, extras=extras)
        if not all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')) or ckpt['optimizer'] is None:
            logger.warning(f"{path} holds weights only: training starts at epoch {start_epoch} with a fresh optimizer")
            if st.model_ema is not None:
                st.model_ema.set(st.model)
            return Resumed(epoch=start_epoch, extras=extras)
        _load_training_state(ckpt, path, st, logger)
        if st.model_ema is not None:
            _load_ema(ckpt, path, st.model, st.model_ema, logger)
        logger.info(f"=> loaded successfully '{path}' (epoch {ckpt['epoch']})")
        resumed = _resume_point(ckpt, extras)
        del ckpt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return resumed

    def _resume_shards(self, path: str, training: bool, start_epoch: int) -> Resumed:
        """A sharded checkpoint folder (TRAIN.SHARDED_CKPT), resharded to this run's world size (and read whole by
        one plain process)."""
        if not is_sharded_checkpoint(path):
            raise UserError(f"{path}: not a complete sharded checkpoint (no .metadata and meta.pth)")
        st = self.state
        ema = st.model_ema.module if training and st.model_ema is not None else None
        meta = load_sharded(path, st.model, st.optimizer if training else None, ema)
        self.logger.info(f"loaded the shards of {path} into this run's {'sharded ' if self.sharded else ''}model")
        extras = {k: v for k, v in meta.items() if k not in _STANDARD_KEYS + ('has_ema', 'has_optimizer')}
        if not training:
            return Resumed(epoch=start_epoch, extras=extras)
        # the optimizer's shards came with the model's; meta.pth holds the scheduler and the scaler
        _load_training_state(meta, path, TrainingState(st.model, None, st.lr_scheduler, st.scaler), self.logger)
        if ema is not None and not meta.get('has_ema'):
            st.model_ema.set(st.model)
            self.logger.warning(f"{path} has no 'model_ema': the EMA restarts from the loaded weights")
        self.logger.info(f"=> loaded successfully '{path}' (epoch {meta['epoch']})")
        return _resume_point(meta, extras)


def _with_extra(state: dict, extra: Optional[dict], step: Optional[int]) -> dict:
    if extra:
        clash = set(extra) & set(_STANDARD_KEYS)
        if clash:
            raise ValueError(f"extra checkpoint entries may not replace standard ones: {sorted(clash)}")
        state.update(extra)
    if step is not None:
        state['step'] = int(step)
    return state


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

def _strip_wrapper_prefixes(state: dict) -> dict:
    """Keys saved from a DDP- or compile-wrapped model carry 'module.' / '_orig_mod.' prefixes."""
    for prefix in ('module.', '_orig_mod.'):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _model_state(ckpt: dict, path: str) -> tuple[dict, Layout]:
    """The weights of a checkpoint dict in the official layout, and the layout they were saved in. SimMIM's keys
    (``encoder.*``, ``decoder.*``) are those of our own pre-training model: they stay, so its checkpoints resume."""
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return official_state(ckpt[key], path, keep=('simmim',))
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return official_state(ckpt, path, keep=('simmim',))  # a bare state dict
    raise UserError(f"{path}: no 'model' entry (found keys: {sorted(ckpt)[:8]})")


def official_state(state: dict, source: str, keep: tuple[str, ...] = ()) -> tuple[dict, Layout]:
    """``state`` in the official layout, with the :class:`~utils.weight_layouts.Layout` recognised from its keys.
    Weights of another layout (timm, transformers, mm*, official detection, SimMIM unless ``keep`` names it) are
    converted by :mod:`utils.weight_layouts`; official ones stay as saved (their derived buffers are tolerated by
    the load), and so do keys of no Swin layout, for the strict load to name."""
    layout = detect_layout(state)
    if layout.name == 'unknown' or layout.name in keep or not _converted(layout):
        return state, layout
    return to_official(state, source)


def _converted(layout: Layout) -> bool:
    """Whether weights of ``layout`` need converting: another layout, or official keys under a prefix."""
    return layout.name not in ('official', 'unknown') or bool(layout.prefix)


def weights_line(source: str, layout: Layout) -> str:
    """The log line naming the layout of the weights read from ``source``."""
    done = ', converted to the official layout' if _converted(layout) else ''
    return f"weights: {source}: {layout.describe()}{done}"


def load_converted(model: torch.nn.Module, state: dict, layout: Layout, path: str) -> str:
    """Load official-layout ``state`` (read in ``layout``) strictly into ``model``; weights that do not fit are one
    UserError naming the layout, the first mismatching keys and the likely mix-up (V2 weights for a V1 model, a
    22K head for a 1K model). The keys of the parts a backbone leaves out (``model.left_out``) are ignored."""
    left_out = tuple(getattr(model, 'left_out', ()) or ())
    if left_out:
        state = {k: v for k, v in state.items() if not k.startswith(left_out)}
    if layout.name != 'unknown':
        check_fits(state, model.state_dict(), layout, path)
    try:
        return load_model_state(model, state, path)
    except UserError as e:  # no Swin layout: say so next to the keys
        raise UserError(f"{e} ({layout.describe()})") from None


def _first(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> str:
    """Strict load except for recomputable buffers; UserError naming the first mismatching keys/shapes."""
    state = {k: v for k, v in _strip_wrapper_prefixes(state).items() if not is_derived_buffer(k)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not is_derived_buffer(k))
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


def read_weights(path: str, use_ema: bool = False) -> dict:
    """The weights of a checkpoint, for loading into a model: a ``.pth``/``.bin``/``.safetensors`` file of any
    layout :mod:`utils.weight_layouts` reads (its 'model' entry, or 'model_ema' with ``use_ema``) or a hub snapshot
    folder. Returns ``{'state': official-layout weights, 'layout': Layout, 'weights': the log line naming the
    layout, 'epoch': E or None, 'snapshot': the Snapshot of a folder, else None}``; UserError naming ``path``."""
    local = local_path(str(path))
    if is_snapshot_folder(local):
        if use_ema:
            raise UserError(f"{path}: a hub snapshot folder holds no 'model_ema' weights")
        snap = read_snapshot(local)
        return {'state': snap.state, 'layout': snap.layout, 'weights': f"weights: {snap.describe()}", 'epoch': None,
                'snapshot': snap}
    ckpt = load_file_safe(local)
    if use_ema and not isinstance(ckpt.get('model_ema'), dict):
        raise UserError(f"{path}: no 'model_ema' entry (trained without TRAIN.EMA.ENABLE?)")
    state, layout = official_state(ckpt['model_ema'], path, ('simmim',)) if use_ema else _model_state(ckpt, path)
    epoch = ckpt.get('epoch')
    return {'state': state, 'layout': layout, 'weights': weights_line(str(path), layout),
            'epoch': int(epoch) if isinstance(epoch, int) else None, 'snapshot': None}


def load_weights(path: str, model: torch.nn.Module, use_ema: bool = False) -> dict:
    """Load only the weights of a checkpoint (see :func:`read_weights`) into ``model``. Returns ``{'epoch': E or
    None}``; UserError naming ``path`` when it cannot be read or does not fit."""
    info = read_weights(path, use_ema)
    load_converted(unwrap_model(model), info['state'], info['layout'], str(path))
    return {'epoch': info['epoch']}


def _load_training_state(ckpt: dict, path: str, state: TrainingState, logger) -> None:
    """The optimizer (unless ``state.optimizer`` is None: a sharded load brought it), scheduler and scaler."""
    try:  # torch's numbered layout (DDP runs, the official files) or the name-keyed one (gathered fsdp runs)
        if ckpt.get('optimizer') is not None and state.optimizer is not None:
            load_optimizer_state(state.model, state.optimizer, ckpt['optimizer'])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit this optimizer "
                        f"(different parameter groups or TRAIN.OPTIMIZER?): {e}") from None
    if state.lr_scheduler is not None and ckpt.get('lr_scheduler') is not None:
        state.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
    if state.scaler is not None and ckpt.get('scaler'):
        if hasattr(state.scaler, 'enabled') and not state.scaler.enabled:
            logger.info("loss scaler state in the checkpoint ignored: this run does not scale the loss")
        state.scaler.load_state_dict(ckpt['scaler'])


def _load_ema(ckpt: dict, path: str, model: torch.nn.Module, model_ema, logger) -> None:
    if 'model_ema' in ckpt:
        load_model_state(model_ema.module, ckpt['model_ema'], path)
    else:
        model_ema.set(model)
        logger.warning(f"{path} has no 'model_ema': the EMA restarts from the loaded weights")


def _read_checkpoint(path: str, tag: str, model: torch.nn.Module, optimizer, logger) -> tuple[dict, str]:
    """The checkpoint dict at ``path`` and the name to report it by. Swin-MoE's per-rank files are read on any
    number of processes: the experts regrouped to this job's (utils.moe_checkpoint)."""
    if tag.startswith('.rank'):
        from utils.moe_checkpoint import moe_base, rank_file, read_rank_files
        base = moe_base(path)
        if os.path.isfile(rank_file(base, 0)):
            return read_rank_files(base, model, logger, optimizer)
    if is_snapshot_folder(path):  # weights only, converted on reading: the log names the layout they came in
        snap = read_snapshot(path)
        logger.info(f"weights: {snap.describe()}")
        return {'model': snap.state}, path
    return load_file_safe(local_path(path)), path


def _resume_point(ckpt: dict, extras: dict) -> Resumed:
    """A mid-epoch checkpoint continues its own epoch (at its step), a whole-epoch one the next."""
    max_accuracy, epoch, step = float(ckpt.get('max_accuracy', 0.0)), int(ckpt['epoch']), ckpt.get('step')
    if step is None:
        return Resumed(max_accuracy, epoch + 1, 0, extras)
    return Resumed(max_accuracy, epoch, int(step), extras)


def build_checkpointer(config, state: TrainingState, rank: int, logger) -> Checkpointer:
    """The run's :class:`Checkpointer` from OUTPUT, TRAIN.KEEP_CKPTS, TRAIN.SHARDED_CKPT and, for Swin-MoE's file
    names, MODEL.TYPE and TRAIN.MOE.SAVE_MASTER."""
    tag = _tag_of(config, rank)
    return Checkpointer(state, config.OUTPUT, config.dump(), logger, rank=rank, tag=tag,
                        keep=int(config.TRAIN.get('KEEP_CKPTS', 0)), sharded_files=bool(config.TRAIN.SHARDED_CKPT))


def _tag_of(config, rank: int) -> str:
    """This rank's file-name tag (:func:`checkpoint_tag`) from MODEL.TYPE and TRAIN.MOE.SAVE_MASTER."""
    return checkpoint_tag(config.MODEL.TYPE == 'swin_moe', bool(config.TRAIN.MOE.SAVE_MASTER), rank)


def resume_file(config, rank: int, logger) -> str:
    """The checkpoint a run starts from ('' for none), from MODEL.RESUME, TRAIN.AUTO_RESUME and EVAL_MODE. Training:
    the newest checkpoint in OUTPUT (:func:`auto_resume_helper`, with this rank's Swin-MoE file names) wins over
    MODEL.RESUME, so a requeued job continues where it stopped. Evaluation: an explicit --resume wins; without one,
    the newest checkpoint is evaluated."""
    resume = config.MODEL.RESUME
    if not config.TRAIN.AUTO_RESUME:
        return resume
    tag = _tag_of(config, rank)
    latest = auto_resume_helper(config.OUTPUT, logger, tag=tag)  # logs what it finds, as the official run does
    if latest and not (config.EVAL_MODE and resume):
        if resume:
            logger.warning(f"auto-resume changing resume file from {resume} to {latest}")
        resume = latest
    return resume
