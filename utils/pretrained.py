"""Fine-tuning initialisation: load released or our own weights into a model of another shape.

``load_pretrained(config, model, logger)`` is what ``--pretrained PATH`` (MODEL.PRETRAINED) runs. It
reads a ``.pth``/``.bin``/``.safetensors`` file or a hub snapshot folder (``config.json`` + weights, read
offline) of any layout :mod:`utils.weight_layouts` recognises from the keys: official (a released
``{'model': ...}`` file, one of our checkpoints, a SimMIM pre-training checkpoint whose keys start with
``encoder.``), timm, Hugging Face transformers, mmdet/mmseg or the official detection backbones. One log line
names the layout (``weights: ...``); weights of another layout are converted to the official one. The model
comes from the run's config (``--cfg``), never from a snapshot's config.json. The weights are adapted to ``model``:

* derived buffers (relative_position_index, relative_coords_table, attn_mask) are dropped: the model
  rebuilds them for its own window size;
* V1's ``relative_position_bias_table`` ((2W-1)^2 x heads) is resized bicubically to the model's window;
  V2's continuous position bias (``cpb_mlp``) does not depend on the window and is carried as is (the
  model normalises coordinates by MODEL.SWINV2.PRETRAINED_WINDOW_SIZES);
* ``absolute_pos_embed`` is resized bicubically to the model's patch grid;
* RGB weights meet a model of another input channel count (MODEL.*.IN_CHANS): the patch embedding's
  convolution is adapted as timm adapts a first convolution (:func:`adapt_input_conv`), in one log line;
* the classifier: kept when the class count matches; mapped when a class-map file (one source row index
  per line, e.g. the official data/map22kto1k.txt) is given; otherwise re-initialised to zero, as the
  official loader does;
* SimMIM checkpoints lose their ``encoder.`` prefix; the decoder and the mask token are dropped.

What was resized, dropped and kept is logged. Anything else that does not fit (another depth, width,
head count, patch size, V2 weights for a V1 model) is one UserError naming the layout, the first keys that do not
match and the likely mix-up; so is a layout it cannot recognise.

:func:`read_for_use` reads weights to run a model with (predict.py, tools.export): the weights in the official
layout with what a snapshot's config.json says (model arguments, class names, preprocessing), and the config our
checkpoints carry; :func:`snapshot_config` and :func:`with_model_of` turn those into the run's config.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from config import get_default_config, merge_opts, merge_yaml
from models.windows import is_derived_buffer
from utils.checkpoint import load_converted, official_state, weights_line
from utils.fileio import load_file_safe, local_path
from utils.distributed import unwrap_model
from utils.errors import UserError
from utils.weight_layouts import Layout, Snapshot, is_snapshot_folder, model_opts, read_snapshot, to_official

__all__ = ['load_pretrained', 'adapt_state_dict', 'adapt_input_conv', 'resize_rel_pos_bias_table',
           'resize_abs_pos_embed', 'read_class_map', 'strip_simmim_prefix', 'PretrainedReport', 'DEFAULT_22K_MAP',
           'read_pretrained', 'read_for_use', 'snapshot_config', 'with_model_of']

# Where the official framework looks for its ImageNet-22K -> 1K class map (relative to the repository).
DEFAULT_22K_MAP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                               'map22kto1k.txt')
_HEAD_KEYS = ('head.weight', 'head.bias')
_INPUT_CONV = 'patch_embed.proj.weight'  # the first convolution of every family: (embed_dim, in_chans, p, p)
# Keys only a SimMIM pre-training model has; a classifier never uses them.
_PRETRAIN_ONLY = ('mask_token',)


@dataclass
class PretrainedReport:
    """What :func:`adapt_state_dict` did, for the log."""
    resized: list = field(default_factory=list)  # "key: [old] -> [new]"
    dropped: list = field(default_factory=list)  # key names (or "N buffers ...")
    head: str = 'kept'
    notes: list = field(default_factory=list)
    channels: str = ''  # how the input convolution was adapted to another channel count, if it was

    def log(self, logger: logging.Logger, kept: int) -> None:
        for line in self.notes:
            logger.info(line)
        if self.channels:
            logger.info(self.channels)
        if self.resized:
            logger.info(f"pretrained: resized {len(self.resized)} tensors: " + '; '.join(self.resized))
        if self.dropped:
            logger.info(f"pretrained: dropped {len(self.dropped)} entries: " + ', '.join(self.dropped))
        logger.info(f"pretrained: classifier head {self.head}")
        logger.info(f"pretrained: kept {kept} tensors")


# ---------------------------------------------------------------------------------------- resizing

def resize_rel_pos_bias_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """``((2W-1)^2, nH) -> (new_len, nH)``: bicubic resize of the square grid of relative offsets."""
    old_len, heads = table.shape
    src, dst = math.isqrt(old_len), math.isqrt(new_len)
    if src * src != old_len or dst * dst != new_len:
        raise ValueError(f"relative position tables must be square grids, got {old_len} -> {new_len} rows")
    grid = table.float().t().reshape(1, heads, src, src)
    grid = F.interpolate(grid, size=(dst, dst), mode='bicubic', align_corners=False)
    return grid.reshape(heads, new_len).t().contiguous().to(table.dtype)


def resize_abs_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, L, C) -> (1, gh * gw, C)``: bicubic resize of a square grid of absolute position embeddings."""
    _, length, chans = embed.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"absolute_pos_embed of {length} positions is not a square grid")
    x = embed.float().reshape(1, side, side, chans).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode='bicubic', align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], chans).to(embed.dtype)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB first convolution's weight ``(O, 3, kh, kw)`` for ``in_chans`` input channels, the way timm adapts
    one (``timm.models._manipulate.adapt_input_conv``): one channel takes the sum over R, G and B (a grey image
    then gives what the RGB weights gave on it replicated thrice); any other count repeats R, G, B cyclically,
    scaled by ``3 / in_chans`` so that inputs alike in every channel keep the RGB weights' output scale."""
    out_chans, rgb, kh, kw = weight.shape
    if rgb != 3:
        raise ValueError(f'expected an RGB convolution (O, 3, kh, kw), got {list(weight.shape)}')
    work = weight.float()
    if in_chans == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        adapted = work.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return adapted.to(weight.dtype).contiguous()


def _adapt_input_channels(state: dict, own: dict, report: PretrainedReport) -> None:
    """RGB weights into a model of another input channel count: :func:`adapt_input_conv` on its first
    convolution. Any other difference in that convolution is left for the strict load to report."""
    src, dst = state.get(_INPUT_CONV), own.get(_INPUT_CONV)
    if src is None or dst is None or src.ndim != 4 or src.shape[1] != 3 or src.shape[1] == dst.shape[1]:
        return
    if src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        return
    chans = dst.shape[1]
    state[_INPUT_CONV] = adapt_input_conv(src, chans)
    how = 'summed over R, G and B' if chans == 1 else f'R, G, B repeated and scaled by 3/{chans}'
    report.channels = (f"pretrained: {_INPUT_CONV} adapted from 3 to {chans} input channels ({how}, as timm's "
                       "adapt_input_conv)")


# ---------------------------------------------------------------------------------------- pieces

def read_class_map(path: str) -> list[int]:
    """Row indices of a class-map file: one integer per line (blank lines ignored)."""
    if not os.path.isfile(path):
        raise UserError(f"class map file not found: {path}")
    rows = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if not text.lstrip('-').isdigit():
                raise UserError(f"{path}:{lineno}: expected one class index per line, got {text!r}")
            rows.append(int(text))
    return rows


def strip_simmim_prefix(state: dict, report: Optional[PretrainedReport] = None) -> dict:
    """A SimMIM pre-training state (``encoder.*`` + ``decoder.*``) as a classifier's state."""
    if not any(k.startswith('encoder.') for k in state):
        return state
    if report is not None:
        decoder = [k for k in state if not k.startswith('encoder.')]
        report.notes.append("pretrained: SimMIM pre-training weights: 'encoder.' prefix removed")
        report.dropped += decoder
    return {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}


def _drop_buffers_and_extras(state: dict, report: PretrainedReport) -> dict:
    buffers = [k for k in state if is_derived_buffer(k)]
    extras = [k for k in state if k in _PRETRAIN_ONLY]
    if buffers:
        report.dropped.append(f"{len(buffers)} derived buffers (rebuilt by the model)")
    report.dropped += extras
    # Early SimMIM V2 releases named the position-bias MLP rpe_mlp.
    return {k.replace('rpe_mlp', 'cpb_mlp'): v for k, v in state.items() if k not in buffers and k not in extras}


def _resize_position_tables(state: dict, own: dict, grid: Optional[tuple[int, int]],
                            report: PretrainedReport) -> None:
    for key, value in list(state.items()):
        target = own.get(key)
        if target is None or value.shape == target.shape:
            continue
        if key.endswith('relative_position_bias_table') and value.shape[1] == target.shape[1]:
            state[key] = resize_rel_pos_bias_table(value, target.shape[0])
        elif key.endswith('absolute_pos_embed') and grid is not None and value.shape[-1] == target.shape[-1]:
            state[key] = resize_abs_pos_embed(value, grid)
        else:
            continue  # a real mismatch: reported by the strict load
        report.resized.append(f"{key}: {list(value.shape)} -> {list(target.shape)}")


def _adapt_head(state: dict, model: nn.Module, class_map: Optional[list[int]], report: PretrainedReport) -> None:
    """Keep, map or re-initialise (zeros, as the official loader) the classifier head."""
    head = getattr(model, 'head', None)
    if not isinstance(head, nn.Linear):
        dropped = [k for k in _HEAD_KEYS if k in state]
        for k in dropped:
            del state[k]
        report.head = 'absent in the model (dropped from the weights)' if dropped else 'absent'
        return
    src = state.get('head.weight')
    if src is not None and src.shape == head.weight.shape and class_map is None:
        return
    if src is not None and class_map is not None:
        if len(class_map) != head.out_features:
            raise UserError(f"class map has {len(class_map)} entries but the model has {head.out_features} "
                            "classes (MODEL.NUM_CLASSES)")
        bad = [i for i in class_map if not 0 <= i < src.shape[0]]
        if bad:
            raise UserError(f"class map index {bad[0]} is outside the checkpoint's {src.shape[0]} classes")
        rows = torch.tensor(class_map, dtype=torch.long)
        state['head.weight'] = src[rows]
        if 'head.bias' in state:
            state['head.bias'] = state['head.bias'][rows]
        report.head = f"mapped: {src.shape[0]} -> {len(class_map)} classes through the class map"
        return
    with torch.no_grad():
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    found = f"{src.shape[0]} classes" if src is not None else 'no head'
    state['head.weight'], state['head.bias'] = head.weight.detach().clone(), head.bias.detach().clone()
    report.head = f"re-initialised to zero ({found} in the weights, {head.out_features} in the model)"


def _model_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    embed = getattr(model, 'patch_embed', None)
    for name in ('patches_resolution', 'grid_size'):
        grid = getattr(embed, name, None)
        if grid is not None:
            return tuple(grid)
    return None


def _v2_window_note(state: dict, model: nn.Module, report: PretrainedReport) -> None:
    """Official V2 files carry relative_coords_table, which shows their window: hint at PRETRAINED_WINDOW_SIZES."""
    for name, module in model.named_modules():
        table = state.get(f'{name}.relative_coords_table')
        if table is None or not hasattr(module, 'pretrained_window_size'):
            continue
        old = (table.shape[1] + 1) // 2
        if old != module.window_size[0] and module.pretrained_window_size[0] == 0:
            report.notes.append(f"pretrained: {name} was trained at window {old}, the model uses "
                                f"{module.window_size[0]}; set MODEL.SWINV2.PRETRAINED_WINDOW_SIZES to the "
                                "pre-training windows as the official *_ft configs do")
            return


def adapt_state_dict(state: dict, model: nn.Module, class_map: Optional[list[int]] = None
                     ) -> tuple[dict, PretrainedReport]:
    """Return ``state`` adapted to ``model`` (see the module docstring) and a report of the changes.

    The result may still mismatch (another architecture); :func:`load_pretrained` reports that.
    """
    report = PretrainedReport()
    state = dict(state)
    for prefix in ('module.', '_orig_mod.'):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = strip_simmim_prefix(state, report)
    _v2_window_note(state, model, report)
    state = _drop_buffers_and_extras(state, report)
    own = model.state_dict()
    _adapt_input_channels(state, own, report)
    _resize_position_tables(state, own, _model_grid(model), report)
    _adapt_head(state, model, class_map, report)
    return state, report


# ---------------------------------------------------------------------------------------- entry

def _class_map_for(config, state: dict, model: nn.Module) -> Optional[list[int]]:
    """The class map to use: MODEL.PRETRAINED_CLASS_MAP if the config has it, else the official default
    (data/map22kto1k.txt) when 21841-class weights meet a 1000-class model and that file exists."""
    path = str(config.MODEL.get('PRETRAINED_CLASS_MAP', '') or '')
    if path:
        return read_class_map(path)
    head = getattr(model, 'head', None)
    src = state.get('head.weight', state.get('encoder.head.weight'))
    if (isinstance(head, nn.Linear) and src is not None and src.shape[0] == 21841 and head.out_features == 1000
            and os.path.isfile(DEFAULT_22K_MAP)):
        return read_class_map(DEFAULT_22K_MAP)
    return None


def _state_of(ckpt: dict, path: str) -> dict:
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError(f"{path}: no 'model' entry (found keys: {sorted(ckpt)[:8]})")


def _moe_state(config, path: str, model: nn.Module, logger: logging.Logger) -> Optional[dict]:
    """Swin-MoE weights as the official release ships them: ``NAME.pth`` means the rank files
    ``NAME.pth.rank{R}`` (the experts; regrouped when another number of processes wrote them, see
    utils.moe_checkpoint), merged with ``NAME.pth.master`` (everything else) where that file exists; ``.global``
    (TRAIN.MOE.SAVE_MASTER) as it is. None: an ordinary single file."""
    from utils.checkpoint import checkpoint_tag
    from utils.distributed import get_rank
    from utils.moe_checkpoint import moe_base, rank_file, read_rank_files
    base = moe_base(path)
    tag = checkpoint_tag(config.MODEL.TYPE == 'swin_moe', bool(config.TRAIN.MOE.SAVE_MASTER), get_rank())
    if not base.endswith('.pth'):
        return None
    if tag.startswith('.rank'):
        if not os.path.isfile(rank_file(base, 0)):
            return None
        ckpt, name = read_rank_files(base, model, logger)
        return _state_of(ckpt, name)
    own = base + tag
    if not os.path.exists(local_path(own)):
        return None
    state = _state_of(load_file_safe(local_path(own)), own)
    if os.path.exists(local_path(base + '.master')):
        state = {**state, **_state_of(load_file_safe(local_path(base + '.master')), base + '.master')}
        logger.info(f"merged {own} with {base}.master")
    return state


def read_pretrained(path: str) -> tuple[dict, Layout, str]:
    """The weights at ``path`` (a file, a URL, or a hub snapshot folder) for :func:`load_pretrained`: weights of
    another layout converted to the official one; official and SimMIM ones as saved (:func:`adapt_state_dict` drops
    and reports their extras). Returns ``(state, layout, log line)``; an unrecognised layout is a UserError naming
    the first keys and the closest layout."""
    local = local_path(path)
    if is_snapshot_folder(local):
        snap = read_snapshot(local)
        return snap.state, snap.layout, weights_line(path, snap.layout)
    state, layout = official_state(_state_of(load_file_safe(local), path), path, keep=('simmim',))
    if layout.name == 'unknown':
        to_official(state, path)  # raises the one-line error: first keys, closest layout
    return state, layout, weights_line(path, layout)


def read_for_use(path: str) -> tuple[Snapshot, Optional[object]]:
    """Weights to run a model with (prediction, export): a hub snapshot folder, or a file of any layout (a URL is
    downloaded first), as a :class:`~utils.weight_layouts.Snapshot` in the official layout, with the model
    arguments, class names and preprocessing of a timm / transformers config.json where there is one; and the
    config saved in our checkpoints (YAML text or the official CfgNode; None for others)."""
    local = local_path(path)
    if is_snapshot_folder(local):
        return read_snapshot(local), None
    ckpt = load_file_safe(local)
    return read_snapshot(local, state=_state_of(ckpt, path)), ckpt.get('config')


_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}


def snapshot_config(snapshot: Snapshot):
    """The default config with the model a snapshot's config.json (or its weights) describe: MODEL.TYPE,
    MODEL.NUM_CLASSES, the family's section and DATA.IMG_SIZE, and DATA.MEAN / DATA.STD where its preprocessing
    gives one value per input channel (unfrozen)."""
    cfg = get_default_config()
    merge_opts(cfg, model_opts(snapshot.model_type, snapshot.model_args))
    mean, std = snapshot.preprocessing.get('mean'), snapshot.preprocessing.get('std')
    channels = int(snapshot.model_args.get('in_chans', 3))
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        cfg.DATA.MEAN, cfg.DATA.STD = [float(v) for v in mean], [float(v) for v in std]
    return cfg


def with_model_of(cfg, source):
    """A copy of ``cfg`` (unfrozen) whose model is ``source``'s: MODEL.TYPE, MODEL.NUM_CLASSES, the family's
    section and DATA.IMG_SIZE. The rest (the recipe: data, evaluation, precision) stays ``cfg``'s."""
    out = cfg.clone()
    out.defrost()
    section = _SECTIONS[source.MODEL.TYPE]
    out.MODEL.TYPE, out.MODEL.NUM_CLASSES = source.MODEL.TYPE, source.MODEL.NUM_CLASSES
    out.MODEL[section] = source.MODEL[section].clone()
    out.DATA.IMG_SIZE = source.DATA.IMG_SIZE
    return out


def load_pretrained(config, model: nn.Module, logger: logging.Logger, class_map: Optional[list[int]] = None
                    ) -> PretrainedReport:
    """Initialise ``model`` from MODEL.PRETRAINED for fine-tuning; returns what was changed.

    ``class_map`` overrides the class map otherwise found from the config (see :func:`_class_map_for`).
    """
    path = str(config.MODEL.PRETRAINED)
    logger.info(f"==============> Loading weight {path} for fine-tuning......")
    model = unwrap_model(model)
    state = _moe_state(config, path, model, logger) if config.MODEL.TYPE == 'swin_moe' else None
    if state is None:
        state, layout, line = read_pretrained(path)
    else:
        state, layout = official_state(state, path, keep=('simmim',))
        line = weights_line(path, layout)
    logger.info(line)
    if class_map is None:
        class_map = _class_map_for(config, state, model)
    adapted, report = adapt_state_dict(state, model, class_map)
    load_converted(model, adapted, layout, path)  # strict: one line naming the layout, keys and likely mix-up
    changed = len(report.resized) + (0 if report.head == 'kept' else len(_HEAD_KEYS)) + bool(report.channels)
    report.log(logger, kept=len(adapted) - changed)
    if report.head.startswith('re-initialised') and '21841 classes' in report.head:
        logger.warning(f"22K weights into a {model.head.out_features}-class model without a class map: the head "
                       f"starts from zero; for ImageNet-1K put the official map22kto1k.txt at {DEFAULT_22K_MAP} "
                       "to keep the 1K rows of the 22K head")
    logger.info(f"=> loaded successfully '{path}'")
    return report


# ------------------------------------------------------------------ a model config for using weights

def _merge_saved(cfg, saved) -> None:
    """Merge a config saved in a checkpoint: YAML text (ours) or a mapping (official CfgNode)."""
    data = saved if isinstance(saved, str) else yaml.safe_dump(_plain(saved))
    with tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False) as f:
        f.write(data)
    try:
        merge_yaml(cfg, f.name)
    finally:
        os.remove(f.name)


def _plain(node):
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    return list(node) if isinstance(node, tuple) else node


def build_config(args, saved=None, snapshot: Optional[Snapshot] = None):
    """The model's config for predict.py and tools.export (``args``: cfg, opts, weights[, native_size]): --cfg, else the one ``saved`` in our checkpoint, else the ``snapshot``'s timm or
    transformers config.json; then --opts."""
    cfg = get_default_config()
    if args.cfg:
        merge_yaml(cfg, args.cfg)
    elif saved is not None:
        try:
            _merge_saved(cfg, saved)
        except UserError as e:
            raise UserError(f"{args.weights}: its saved config does not load ({e}); pass --cfg") from None
    elif snapshot is not None and snapshot.config_kind:
        cfg = snapshot_config(snapshot)
    else:
        raise UserError(f"{args.weights} holds no config: pass the model's --cfg")
    if args.opts:
        merge_opts(cfg, list(args.opts))
    if getattr(args, 'native_size', False):
        cfg.MODEL.DYNAMIC_IMG_SIZE = True
    cfg.freeze()
    return cfg
