"""Evaluate a folder (or glob) of checkpoints on the validation set: a table sorted by Acc@1, and a CSV.

    python validate.py --cfg CFG --data-path DIR --checkpoints output/swin_tiny/default
    torchrun --nproc_per_node 4 validate.py --cfg CFG --data-path DIR --checkpoints 'runs/*/model_best.pth' \\
        --results-file results.csv

    python validate.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path IMAGENET \\
        --checkpoints 'released/*.pth'       # the official model zoo's table: measured next to reported

Every checkpoint is evaluated as ``main.py --eval --resume CKPT`` does (the same loader, precision and exact
sharded validation, so the figures do not depend on the number of processes). A folder contributes its
``*.pth``, ``*.bin`` and ``*.safetensors`` files and its hub snapshot sub-folders; a hub snapshot folder
(timm or transformers: ``config.json`` + weights) is one checkpoint. Weights of any layout utils.weight_layouts
reads are converted, and the log names the layout. A checkpoint that cannot be read or does not fit the model
gets a row with its error and the run exits 1 after the others are evaluated.

The model is ``--cfg``'s, except for checkpoints that say what they are: a snapshot folder's config.json, or
an official released file (recognised by its file name and keys, see utils.weight_layouts.OFFICIAL_ZOO) whose
config is under configs/ here. Their model and image size replace ``--cfg``'s, which still sets the rest
(data, evaluation, precision). Next to a released file's Acc@1/Acc@5 the table shows what the official model
zoo reports and the difference (CSV columns zoo_acc1, zoo_acc5, diff_acc1, diff_acc5).

Multi-label data (DATA.LABEL_FILE) are ranked by mAP, with the macro and micro F1 at TEST.THRESHOLD (columns
map, f1_macro, f1_micro). ``--per-class`` writes each checkpoint's per-class accuracy / AP and confusion matrix
to the output folder (utils/per_class.py): ``per_class.csv`` and ``confusion_matrix.csv`` for one checkpoint,
``per_class-<name>.csv`` and ``confusion_matrix-<name>.csv`` for several (:func:`per_class_names`).
"""
from __future__ import annotations

import csv
import glob
import os
import sys
from typing import Optional

import torch

from config import build_arg_parser, get_config, get_default_config, merge_yaml
from data import build_loader
from engine import EvalOptions, evaluate
from launch import open_run_log, run
from models import build_model
from utils.amp import resolve_amp
from utils.checkpoint import load_converted, read_weights
from utils.distributed import DistEnv, unwrap_model
from utils.errors import UserError
from utils.per_class import write_per_class
from utils.pretrained import snapshot_config, with_model_of
from utils.weight_layouts import ZooEntry, is_snapshot_folder, zoo_entry, zoo_line

RESULT_COLUMNS = ('checkpoint', 'epoch', 'acc1', 'acc5', 'loss', 'zoo_acc1', 'zoo_acc5', 'diff_acc1', 'diff_acc5',
                  'map', 'f1_macro', 'f1_micro', 'error')
REPO = os.path.dirname(os.path.abspath(__file__))
_WEIGHT_EXTENSIONS = ('.pth', '.bin', '.safetensors')


def parse_option(argv: Optional[list[str]] = None):
    """main.py's flags plus --checkpoints, --results-file and --use-ema; evaluation mode is implied."""
    parser = build_arg_parser('Evaluate many Swin Transformer checkpoints')
    parser.add_argument('--checkpoints', required=True, metavar='DIR_OR_GLOB',
                        help='a folder of checkpoints, a glob pattern (quote it), or one file')
    parser.add_argument('--results-file', metavar='CSV', help='also write the table to this CSV file')
    parser.add_argument('--use-ema', action='store_true', help="evaluate each checkpoint's 'model_ema' weights")
    args = parser.parse_args(argv)
    args.eval = True
    return args, get_config(args)


def find_checkpoints(spec: str) -> list[str]:
    """The checkpoints named by ``spec``: a hub snapshot folder; a folder's .pth / .bin / .safetensors files and
    snapshot sub-folders; a glob's files and snapshot folders; a file."""
    if is_snapshot_folder(spec):
        return [spec]
    if os.path.isdir(spec):
        paths = [os.path.join(spec, name) for name in os.listdir(spec)]
        paths = [p for p in paths if p.endswith(_WEIGHT_EXTENSIONS) or is_snapshot_folder(p)]
    else:
        paths = glob.glob(spec) if glob.has_magic(spec) else [spec] if os.path.exists(spec) else []
    paths = sorted(p for p in paths if os.path.isfile(p) or is_snapshot_folder(p))
    if not paths:
        raise UserError(f"--checkpoints {spec}: no checkpoint files (.pth, .bin, .safetensors) or hub snapshot "
                        "folders there")
    return paths


def checkpoint_config(config, path: str, weights: dict) -> tuple[object, Optional[ZooEntry], str]:
    """The config to evaluate ``path`` with, the official zoo's entry for it, and where its model comes from ('' for
    ``config``'s own): a snapshot folder's config.json, or the config of a released file under configs/ here."""
    entry = zoo_entry(path, weights['state']) if weights['layout'].name == 'official' else None
    if weights['snapshot'] is not None and weights['snapshot'].config_kind:
        return with_model_of(config, snapshot_config(weights['snapshot'])), None, f"{path}/config.json"
    if entry is not None and entry.config and os.path.isfile(os.path.join(REPO, entry.config)):
        released = get_default_config()
        merge_yaml(released, os.path.join(REPO, entry.config))
        cfg = with_model_of(config, released)
        # the zoo's figures were measured with the released config's evaluation (no crop at 384 px)
        cfg.TEST.CROP, cfg.DATA.INTERPOLATION = released.TEST.CROP, released.DATA.INTERPOLATION
        return cfg, entry, entry.config
    return config, entry, ''


class Evaluator:
    """Builds the model (one at a time) and the validation loaders (one per image size) the checkpoints need, and
    evaluates each checkpoint with them."""

    def __init__(self, config, env: DistEnv, loader_val, logger, per_class_names: Optional[dict] = None):
        self.env, self.logger = env, logger
        self.per_class_names = per_class_names or {}  # checkpoint -> suffix of its per-class files
        _, self.amp_dtype = resolve_amp(config, env.device)  # the precision is the run's, whatever the model
        self.loaders = {self._loader_key(config): loader_val}
        self.model, self.model_key = None, None

    def _model(self, config) -> torch.nn.Module:
        key = config.MODEL.dump() + str(config.DATA.IMG_SIZE)
        if key != self.model_key:
            self.model = None  # the previous model's memory first
            self.model, self.model_key = build_model(config, device=self.env.device).to(self.env.device), key
        return self.model

    @staticmethod
    def _loader_key(config) -> str:
        """What a validation loader depends on that differs between checkpoints."""
        return f"{config.DATA.IMG_SIZE} {config.TEST.CROP} {config.DATA.INTERPOLATION}"

    def _loader(self, config):
        key = self._loader_key(config)
        if key not in self.loaders:
            loader = build_loader(config)[3]
            if self.env.device.type == 'cuda':
                loader.finish_on = self.env.device
            self.loaders[key] = loader
        return self.loaders[key]

    def evaluate(self, config, path: str, use_ema: bool) -> dict:
        """One row of the results: the checkpoint's Acc@1, Acc@5 and loss (and the zoo's figures for a released
        file), or its error."""
        logger = self.logger
        logger.info(f"==============> Evaluating {path}")
        try:
            weights = read_weights(path, use_ema=use_ema)
            logger.info(weights['weights'])
            cfg, entry, source = checkpoint_config(config, path, weights)
            if source:
                cfg.freeze()
                logger.info(f"model: {cfg.MODEL.TYPE}, image size {cfg.DATA.IMG_SIZE} (TEST.CROP {cfg.TEST.CROP}), "
                            f"from {source}")
            model, loader_val = self._model(cfg), self._loader(cfg)
            load_converted(unwrap_model(model), weights.pop('state'), weights['layout'], path)
        except UserError as e:
            logger.error(str(e))
            return {'checkpoint': path, 'error': str(e)}
        options = EvalOptions.per_class(cfg.MODEL.NUM_CLASSES, self.env.device) if cfg.TEST.PER_CLASS else None
        result = evaluate(cfg, loader_val, model, self.env.device, self.amp_dtype, logger, options)
        if cfg.TEST.PER_CLASS and self.env.is_main:
            paths = write_per_class(cfg.OUTPUT, result.per_class, loader_val.dataset.classes,
                                    self.per_class_names.get(path, ''))
            logger.info(f"per-class results written to {', '.join(paths)}")
        row = {'checkpoint': path, 'epoch': weights['epoch'], **result.metrics}
        if entry is not None and 'acc1' in row:
            acc1, acc5 = row['acc1'], row['acc5']
            logger.info(zoo_line(entry, acc1, acc5))
            row.update(zoo_acc1=entry.acc1, zoo_acc5=entry.acc5, diff_acc1=round(acc1 - entry.acc1, 3),
                       diff_acc5=round(acc5 - entry.acc5, 3))
        return row


def per_class_names(paths: list[str]) -> dict[str, str]:
    """The name suffix of each checkpoint's per-class files: none for one checkpoint, else its file (or folder) name
    without extension, or where names repeat (``runs/*/model_best.pth``) its path from the common folder."""
    if len(paths) == 1:
        return {paths[0]: ''}
    stems = {p: os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in paths}
    if len(set(stems.values())) == len(paths):
        return stems
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return {p: os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0].replace(os.sep, '_') for p in paths}


def sort_results(rows: list[dict]) -> list[dict]:
    """Best Acc@1 first (ties: better Acc@5; multi-label: best mAP, then macro F1), failed checkpoints last in name
    order."""
    def key(r: dict) -> tuple:
        return (-r['map'], -r['f1_macro'], r['checkpoint']) if 'map' in r else (-r['acc1'], -r['acc5'], r['checkpoint'])
    done = sorted((r for r in rows if 'error' not in r), key=key)
    return done + sorted((r for r in rows if 'error' in r), key=lambda r: r['checkpoint'])


def format_table(rows: list[dict]) -> str:
    """The results as a fixed-width text table; where a row is an official released file, the official model
    zoo's Acc@1 / Acc@5 and measured minus reported."""
    width = max(len('checkpoint'), *(len(r['checkpoint']) for r in rows))
    if any('map' in r for r in rows):
        return format_multilabel_table(rows, width)
    zoo = any(r.get('zoo_acc1') is not None for r in rows)
    head = f"{'checkpoint':<{width}}  {'epoch':>5}  {'Acc@1':>7}  {'Acc@5':>7}  {'loss':>7}"
    lines = [head + (f"  {'zoo@1':>5}  {'zoo@5':>5}  {'diff@1':>6}  {'diff@5':>6}" if zoo else '')]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['checkpoint']:<{width}}  failed: {r['error']}")
            continue
        epoch = '' if r['epoch'] is None else r['epoch']
        line = f"{r['checkpoint']:<{width}}  {epoch:>5}  {r['acc1']:7.3f}  {r['acc5']:7.3f}  {r['loss']:7.4f}"
        if r.get('zoo_acc1') is not None:
            line += (f"  {r['zoo_acc1']:5.1f}  {r['zoo_acc5']:5.1f}  {r['diff_acc1']:+6.2f}  "
                     f"{r['diff_acc5']:+6.2f}")
        lines.append(line)
    return '\n'.join(lines)


def format_multilabel_table(rows: list[dict], width: int) -> str:
    """The results of multi-label data: mAP, macro and micro F1, loss."""
    lines = [f"{'checkpoint':<{width}}  {'epoch':>5}  {'mAP':>7}  {'F1-mac':>7}  {'F1-mic':>7}  {'loss':>7}"]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['checkpoint']:<{width}}  failed: {r['error']}")
            continue
        epoch = '' if r['epoch'] is None else r['epoch']
        lines.append(f"{r['checkpoint']:<{width}}  {epoch:>5}  {r['map']:7.3f}  {r['f1_macro']:7.3f}  "
                     f"{r['f1_micro']:7.3f}  {r['loss']:7.4f}")
    return '\n'.join(lines)


def write_results(path: str, rows: list[dict]) -> None:
    """The results as CSV (replaced atomically)."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ('' if r.get(k) is None else r[k]) for k in RESULT_COLUMNS} for r in rows)
    os.replace(tmp, path)


def validate_main(config, env: DistEnv, spec: str, results_file: Optional[str], use_ema: bool) -> list[dict]:
    """Evaluate every checkpoint of ``spec`` and return the sorted rows; UserError before any work for a
    bad spec."""
    if config.MODEL.TYPE == 'swin_moe':
        raise UserError("validate.py does not take Swin-MoE's per-rank checkpoints: use main_moe.py --eval")
    paths = find_checkpoints(spec)
    logger = open_run_log(config, env)
    _, _, _, loader_val, _ = build_loader(config)
    if env.device.type == 'cuda':
        loader_val.finish_on = env.device
    evaluator = Evaluator(config, env, loader_val, logger, per_class_names(paths))
    rows = sort_results([evaluator.evaluate(config, p, use_ema) for p in paths])
    best = 'mAP' if any('map' in r for r in rows) else 'Acc@1'
    logger.info(f"{len(rows)} checkpoints evaluated, best {best} first:\n{format_table(rows)}")
    if env.is_main:
        if results_file:
            write_results(results_file, rows)
            logger.info(f"results written to {results_file}")
    return rows


def cli(argv: Optional[list[str]] = None) -> int:
    """validate.py's entry: main.py's launcher handling and one-line errors (exit 2); exit 1 when some
    checkpoint could not be evaluated (after the others were, every rank agreeing)."""
    captured: dict = {}

    def parse(args_list):
        args, config = parse_option(args_list)
        captured['args'] = args
        return args, config

    def entry(config, env):
        args = captured['args']
        captured['rows'] = validate_main(config, env, args.checkpoints, args.results_file, args.use_ema)
        captured['is_main'] = env.is_main

    status = run(argv, parse=parse, entry=entry)
    failed = [r['checkpoint'] for r in captured.get('rows', []) if 'error' in r]
    if status == 0 and failed:
        if captured['is_main']:
            print(f"error: {len(failed)} of {len(captured['rows'])} checkpoints could not be evaluated: "
                  f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return status


if __name__ == '__main__':
    sys.exit(cli())
