"""Evaluate a folder (or glob) of checkpoints on the validation set: a table sorted by Acc@1, and a CSV.

    python validate.py --cfg CFG --data-path DIR --checkpoints output/swin_tiny/default
    torchrun --nproc_per_node 4 validate.py --cfg CFG --data-path DIR --checkpoints 'runs/*/model_best.pth' \\
        --results-file results.csv

Every checkpoint is evaluated as ``main.py --eval --resume CKPT`` does (the same loader, precision and exact
sharded validation, so the figures do not depend on the number of processes). A folder contributes its
``*.pth`` and ``*.safetensors`` files. A checkpoint that cannot be read or does not fit the model gets a
row with its error and the run exits 1 after the others are evaluated.
"""
from __future__ import annotations

import csv
import glob
import os
import sys
from typing import Optional

import torch

from config import get_config
from data import build_loader
from engine import validate
from config import build_arg_parser
from launch import open_run_log, run
from models import build_model
from utils.amp import resolve_amp
from utils.checkpoint import load_weights
from utils.distributed import DistEnv
from utils.errors import UserError

RESULT_COLUMNS = ('checkpoint', 'epoch', 'acc1', 'acc5', 'loss', 'error')


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
    """The checkpoint files named by ``spec``: a folder's .pth / .safetensors files, a glob's files, a file."""
    if os.path.isdir(spec):
        paths = [os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(('.pth', '.safetensors'))]
    else:
        paths = glob.glob(spec) if glob.has_magic(spec) else [spec] if os.path.exists(spec) else []
    paths = sorted(p for p in paths if os.path.isfile(p))
    if not paths:
        raise UserError(f"--checkpoints {spec}: no checkpoint files (.pth, .safetensors) there")
    return paths


def evaluate_checkpoint(config, path: str, model: torch.nn.Module, loader_val, env: DistEnv, amp_dtype,
                        use_ema: bool, logger) -> dict:
    """One row of the results: the checkpoint's Acc@1, Acc@5 and loss, or its error."""
    logger.info(f"==============> Evaluating {path}")
    try:
        info = load_weights(path, model, use_ema=use_ema)
    except UserError as e:
        logger.error(str(e))
        return {'checkpoint': path, 'error': str(e)}
    acc1, acc5, loss = validate(config, loader_val, model, env.device, amp_dtype, logger)
    return {'checkpoint': path, 'epoch': info['epoch'], 'acc1': acc1, 'acc5': acc5, 'loss': loss}


def sort_results(rows: list[dict]) -> list[dict]:
    """Best Acc@1 first (ties: better Acc@5), failed checkpoints last in name order."""
    done = sorted((r for r in rows if 'error' not in r), key=lambda r: (-r['acc1'], -r['acc5'], r['checkpoint']))
    return done + sorted((r for r in rows if 'error' in r), key=lambda r: r['checkpoint'])


def format_table(rows: list[dict]) -> str:
    """The results as a fixed-width text table."""
    width = max(len('checkpoint'), *(len(r['checkpoint']) for r in rows))
    lines = [f"{'checkpoint':<{width}}  {'epoch':>5}  {'Acc@1':>7}  {'Acc@5':>7}  {'loss':>7}"]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['checkpoint']:<{width}}  failed: {r['error']}")
            continue
        epoch = '' if r['epoch'] is None else r['epoch']
        lines.append(f"{r['checkpoint']:<{width}}  {epoch:>5}  {r['acc1']:7.3f}  {r['acc5']:7.3f}  {r['loss']:7.4f}")
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
    model = build_model(config, device=env.device).to(env.device)
    _, amp_dtype = resolve_amp(config, env.device)
    rows = sort_results([evaluate_checkpoint(config, p, model, loader_val, env, amp_dtype, use_ema, logger)
                         for p in paths])
    logger.info(f"{len(rows)} checkpoints evaluated, best Acc@1 first:\n{format_table(rows)}")
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
