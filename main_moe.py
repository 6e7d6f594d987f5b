"""Train, evaluate or time Swin-MoE: the official ``main_moe.py`` command line, without tutel.

    torchrun --nproc_per_node 8 main_moe.py --cfg configs/swinmoe/swin_moe_small_patch4_window12_192_32expert_32gpu_22k.yaml \\
        --data-path DIR --batch-size 128
    python main_moe.py --cfg CFG --data-path DIR              # one process: every expert local
    torchrun --nproc_per_node 8 main_moe.py --cfg CFG --data-path DIR --resume NAME.pth   # reads NAME.pth.rank{R}

It is ``main.py``'s run (classification.train_or_evaluate: exact evaluation, AMP, preemption, auto-resume, step
checkpoints) with what the Swin-MoE variant (trainer.SWIN_MOE) adds: the model's auxiliary loss joins the
cross-entropy (``loss-cls`` and ``loss-aux`` in the log line), expert parameters stay out of DDP's all-reduce,
and every rank writes its own checkpoint ``ckpt_epoch_E.pth.rank{R}`` (rank 0 alone ``.pth.global`` with
TRAIN.MOE.SAVE_MASTER), as the official script does.
"""
from __future__ import annotations

import sys

import launch
from classification import train_or_evaluate
from config import parse_command_line
from utils.errors import UserError


def parse_moe_option(argv: list[str] | None = None):
    """main.py's flags; the config must be a Swin-MoE one."""
    args, config = parse_command_line(argv)
    if config.MODEL.TYPE != 'swin_moe':
        raise UserError(f"main_moe.py trains MODEL.TYPE swin_moe; {args.cfg} has {config.MODEL.TYPE!r} (use main.py)")
    return args, config


def run(argv: list[str] | None = None) -> int:
    """main_moe.py's whole run; returns the exit status."""
    return launch.run(argv, parse_moe_option, train_or_evaluate)


if __name__ == '__main__':
    sys.exit(run())
