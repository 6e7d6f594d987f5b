"""The configuration tree: every key and default of the official Swin framework, plus ours.

A run's configuration is built once, in this order, and then frozen:
defaults -> YAML file (its ``BASE:`` files first, paths relative to the including file)
-> ``--opts KEY VALUE`` pairs -> the other command-line flags.

Keys and defaults of the official framework keep their names; the keys we add are marked
"(ours)". Unknown keys and values of the wrong type are a :class:`UserError` naming the key.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any, Optional, Sequence, Tuple, Union

import yaml
from yacs.config import CfgNode as CN

from utils.errors import UserError

_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'  # or 'imagenet22K'
_C.DATA.IMG_SIZE = 224  # or [H, W] (ours): a non-square input
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'  # no | full | part
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.MASK_PATCH_SIZE = 32  # SimMIM
_C.DATA.MASK_RATIO = 0.6  # SimMIM
_C.DATA.MAX_BAD_FRACTION = 0.01  # (ours) share of unreadable training images that stops a run
_C.DATA.FAST_LOADER = True  # (ours) uint8 workers + batch-level normalisation
# (ours) per-channel normalisation, as many values as the model's IN_CHANS (default: ImageNet's RGB statistics)
_C.DATA.MEAN = [0.485, 0.456, 0.406]
_C.DATA.STD = [0.229, 0.224, 0.225]
# (ours) layout of DATA_PATH: '' (folder, or zip with ZIP_MODE) | folder | zip | wds (tar shards) | parquet
_C.DATA.FORMAT = ''
# (ours) wds/parquet: the split's shard files, relative to DATA_PATH or URLs: a brace pattern
# ('train/train-{000000..000146}.tar'), a glob or a comma-separated list; '' finds them in DATA_PATH
_C.DATA.TRAIN_SHARDS = ''
_C.DATA.VAL_SHARDS = ''
_C.DATA.PARQUET_IMAGE_COLUMN = 'image'  # (ours) bytes, or a struct with a 'bytes' field (HF Image)
_C.DATA.PARQUET_LABEL_COLUMN = 'label'  # (ours) integer class index
# (ours) multi-label data: a CSV of 'path,labels' rows (paths relative to DATA_PATH, starting with the split:
# train/..., val/...; labels separated by spaces or ';'), for the folder and zip layouts (data/label_file.py)
_C.DATA.LABEL_FILE = ''
_C.DATA.CLASSES_FILE = ''  # (ours) the class names of DATA.LABEL_FILE, one a line (else its header or its labels)

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'swin'
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
_C.MODEL.PRETRAINED = ''
_C.MODEL.PRETRAINED_CLASS_MAP = ''  # (ours) file of class indices (one a line) picking head rows from --pretrained
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.DYNAMIC_IMG_SIZE = False  # (ours) any input size, padded as the official detection backbone

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True

_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]

# Swin-MoE needs the tutel library; the keys are kept so official configs parse.
_C.MODEL.SWIN_MOE = CN()
_C.MODEL.SWIN_MOE.PATCH_SIZE = 4
_C.MODEL.SWIN_MOE.IN_CHANS = 3
_C.MODEL.SWIN_MOE.EMBED_DIM = 96
_C.MODEL.SWIN_MOE.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MOE.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MOE.WINDOW_SIZE = 7
_C.MODEL.SWIN_MOE.MLP_RATIO = 4.
_C.MODEL.SWIN_MOE.QKV_BIAS = True
_C.MODEL.SWIN_MOE.QK_SCALE = None
_C.MODEL.SWIN_MOE.APE = False
_C.MODEL.SWIN_MOE.PATCH_NORM = True
_C.MODEL.SWIN_MOE.MLP_FC2_BIAS = True
_C.MODEL.SWIN_MOE.INIT_STD = 0.02
_C.MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
_C.MODEL.SWIN_MOE.MOE_BLOCKS = [[-1], [-1], [-1], [-1]]
_C.MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS = 1
_C.MODEL.SWIN_MOE.TOP_VALUE = 1
_C.MODEL.SWIN_MOE.CAPACITY_FACTOR = 1.25
_C.MODEL.SWIN_MOE.COSINE_ROUTER = False
_C.MODEL.SWIN_MOE.NORMALIZE_GATE = False
_C.MODEL.SWIN_MOE.USE_BPR = True
_C.MODEL.SWIN_MOE.IS_GSHARD_LOSS = False
_C.MODEL.SWIN_MOE.GATE_NOISE = 1.0
_C.MODEL.SWIN_MOE.COSINE_ROUTER_DIM = 256
_C.MODEL.SWIN_MOE.COSINE_ROUTER_INIT_T = 0.5
_C.MODEL.SWIN_MOE.MOE_DROP = 0.0
_C.MODEL.SWIN_MOE.AUX_LOSS_WEIGHT = 0.01

_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True

_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
_C.TRAIN.KEEP_CKPTS = 0  # (ours) keep only the newest N epoch checkpoints; 0 keeps all
_C.TRAIN.SAVE_BEST = True  # (ours) keep model_best.pth: the checkpoint of the best validation score so far
_C.TRAIN.BEST_METRIC = 'acc1'  # (ours) the score that picks model_best.pth: acc1 (the model's) or ema_acc1
# (ours) every N optimizer steps a resumable mid-epoch checkpoint replaces the previous one (0: off), so a node
# that dies without warning loses at most N steps
_C.TRAIN.SAVE_STEPS = 0
_C.TRAIN.COMPILE = False  # (ours) torch.compile the model
_C.TRAIN.MAX_NONFINITE_STEPS = 20  # (ours) consecutive steps with inf/NaN loss or gradients that stop a run
# (ours) auto: binary cross-entropy for multi-label data (DATA.LABEL_FILE), else the official cross-entropy;
# ce: the official; bce: timm's BinaryCrossEntropy (single-label data too), smoothing from MODEL.LABEL_SMOOTHING
_C.TRAIN.LOSS = 'auto'
_C.TRAIN.BCE_TARGET_THRESHOLD = None  # (ours) bce: soft targets above this become 1, the others 0 (timm's)

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

_C.TRAIN.LAYER_DECAY = 1.0
# (ours) freezing (fine-tuning, linear probing): frozen parameters get no gradient and no optimizer state, and frozen
# stages run in eval mode (no dropout, no drop path). FROZEN_STAGES k: the patch embedding (and absolute position
# embedding) and the first k stages, the backbone's frozen_stages rule (0: the embedding only; -1: nothing).
# HEAD_ONLY: everything but the classifier head (a linear probe).
_C.TRAIN.FROZEN_STAGES = -1
_C.TRAIN.HEAD_ONLY = False

_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False

# (ours) ddp: a full copy of weights, gradients and optimizer state per rank; fsdp: each sharded over the ranks
# (FSDP2 fully_shard, utils/sharding.py)
_C.TRAIN.SHARDING = 'ddp'
_C.TRAIN.SHARDED_CKPT = False  # (ours) fsdp runs: each rank writes its shards (torch.distributed.checkpoint)
_C.TRAIN.FSDP = CN()  # (ours)
_C.TRAIN.FSDP.REDUCE_DTYPE = 'float32'  # gradient reduce-scatter dtype: float32, bfloat16 or float16
_C.TRAIN.FSDP.RESHARD_AFTER_FORWARD = True  # free gathered weights after forward (less memory, one more gather)
_C.TRAIN.EMA = CN()  # (ours) exponential moving average of the weights
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'
_C.AUG.REPEATED_AUG = 0  # (ours) repeated augmentation: 0 off, N >= 2 repeats
_C.AUG.RRC_SCALE = [0.08, 1.0]  # (ours) random resized crop: range of the crop's share of the image area
_C.AUG.RRC_RATIO = [3 / 4, 4 / 3]  # (ours) random resized crop: range of the crop's aspect ratio (w / h)
_C.AUG.HFLIP = 0.5  # (ours) probability of a horizontal flip
_C.AUG.VFLIP = 0.0  # (ours) probability of a vertical flip

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.CROP_PCT = 224 / 256  # (ours) with CROP: resize the short side to IMG_SIZE / CROP_PCT, then centre-crop
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False
_C.TEST.THRESHOLD = 0.5  # (ours) multi-label: a class is predicted when its sigmoid score is >= this (F1)
# (ours) write per-class accuracy / AP and the confusion matrix as CSV to the output folder: after --eval, and
# after the last epoch of training (utils/per_class.py); the flag --per-class sets it
_C.TEST.PER_CLASS = False

# ----------------------------------------------------------------------------- distillation (ours)
# A teacher's logits join the loss: loss = (1 - ALPHA) * base + ALPHA * distillation (distillation.py). Off while
# TEACHER_WEIGHTS is empty.
_C.DISTILL = CN()
_C.DISTILL.TEACHER_CFG = ''  # the teacher's YAML (default: the config saved in TEACHER_WEIGHTS, or its config.json)
_C.DISTILL.TEACHER_WEIGHTS = ''  # any file or hub snapshot folder --pretrained reads
_C.DISTILL.TYPE = 'soft'  # soft: KL divergence at temperature TAU (x TAU^2); hard: CE on the teacher's argmax
_C.DISTILL.TAU = 1.0
_C.DISTILL.ALPHA = 0.5

# ----------------------------------------------------------------------------- run trackers (ours)
# Beside TensorBoard (always on): wandb, mlflow (tracking.py); rank 0 only.
_C.LOG = CN()
_C.LOG.BACKENDS = []
_C.LOG.PROJECT = ''  # W&B project / MLflow experiment; '' : swin_transformer
_C.LOG.MLFLOW_URI = ''  # '' : MLFLOW_TRACKING_URI if set, else file:OUTPUT/mlruns

# ----------------------------------------------------------------------------- misc
_C.ENABLE_AMP = False  # SimMIM scripts
_C.AMP_ENABLE = True
_C.AMP_OPT_LEVEL = ''  # deprecated (apex)
_C.AMP_DTYPE = 'auto'  # (ours) auto: bfloat16 where native (GPU sm80+, CPU AVX512-BF16/AMX/Arm BF16), else
#                        float16 on CUDA, float32 on CPU; or float16 / bfloat16
_C.HOST_MEMORY_CACHE = True  # (ours) CPU runs: keep freed host memory for reuse (glibc malloc), utils/host_memory.py
_C.CPU_KERNELS = True  # (ours) CPU runs: swap in our CPU modules and kernels (models/cpu); False: the reference model
_C.ALLOW_TF32 = True  # (ours) CUDA runs: TF32 tensor cores for fp32 matmuls and convolutions
# (ours) Runs of several processes: when one rank fails, the others end within a few seconds with its message;
# a rank that stops answering ends them after this many seconds (utils/peers.py). 0: no watch.
_C.PEER_TIMEOUT = 120.0
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False

# The section holding each MODEL.TYPE's own keys (PATCH_SIZE, IN_CHANS, ...).
MODEL_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_moe': 'SWIN_MOE', 'swin_mlp': 'SWIN_MLP'}

# Keys that take an int or a pair [H, W].
_SIZE_KEYS = frozenset({'DATA.IMG_SIZE'})
# Keys whose default is None accept any value; these are the types a value may have.
_NONE_DEFAULT_TYPES = {'MODEL.SWIN.QK_SCALE': (int, float), 'MODEL.SWIN_MOE.QK_SCALE': (int, float),
                       'AUG.CUTMIX_MINMAX': (list, tuple), 'TRAIN.BCE_TARGET_THRESHOLD': (int, float)}


def get_default_config() -> CN:
    """An unfrozen copy of the defaults."""
    return _C.clone()


def img_size_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``(height, width)`` of a ``DATA.IMG_SIZE`` value: an int (a square) or ``[H, W]``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _coerce_size(value: Any, key: str) -> Union[int, list]:
    """An image size key: an int, or a pair [H, W] of ints (a one-element list means a square)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    items = list(value) if pair else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise UserError(f"bad value for config key {key}: {value!r} (expected an int or a pair [H, W] of ints)")
    if min(items) < 1:
        raise UserError(f"bad value for config key {key}: {value!r} (sides must be >= 1)")
    return items if pair else items[0]


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise UserError naming ``key``."""
    if isinstance(value, str) and not isinstance(default, str):
        # As yacs does: YAML reads '5e-4' as a string, and --opts values arrive as text.
        value = _parse_opt_value(value)
    if key in _SIZE_KEYS:
        return _coerce_size(value, key)
    if value is None or default is None:
        allowed = _NONE_DEFAULT_TYPES.get(key)
        if value is None or allowed is None or isinstance(value, allowed):
            return value
        raise UserError(f"bad value for config key {key}: {value!r} (expected one of "
                        f"{', '.join(t.__name__ for t in allowed)} or null)")
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif type(value) is type(default):
        return value
    raise UserError(f"bad value for config key {key}: {value!r} (expected {type(default).__name__}, "
                    f"like the default {default!r})")


def _merge_dict(cfg: CN, values: dict, prefix: str = '') -> None:
    """Merge a nested dict into ``cfg`` in place, checking every key and type."""
    for name, value in values.items():
        key = f'{prefix}{name}'
        if name not in cfg:
            raise UserError(f"unknown config key: {key}")
        if isinstance(cfg[name], CN):
            if not isinstance(value, dict):
                raise UserError(f"bad value for config key {key}: expected a section of keys, got {value!r}")
            _merge_dict(cfg[name], value, prefix=f'{key}.')
        else:
            cfg[name] = _coerce(value, cfg[name], key)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f" (line {mark.line + 1})" if mark is not None else ''
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def merge_yaml(cfg: CN, path: str, _seen: tuple[str, ...] = ()) -> None:
    """Merge a YAML file into ``cfg``: its ``BASE`` files first (relative to it), then its own keys."""
    path = os.path.abspath(path)
    if path in _seen:
        raise UserError(f"config file {path} includes itself through BASE")
    data = _read_yaml(path)
    bases = data.pop('BASE', None) or []
    if isinstance(bases, str):
        bases = [bases]
    for base in bases:
        if base:
            merge_yaml(cfg, os.path.join(os.path.dirname(path), base), _seen + (path,))
    try:
        _merge_dict(cfg, data)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _parse_opt_value(text: str) -> Any:
    """Read a ``--opts`` value as a Python literal where it is one, else as a plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_opts(cfg: CN, opts: list[str]) -> None:
    """Apply ``--opts KEY VALUE ...`` pairs (dotted keys) to ``cfg``."""
    if len(opts) % 2:
        raise UserError(f"--opts needs KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, text in zip(opts[0::2], opts[1::2]):
        *parents, leaf = key.split('.')
        node = cfg
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], CN):
                raise UserError(f"unknown config key: {key} (in --opts)")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], CN):
            raise UserError(f"unknown config key: {key} (in --opts)")
        try:
            node[leaf] = _coerce(text, node[leaf], key)
        except UserError as e:
            raise UserError(f"{e} (in --opts)") from None


# Command-line flags (argparse dest) -> the config key they set, applied when not None/False.
_FLAG_KEYS = {
    'batch_size': 'DATA.BATCH_SIZE', 'data_path': 'DATA.DATA_PATH', 'cache_mode': 'DATA.CACHE_MODE',
    'data_format': 'DATA.FORMAT',
    'pretrained': 'MODEL.PRETRAINED', 'resume': 'MODEL.RESUME',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS', 'output': 'OUTPUT', 'tag': 'TAG',
    'optim': 'TRAIN.OPTIMIZER.NAME', 'amp_dtype': 'AMP_DTYPE', 'sharding': 'TRAIN.SHARDING',
    'teacher_cfg': 'DISTILL.TEACHER_CFG', 'teacher_weights': 'DISTILL.TEACHER_WEIGHTS',
}
# Boolean flags -> (config key, value set when the flag is given).
_SWITCH_KEYS = {
    'zip': ('DATA.ZIP_MODE', True), 'use_checkpoint': ('TRAIN.USE_CHECKPOINT', True),
    'disable_amp': ('AMP_ENABLE', False), 'enable_amp': ('ENABLE_AMP', True),
    'eval': ('EVAL_MODE', True), 'throughput': ('THROUGHPUT_MODE', True),
    'fused_window_process': ('FUSED_WINDOW_PROCESS', True), 'fused_layernorm': ('FUSED_LAYERNORM', True),
    'compile': ('TRAIN.COMPILE', True), 'per_class': ('TEST.PER_CLASS', True),
}


def _set_key(cfg: CN, key: str, value: Any) -> None:
    *parents, leaf = key.split('.')
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = _coerce(value, node[leaf], key)


def update_config(cfg: CN, args: Any) -> None:
    """Fold a YAML file, ``--opts`` and the command-line flags of ``args`` into ``cfg`` (in place)."""
    if getattr(args, 'cfg', None):
        merge_yaml(cfg, args.cfg)
    if getattr(args, 'opts', None):
        merge_opts(cfg, list(args.opts))
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            _set_key(cfg, key, value)
    for dest, (key, value) in _SWITCH_KEYS.items():
        if getattr(args, dest, False):
            _set_key(cfg, key, value)
    if getattr(args, 'log', None):  # --log wandb --log mlflow, or --log wandb,mlflow
        names = [name.strip() for value in args.log for name in value.split(',') if name.strip()]
        cfg.LOG.BACKENDS = list(dict.fromkeys(names))
    if getattr(args, 'amp_opt_level', None):
        # apex's opt levels are gone; O0 (pure fp32) is the only one that still means something.
        cfg.AMP_OPT_LEVEL = args.amp_opt_level
        if args.amp_opt_level == 'O0':
            cfg.AMP_ENABLE = False
    if cfg.DATA.DATASET == 'imagenet22K' and cfg.MODEL.NUM_CLASSES == _C.MODEL.NUM_CLASSES:
        # The official 22K configs leave NUM_CLASSES at 1000 and rely on the loader forcing 21841.
        cfg.MODEL.NUM_CLASSES = 21841
    cfg.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', cfg.LOCAL_RANK)))
    cfg.OUTPUT = os.path.join(cfg.OUTPUT or 'output', cfg.MODEL.NAME, cfg.TAG)
    _check_values(cfg)


# Keys with a closed set of values.
_CHOICES = {
    'DATA.CACHE_MODE': ('no', 'full', 'part'), 'DATA.DATASET': ('imagenet', 'imagenet22K'),
    'DATA.FORMAT': ('', 'folder', 'zip', 'wds', 'parquet'),
    'MODEL.TYPE': ('swin', 'swinv2', 'swin_moe', 'swin_mlp'), 'AMP_DTYPE': ('auto', 'float16', 'bfloat16'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step', 'multistep'), 'TRAIN.SHARDING': ('ddp', 'fsdp'),
    'TRAIN.FSDP.REDUCE_DTYPE': ('float32', 'bfloat16', 'float16'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'), 'TRAIN.BEST_METRIC': ('acc1', 'ema_acc1'),
    'DISTILL.TYPE': ('soft', 'hard'),
    'TRAIN.LOSS': ('auto', 'ce', 'bce'),
}
LOG_BACKENDS = ('wandb', 'mlflow')
# Keys that must be at least this number.
_MINIMUM = {'DATA.BATCH_SIZE': 1, 'DATA.NUM_WORKERS': 0, 'MODEL.NUM_CLASSES': 1,
            'TRAIN.EPOCHS': 1, 'TRAIN.ACCUMULATION_STEPS': 1, 'SAVE_FREQ': 1, 'PRINT_FREQ': 1,
            'TRAIN.WARMUP_EPOCHS': 0, 'TRAIN.KEEP_CKPTS': 0, 'TRAIN.MAX_NONFINITE_STEPS': 0,
            'TRAIN.SAVE_STEPS': 0, 'PEER_TIMEOUT': 0.0, 'TRAIN.FROZEN_STAGES': -1}


def _get_key(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return node


def _check_values(cfg: CN) -> None:
    for key, choices in _CHOICES.items():
        value = _get_key(cfg, key)
        if value not in choices:
            raise UserError(f"bad value for config key {key}: {value!r} (choose from {', '.join(choices)})")
    for key, minimum in _MINIMUM.items():
        value = _get_key(cfg, key)
        if value < minimum:
            raise UserError(f"bad value for config key {key}: {value!r} (must be >= {minimum})")
    if cfg.DATA.ZIP_MODE and cfg.DATA.FORMAT not in ('', 'zip'):
        raise UserError(f"--zip (DATA.ZIP_MODE True) conflicts with DATA.FORMAT {cfg.DATA.FORMAT} "
                        "(--data-format): give one of them")
    if not 0.0 <= cfg.DATA.MAX_BAD_FRACTION <= 1.0:
        raise UserError(f"bad value for config key DATA.MAX_BAD_FRACTION: {cfg.DATA.MAX_BAD_FRACTION!r} "
                        "(must be between 0 and 1)")
    if cfg.TRAIN.SHARDED_CKPT and cfg.TRAIN.SHARDING != 'fsdp':
        raise UserError("TRAIN.SHARDED_CKPT True needs TRAIN.SHARDING fsdp (a ddp run writes the single file)")
    if cfg.TRAIN.BEST_METRIC == 'ema_acc1' and not cfg.TRAIN.EMA.ENABLE:
        raise UserError("TRAIN.BEST_METRIC ema_acc1 needs TRAIN.EMA.ENABLE True")
    _check_distill_and_log(cfg)
    _check_label_keys(cfg)


def _check_distill_and_log(cfg: CN) -> None:
    unknown = [name for name in cfg.LOG.BACKENDS if name not in LOG_BACKENDS]
    if unknown:
        raise UserError(f"bad value for config key LOG.BACKENDS (--log): {unknown[0]!r} (choose from "
                        f"{', '.join(LOG_BACKENDS)}; TensorBoard is always on)")
    if not 0.0 <= cfg.DISTILL.ALPHA <= 1.0:
        raise UserError(f"bad value for config key DISTILL.ALPHA: {cfg.DISTILL.ALPHA!r} (must be between 0 and 1)")
    if cfg.DISTILL.TAU <= 0:
        raise UserError(f"bad value for config key DISTILL.TAU: {cfg.DISTILL.TAU!r} (must be > 0)")
    if cfg.DISTILL.TEACHER_CFG and not cfg.DISTILL.TEACHER_WEIGHTS:
        raise UserError("DISTILL.TEACHER_CFG (--teacher-cfg) needs the teacher's weights: --teacher-weights PATH "
                        "(DISTILL.TEACHER_WEIGHTS); a teacher with random weights teaches nothing")


def _check_label_keys(cfg: CN) -> None:
    """Multi-label data, the binary loss and the evaluation threshold."""
    if not 0.0 < cfg.TEST.THRESHOLD < 1.0:
        raise UserError(f"bad value for config key TEST.THRESHOLD: {cfg.TEST.THRESHOLD!r} (must be between 0 and 1)")
    threshold = cfg.TRAIN.BCE_TARGET_THRESHOLD
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise UserError(f"bad value for config key TRAIN.BCE_TARGET_THRESHOLD: {threshold!r} (must be in [0, 1))")
    if cfg.DATA.CLASSES_FILE and not cfg.DATA.LABEL_FILE:
        raise UserError("DATA.CLASSES_FILE names the classes of DATA.LABEL_FILE: set DATA.LABEL_FILE too")
    if not cfg.DATA.LABEL_FILE:
        return
    if cfg.TRAIN.LOSS == 'ce':
        raise UserError("multi-label data (DATA.LABEL_FILE) trains with TRAIN.LOSS bce (or auto), not ce")
    if cfg.DATA.DATASET == 'imagenet22K':
        raise UserError("DATA.LABEL_FILE is for the folder and zip layouts, not DATA.DATASET imagenet22K")


def get_config(args: Any) -> CN:
    """Build the frozen configuration of a run from an argparse namespace (``cfg``, ``opts``, flags)."""
    cfg = get_default_config()
    update_config(cfg, args)
    cfg.freeze()
    return cfg


def scale_learning_rates(cfg: CN, world_size: int) -> CN:
    """Return a frozen copy whose learning rates are scaled linearly by the total batch over 512.

    As the official framework: lr = BASE_LR * BATCH_SIZE * world_size / 512 (WARMUP_LR and MIN_LR
    likewise), times ACCUMULATION_STEPS when gradients are accumulated.
    """
    factor = cfg.DATA.BATCH_SIZE * world_size / 512.0 * cfg.TRAIN.ACCUMULATION_STEPS
    scaled = cfg.clone()
    scaled.defrost()
    scaled.TRAIN.BASE_LR = cfg.TRAIN.BASE_LR * factor
    scaled.TRAIN.WARMUP_LR = cfg.TRAIN.WARMUP_LR * factor
    scaled.TRAIN.MIN_LR = cfg.TRAIN.MIN_LR * factor
    scaled.freeze()
    return scaled


# ----------------------------------------------------------------------------- command line

def build_arg_parser(description: str = 'Swin Transformer training and evaluation script') -> argparse.ArgumentParser:
    """The official flags, plus a few of ours (marked)."""
    parser = argparse.ArgumentParser(description, add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar="FILE", help='path to config file')
    parser.add_argument("--opts", help="Modify config options by adding 'KEY VALUE' pairs.", default=None,
                        nargs='+')
    parser.add_argument('--batch-size', type=int, help="batch size for single GPU")
    parser.add_argument('--data-path', type=str, help='path to dataset')
    parser.add_argument('--zip', action='store_true', help='use zipped dataset instead of folder dataset')
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                        help='no: no cache, full: cache all data, part: shard the dataset into pieces '
                             'and cache only one piece per process')
    parser.add_argument('--pretrained', help='pretrained weight from checkpoint, could be imagenet22k pretrained')
    parser.add_argument('--resume', help='resume from checkpoint')
    parser.add_argument('--accumulation-steps', type=int, help="gradient accumulation steps")
    parser.add_argument('--use-checkpoint', action='store_true', help="whether to use gradient checkpointing")
    parser.add_argument('--disable_amp', action='store_true', help='Disable pytorch amp')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help='deprecated (apex); O0 disables mixed precision')
    parser.add_argument('--output', default='output', type=str, metavar='PATH',
                        help='root of output folder, the full path is <output>/<model_name>/<tag> (default: output)')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--throughput', action='store_true', help='Test throughput only')
    parser.add_argument('--fused_window_process', action='store_true', help='Fused window shift & partition')
    parser.add_argument('--fused_layernorm', action='store_true', help='Use fused layernorm.')
    parser.add_argument('--optim', type=str, help='overwrite optimizer if provided, can be adamw/sgd/fused_adam '
                        "(ours: or one of timm's, e.g. lamb, lion; see TRAIN.OPTIMIZER.NAME)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help='ignored: the launcher sets LOCAL_RANK')
    # ours
    parser.add_argument('--amp-dtype', type=str, choices=['auto', 'float16', 'bfloat16'],
                        help='(ours) mixed-precision type; auto: bfloat16 where the GPU or CPU computes it natively, '
                             'else float16 on CUDA, float32 on CPU')
    parser.add_argument('--compile', action='store_true', help='(ours) torch.compile the model')
    parser.add_argument('--sharding', choices=['ddp', 'fsdp'], help='(ours) TRAIN.SHARDING')
    parser.add_argument('--log', action='append', metavar='wandb|mlflow',
                        help='(ours) also log to Weights & Biases / MLflow (repeat, or a comma list): LOG.BACKENDS')
    parser.add_argument('--teacher-cfg', type=str, metavar='FILE',
                        help="(ours) distillation: the teacher's config (DISTILL.TEACHER_CFG)")
    parser.add_argument('--teacher-weights', type=str, metavar='PATH',
                        help="(ours) distillation: the teacher's weights, any layout --pretrained reads "
                             "(DISTILL.TEACHER_WEIGHTS)")
    parser.add_argument('--data-format', choices=['folder', 'zip', 'wds', 'parquet'],
                        help='(ours) DATA.FORMAT: image folder (default), official zip (as --zip), '
                             'WebDataset tar shards or Parquet files')
    parser.add_argument('--per-class', action='store_true',
                        help='(ours) TEST.PER_CLASS: write per-class accuracy / AP and the confusion matrix as CSV')
    return parser


# The SimMIM scripts spell the amp switches with hyphens; AMP is on by default in both.
_SIMMIM_AMP_FLAGS = {'--disable-amp': ['--disable_amp'], '--enable-amp': [], '--enable_amp': []}


def parse_command_line(argv: Optional[list[str]] = None, simmim_spellings: bool = False) -> tuple[Any, CN]:
    """The official command line (``argv``, default sys.argv[1:]) -> (args, frozen config). With
    ``simmim_spellings`` the SimMIM scripts' ``--enable-amp`` / ``--disable-amp`` are accepted too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if simmim_spellings:
        argv = [new for arg in argv for new in _SIMMIM_AMP_FLAGS.get(arg, [arg])]
    args = build_arg_parser().parse_args(argv)
    return args, get_config(args)
