"""Turn a sharded checkpoint folder (TRAIN.SHARDED_CKPT) into the official single-file checkpoint.

    python -m tools.consolidate output/swin_large/default/ckpt_epoch_29.dcp swin_large_ep29.pth

The result has the layout a ``TRAIN.SHARDING fsdp`` run gathers on rank 0: 'model' (official key
names), 'optimizer' (keyed by parameter name), 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch',
'config' and 'model_ema' where the run kept one, so ``--eval``, ``--resume``, ``--pretrained``,
``predict.py`` and ``validate.py`` read it. One process, no GPU: the shards are read straight from
their files, whatever world size wrote them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional, Sequence

import torch

from utils.fileio import load_file_safe, save_file_atomic
from utils.errors import UserError, exit_status
from utils.sharding import SHARDED_META, is_sharded_checkpoint


def consolidate(folder: str) -> dict:
    """The single-file checkpoint dict of a sharded checkpoint folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    if not is_sharded_checkpoint(folder):
        raise UserError(f"{folder}: not a complete sharded checkpoint (no .metadata and {SHARDED_META})")
    meta = load_file_safe(os.path.join(folder, SHARDED_META))
    with tempfile.TemporaryDirectory() as tmp:
        flat = os.path.join(tmp, 'whole.pth')
        dcp_to_torch_save(folder, flat)
        tensors = torch.load(flat, map_location='cpu', weights_only=True)
    ckpt = {'model': tensors['model']}
    if 'optimizer' in tensors:
        ckpt['optimizer'] = tensors['optimizer']
    if 'model_ema' in tensors:
        ckpt['model_ema'] = tensors['model_ema']
    ckpt.update({k: v for k, v in meta.items() if k not in ('has_ema', 'has_optimizer')})
    return ckpt


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser('Consolidate a sharded checkpoint into one file')
    parser.add_argument('folder', help='a sharded checkpoint folder (ckpt_epoch_N.dcp)')
    parser.add_argument('output', help='the single-file checkpoint to write (.pth)')
    args = parser.parse_args(argv)

    def write() -> None:
        ckpt = consolidate(args.folder)
        save_file_atomic(ckpt, args.output)
        print(f"{args.output}: {len(ckpt['model'])} model tensors from {args.folder} (epoch {ckpt.get('epoch')})")
    return exit_status(write)


if __name__ == '__main__':
    sys.exit(main())
