"""Train, evaluate or time a Swin Transformer: the official framework's command line.

    torchrun --nproc_per_node 8 main.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path DIR
    python main.py --cfg configs/swin_tiny.yaml --data-path DIR          # one process, CPU or one GPU
    python main.py --eval --cfg CFG --resume CKPT --data-path DIR
    python main.py --throughput --cfg CFG --data-path DIR --batch-size 64 --disable_amp

The flags are the official ones plus a few of ours (config.build_arg_parser); the run itself is
:func:`classification.train_or_evaluate`, started by :func:`launch.run` in this process's place of the job.
"""
from __future__ import annotations

import sys
from typing import Optional

import launch
from classification import train_or_evaluate
from config import parse_command_line


def run(argv: Optional[list[str]] = None) -> int:
    """main.py's whole run; returns the exit status (2 and one line on stderr for a user's mistake)."""
    return launch.run(argv, parse_command_line, train_or_evaluate)


if __name__ == '__main__':
    sys.exit(run())
