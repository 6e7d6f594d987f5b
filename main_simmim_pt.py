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

import datetime
import json
import os
import sys
import time

import torch
from timm.utils import AverageMeter

import main as classifier
from config import scale_learning_rates
from data.samplers import mix_seed
from data.simmim import build_loader_simmim
from engine import NonFiniteGuard, TrainContext, _log_train_step, _no_sync, _update_meters, autocast
from logger import create_logger, create_tb_writer
from lr_scheduler import build_scheduler
from models import build_model, count_params
from optimizer import build_optimizer
from utils.amp import GradScalerWithNorm, resolve_amp
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import DistEnv, cleanup, init_distributed
from utils.errors import UserError
from utils.preemption import PreemptionHandler
from utils.rng import restore_rng_state, seed_process

# The SimMIM scripts spell the amp switches with hyphens; AMP is on by default in both.
_AMP_FLAGS = {'--disable-amp': ['--disable_amp'], '--enable-amp': [], '--enable_amp': []}


def simmim_argv(argv: list[str] | None = None) -> list[str]:
    """The command line with the SimMIM scripts' amp switches in main.py's spelling."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return [new for arg in argv for new in _AMP_FLAGS.get(arg, [arg])]


def parse_option(argv: list[str] | None = None):
    """main.py's flags, plus the SimMIM spellings of the amp switches; returns (args, frozen config)."""
    return classifier.parse_option(simmim_argv(argv))


def train_one_epoch(config, ctx: TrainContext, data_loader, epoch: int, logger, start_step: int = 0,
                    preemption=None) -> dict:
    """One epoch of masked reconstruction from batch ``start_step``; same bookkeeping as engine.train_one_epoch."""
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    accum, num_steps = config.TRAIN.ACCUMULATION_STEPS, len(data_loader)
    meters = {name: AverageMeter() for name in ('time', 'loss', 'grad_norm', 'loss_scale')}
    guard = NonFiniteGuard(config.TRAIN.MAX_NONFINITE_STEPS, ctx.device)
    start = end = time.time()
    stopped_at = None
    for idx, (images, masks) in enumerate(data_loader, start=start_step):
        images = images.to(ctx.device, non_blocking=True)
        masks = masks.to(ctx.device, non_blocking=True)
        update = (idx + 1) % accum == 0
        with _no_sync(ctx.model, not update):
            with autocast(ctx.device, ctx.amp_dtype):
                loss = ctx.model(images, masks)
            if guard.skip_loss(loss, epoch, idx, logger):
                ctx.optimizer.zero_grad(set_to_none=True)
                continue
            grad_norm = ctx.loss_scaler(loss / accum, ctx.optimizer, clip_grad=config.TRAIN.CLIP_GRAD or None,
                                        parameters=ctx.model.parameters(), update_grad=update)
        if update:
            guard.check_step(ctx.loss_scaler.last_step_skipped, epoch, idx, logger)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.lr_scheduler.step_update((epoch * num_steps + idx) // accum)
        _update_meters(meters, loss, grad_norm, ctx.loss_scaler, images.shape[0], time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            _log_train_step(config, ctx, meters, epoch, idx, num_steps, logger)
        if update and preemption is not None and preemption.should_stop(ctx.device):
            stopped_at = idx + 1
            logger.warning(f"stop signal received: epoch {epoch} stops after step {idx}")
            break
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    return {'loss': meters['loss'].avg, 'stopped_at': stopped_at}


def main(config, env: DistEnv) -> None:
    logger = create_logger(config.OUTPUT, dist_rank=env.rank, name=f"{config.MODEL.NAME}")
    if env.is_main:
        with open(os.path.join(config.OUTPUT, "config.json"), "w") as f:
            f.write(config.dump())
    logger.info(config.dump())
    logger.info(json.dumps({'rank': env.rank, 'world_size': env.world_size, 'device': str(env.device)}))

    _, loader = build_loader_simmim(config)
    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config, is_pretrain=True)
    logger.info(f"number of params: {count_params(model)}")
    model.to(env.device)
    model_without_ddp = model
    amp_enabled, amp_dtype = resolve_amp(config, env.device)
    amp_dtype = amp_dtype if amp_enabled else None
    optimizer = build_optimizer(config, model)
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None, broadcast_buffers=False)
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
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
                       tb_writer=create_tb_writer(config.OUTPUT, env.rank))
    with PreemptionHandler() as preemption:
        pretrain(config, env, ctx, model_without_ddp, loader, progress, preemption, logger)


def pretrain(config, env: DistEnv, ctx: TrainContext, model_without_ddp, loader, progress, preemption,
             logger) -> None:
    """The epoch loop of main.train without validation: train, checkpoint (rank 0), stop on a signal."""
    logger.info("Start training")
    start_time = time.time()
    for epoch in range(progress.epoch, config.TRAIN.EPOCHS):
        seed_process(mix_seed(config.SEED, epoch, env.rank))
        start_step = progress.step if epoch == progress.epoch else 0
        if start_step and progress.rng_states:
            restore_rng_state(progress.rng_states[env.rank])
        loader.set_epoch(epoch, start_step)
        stats = train_one_epoch(config, ctx, loader, epoch, logger, start_step, preemption)
        if stats['stopped_at'] is not None:
            classifier.save_stopped_run(config, env, ctx, model_without_ddp, epoch, stats['stopped_at'], 0.0, logger)
            return
        if env.is_main and (epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1):
            save_checkpoint(config, epoch, model_without_ddp, 0.0, ctx.optimizer, ctx.lr_scheduler,
                            ctx.loss_scaler, logger)
    logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def run(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes become one line on stderr and exit status 2, without a traceback."""
    env = None
    try:
        _, config = parse_option(argv)
        env = init_distributed()
        config = scale_learning_rates(config, env.world_size)
        seed_process(config.SEED + env.rank)
        classifier.prepare_output(config)
        main(config, env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
            cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(run())
