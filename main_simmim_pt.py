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
from functools import partial

import launch
from config import parse_command_line
from data.simmim import build_loader_simmim
from engine import TrainContext
from models import build_model
from tracking import build_recorder
from trainer import SIMMIM, Trainer, amp_dtype_of, prepare_training, with_distillation
from utils.checkpoint import Resumed, TrainingState, build_checkpointer, resume_file
from utils.distributed import DistEnv
from utils.preemption import PreemptionHandler


def pretrain(config, env: DistEnv) -> None:
    """Masked-image-modelling pre-training: the SimMIM variant of the training loop, without validation."""
    logger = launch.open_run_log(config, env)
    with_distillation(config, SIMMIM, env.device, logger)  # refuses a teacher
    _, loader = build_loader_simmim(config)
    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config, is_pretrain=True, device=env.device)
    SIMMIM.log_model_size(model, config.DATA.IMG_SIZE, logger)
    model.to(env.device)
    resume = resume_file(config, env.rank, logger)
    run = prepare_training(config, env, model, len(loader), SIMMIM, logger)
    checkpoints = build_checkpointer(config, TrainingState(model, run.optimizer, run.lr_scheduler, run.scaler,
                                                           run.model_ema), env.rank, logger)
    resumed = checkpoints.resume(resume) if resume else Resumed(epoch=config.TRAIN.START_EPOCH)
    ctx = TrainContext(model=run.model, criterion=None, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                       loss_scaler=run.scaler, device=env.device, amp_dtype=amp_dtype_of(config, env),
                       model_ema=run.model_ema, loss_fn=SIMMIM.loss_fn)
    with build_recorder(config, env.rank, resumed.extras, logger) as ctx.recorder, PreemptionHandler() as preemption:
        Trainer(config, env, ctx, checkpoints, logger).fit(loader, None, resumed, preemption)


def run(argv: list[str] | None = None) -> int:
    """main_simmim_pt.py's whole run, as main.run: user mistakes are one line on stderr and exit status 2."""
    return launch.run(argv, partial(parse_command_line, simmim_spellings=True), pretrain)


if __name__ == '__main__':
    sys.exit(run())
