"""SimMIM pre-training of a Swin backbone: the official main_simmim_pt.py command line.

    torchrun --nproc_per_node 8 main_simmim_pt.py \\
        --cfg configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml --data-path /data/imagenet
    python main_simmim_pt.py --cfg CFG --data-path DIR            # one process, CPU or one GPU

Flags are main.py's (``--disable-amp`` / ``--enable-amp`` spelled either way). Checkpoints are the usual
``ckpt_epoch_{N}.pth`` with 'model' keys ``encoder.*`` and ``decoder.*``; fine-tune from one with
``main_simmim_ft.py --pretrained CKPT`` (or ``main.py --pretrained CKPT``). Runs resume, survive
preemption and log exactly as main.py does; there is no validation.
"""
from __future__ import annotations

import sys

import torch

import main as classifier
from data.simmim import build_loader_simmim
from engine import TrainContext, autocast
from logger import create_tb_writer
from lr_scheduler import build_scheduler
from models import build_model, count_params
from optimizer import build_optimizer
from utils.amp import GradScalerWithNorm, resolve_amp
from utils.checkpoint import load_checkpoint
from utils.distributed import DistEnv
from utils.preemption import PreemptionHandler

# The SimMIM scripts spell the amp switches with hyphens; AMP is on by default in both.
_AMP_FLAGS = {'--disable-amp': ['--disable_amp'], '--enable-amp': [], '--enable_amp': []}


def simmim_argv(argv: list[str] | None = None) -> list[str]:
    """The command line with the SimMIM scripts' amp switches in main.py's spelling."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return [new for arg in argv for new in _AMP_FLAGS.get(arg, [arg])]


def parse_option(argv: list[str] | None = None):
    """main.py's flags, plus the SimMIM spellings of the amp switches; returns (args, frozen config)."""
    return classifier.parse_option(simmim_argv(argv))


def masked_reconstruction_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, int]:
    """SimMIM's loss for an (images, masks) batch: the model returns the L1 loss on masked pixels."""
    images, masks = (t.to(ctx.device, non_blocking=True) for t in batch)
    with autocast(ctx.device, ctx.amp_dtype):
        return ctx.model(images, masks), images.shape[0]


def main(config, env: DistEnv) -> None:
    logger = classifier.open_run_log(config, env)

    _, loader = build_loader_simmim(config)
    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config, is_pretrain=True, device=env.device)
    logger.info(f"number of params: {count_params(model)}")
    model.to(env.device)
    model_without_ddp = model
    amp_enabled, amp_dtype = resolve_amp(config, env.device)
    amp_dtype = amp_dtype if amp_enabled else None
    optimizer = build_optimizer(config, model)
    model = classifier.wrap_model(config, env, model)
    loss_scaler = GradScalerWithNorm(enabled=amp_dtype == torch.float16)
    lr_scheduler = build_scheduler(config, optimizer, len(loader) // config.TRAIN.ACCUMULATION_STEPS)

    progress = classifier.Progress(config.TRAIN.START_EPOCH)
    resume = classifier.pick_resume_file(config, logger)
    if resume:
        resumed: dict = {}
        _, epoch = load_checkpoint(config, resume, model_without_ddp, optimizer, lr_scheduler, loss_scaler, logger,
                                   extra_out=resumed)
        progress = classifier.Progress(epoch, resumed.get('step', 0), 0.0, resumed.get('rng_states'))
    ctx = TrainContext(model=model, criterion=None, optimizer=optimizer, lr_scheduler=lr_scheduler,
                       loss_scaler=loss_scaler, device=env.device, amp_dtype=amp_dtype,
                       tb_writer=create_tb_writer(config.OUTPUT, env.rank), loss_fn=masked_reconstruction_loss)
    with PreemptionHandler() as preemption:
        classifier.train(config, env, ctx, model_without_ddp, loader, None, 0, progress, preemption, logger)


def run(argv: list[str] | None = None) -> int:
    """Entry point, as main.run: user mistakes are one line on stderr and exit status 2."""
    return classifier.run(argv, parse=parse_option, entry=main)


if __name__ == '__main__':
    sys.exit(run())
