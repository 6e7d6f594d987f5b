"""Train, evaluate or time Swin-MoE: the official ``main_moe.py`` command line, without tutel.

    torchrun --nproc_per_node 8 main_moe.py --cfg configs/swinmoe/swin_moe_small_patch4_window12_192_32expert_32gpu_22k.yaml \\
        --data-path DIR --batch-size 128
    python main_moe.py --cfg CFG --data-path DIR              # one process: every expert local
    torchrun --nproc_per_node 8 main_moe.py --cfg CFG --data-path DIR --resume NAME.pth   # reads NAME.pth.rank{R}

It is ``main.py``'s loop (exact evaluation, AMP, preemption, auto-resume, step checkpoints) with what Swin-MoE
adds: the model's auxiliary loss joins the cross-entropy (``loss-cls`` and ``loss-aux`` in the log line), expert
parameters stay out of DDP's all-reduce, and every rank writes its own checkpoint ``ckpt_epoch_E.pth.rank{R}``
(rank 0 alone ``.pth.global`` with TRAIN.MOE.SAVE_MASTER), as the official script does.
"""
from __future__ import annotations

import sys

from main import parse_option, run
from utils.errors import UserError


def parse_moe_option(argv: list[str] | None = None):
    args, config = parse_option(argv)
    if config.MODEL.TYPE != 'swin_moe':
        raise UserError(f"main_moe.py trains MODEL.TYPE swin_moe; {args.cfg} has {config.MODEL.TYPE!r} (use main.py)")
    return args, config


if __name__ == '__main__':
    sys.exit(run(parse=parse_moe_option))
