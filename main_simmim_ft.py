"""Fine-tuning from SimMIM (or any) pre-trained weights: the official main_simmim_ft.py command line.

    torchrun --nproc_per_node 8 main_simmim_ft.py \\
        --cfg configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml \\
        --data-path /data/imagenet --pretrained output/simmim_pretrain/<tag>/ckpt_epoch_799.pth

It is main.py's run: ``--pretrained`` strips the SimMIM checkpoint's ``encoder.`` prefix, drops its decoder
and mask token and resizes position tables to the fine-tuning window; the fine-tune configs set
TRAIN.LAYER_DECAY, which the optimizer applies per block. Validation, checkpoints, resume and logs
are main.py's. The SimMIM scripts' ``--enable-amp`` / ``--disable-amp`` are accepted.
"""
from __future__ import annotations

import sys
from functools import partial

import launch
from classification import train_or_evaluate
from config import parse_command_line


def run(argv: list[str] | None = None) -> int:
    """main.py's run, with the SimMIM spellings of the amp switches accepted; returns the exit status."""
    return launch.run(argv, partial(parse_command_line, simmim_spellings=True), train_or_evaluate)


if __name__ == '__main__':
    sys.exit(run())
