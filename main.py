"""Train, evaluate or time a Swin Transformer: the official framework's command line.

    torchrun --nproc_per_node 8 main.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path DIR
    python main.py --cfg configs/swin_tiny.yaml --data-path DIR          # one process, CPU or one GPU
    python main.py --eval --cfg CFG --resume CKPT --data-path DIR
    python main.py --throughput --cfg CFG --data-path DIR --batch-size 64 --disable_amp

Data flows one way: arguments -> frozen config -> builders -> epoch loop -> checkpoints and logs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from config import get_config, scale_learning_rates
from data import build_loader
from data.samplers import mix_seed
from engine import TrainContext, moe_classification_loss, throughput, train_one_epoch, validate
from logger import create_logger, create_tb_writer
from lr_scheduler import build_scheduler
from models import build_model
from models.complexity import count_flops, count_params
from models.moe import exclude_experts_from_ddp, moe_param_counts
from optimizer import build_optimizer
from utils.amp import GradScalerWithNorm, resolve_amp
from utils.checkpoint import (auto_resume_helper, best_checkpoint_path, checkpoint_tag, load_checkpoint,
                              save_best_checkpoint, save_moe_final, save_training_checkpoint)
from utils.cuda import configure_cuda
from utils.distributed import DistEnv, all_reduce_max, barrier, cleanup, init_distributed
from utils.ema import ModelEma
from utils.host_memory import keep_freed_memory
from utils.peers import PeerWatch, failure_priority
from utils.errors import UserError
from utils.preemption import PreemptionHandler
from utils.pretrained import load_pretrained
from utils.rng import capture_rng_state, restore_rng_state, seed_process
from utils.sharding import describe_held_bytes, held_bytes, is_sharded, shard_model
from utils.summary import write_summary_row


def build_arg_parser(description: str = 'Swin Transformer training and evaluation script') -> argparse.ArgumentParser:
    """The official flags, plus a few of ours (marked)."""
    parser = argparse.ArgumentParser(description, add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar="FILE", help='path to config file')
    parser.add_argument("--opts", help="Modify config options by adding 'KEY VALUE' pairs.", default=None,
                        nargs='+')
    parser.add_argument('--batch-size', type=int, help="batch size for single GPU")
    parser.add_argument('--data-path', type=str, help='path to dataset')
    parser.add_argument('--zip', action='store_true', help='use zipped dataset instead of folder dataset')
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                        help='no: no cache, full: cache all data, part: shard the dataset into pieces '
                             'and cache only one piece per process')
    parser.add_argument('--pretrained', help='pretrained weight from checkpoint, could be imagenet22k pretrained')
    parser.add_argument('--resume', help='resume from checkpoint')
    parser.add_argument('--accumulation-steps', type=int, help="gradient accumulation steps")
    parser.add_argument('--use-checkpoint', action='store_true', help="whether to use gradient checkpointing")
    parser.add_argument('--disable_amp', action='store_true', help='Disable pytorch amp')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help='deprecated (apex); O0 disables mixed precision')
    parser.add_argument('--output', default='output', type=str, metavar='PATH',
                        help='root of output folder, the full path is <output>/<model_name>/<tag> (default: output)')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--throughput', action='store_true', help='Test throughput only')
    parser.add_argument('--fused_window_process', action='store_true', help='Fused window shift & partition')
    parser.add_argument('--fused_layernorm', action='store_true', help='Use fused layernorm.')
    parser.add_argument('--optim', type=str, help='overwrite optimizer if provided, can be adamw/sgd/fused_adam')
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help='ignored: the launcher sets LOCAL_RANK')
    # ours
    parser.add_argument('--amp-dtype', type=str, choices=['auto', 'float16', 'bfloat16'],
                        help='(ours) mixed-precision type; auto: bfloat16 where the GPU or CPU computes it natively, '
                             'else float16 on CUDA, float32 on CPU')
    parser.add_argument('--compile', action='store_true', help='(ours) torch.compile the model')
    parser.add_argument('--sharding', choices=['ddp', 'fsdp'], help='(ours) TRAIN.SHARDING')
    return parser


def parse_option(argv: list[str] | None = None):
    """main.py's command line; returns (args, frozen config)."""
    args = build_arg_parser().parse_args(argv)
    return args, get_config(args)


def prepare_output(config) -> None:
    """Create the output folder, or fail with one line if it cannot be written."""
    try:
        os.makedirs(config.OUTPUT, exist_ok=True)
        probe = os.path.join(config.OUTPUT, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output folder {config.OUTPUT} is not writable: {e.strerror}") from None


def build_criterion(config, mixup_fn):
    if mixup_fn is not None:  # mixup/cutmix already smooth the labels
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0.:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def is_moe(config) -> bool:
    return config.MODEL.TYPE == 'swin_moe'


def log_model_size(model: torch.nn.Module, config, logger) -> None:
    logger.info(f"number of params: {count_params(model)}")
    if is_moe(config):  # official main_moe.py: one expert's worth per MoE layer, and all experts of the job
        single, whole = moe_param_counts(model)
        logger.info(f"number of params single: {single}")
        logger.info(f"number of params whole: {whole}")
        logger.info(f"number of GFLOPs: {model.flops() / 1e9}")  # routing is data-dependent: the official formula
        return
    img_size = config.DATA.IMG_SIZE
    logger.info(f"number of GFLOPs: {count_flops(model, img_size) / 1e9}")


def open_run_log(config, env: DistEnv):
    """The run's logger; rank 0 also writes the full config to OUTPUT/config.json."""
    logger = create_logger(config.OUTPUT, dist_rank=env.rank, name=f"{config.MODEL.NAME}")
    if env.is_main:
        with open(os.path.join(config.OUTPUT, "config.json"), "w") as f:
            f.write(config.dump())  # YAML text under the official file name
        logger.info(f"Full config saved to {os.path.join(config.OUTPUT, 'config.json')}")
    logger.info(config.dump())
    logger.info(json.dumps({'rank': env.rank, 'world_size': env.world_size, 'device': str(env.device)}))
    return logger


def uses_sharding(config, env: DistEnv, logger) -> bool:
    """TRAIN.SHARDING fsdp with several processes. One process has nothing to share the model with: it
    trains the whole model (and still reads and writes sharded checkpoints)."""
    if config.TRAIN.SHARDING != 'fsdp':
        return False
    if not env.distributed:
        logger.warning("TRAIN.SHARDING fsdp in one process: nothing to shard over, the model stays whole")
        return False
    return True


def wrap_model(config, env: DistEnv, model: torch.nn.Module) -> torch.nn.Module:
    """DDP across processes (after the optimizer is built on the plain model) unless FSDP sharded it, then
    torch.compile if asked."""
    if env.distributed and not is_sharded(model):
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, not a second copy
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None, broadcast_buffers=False,
            gradient_as_bucket_view=True)
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
    return model


def main(config, env: DistEnv) -> None:
    logger = open_run_log(config, env)
    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
    if env.device.type == 'cuda':  # uint8 batches cross to the GPU and are normalised there
        loader_train.finish_on = loader_val.finish_on = env.device
    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config, device=env.device)
    log_model_size(model, config, logger)
    model.to(env.device)
    model_without_ddp = model
    amp_enabled, amp_dtype = resolve_amp(config, env.device)
    amp_dtype = amp_dtype if amp_enabled else None

    resume = pick_resume_file(config, logger)
    if config.MODEL.PRETRAINED and not resume:  # fine-tuning starts from them; a resume supersedes them
        load_pretrained(config, model_without_ddp, logger)
        acc1, _, _ = validate(config, loader_val, model, env.device, amp_dtype, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
        if config.EVAL_MODE:  # --eval --pretrained: evaluate released weights, adapted to this model
            return

    model_ema = ModelEma(model_without_ddp, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    if uses_sharding(config, env, logger):  # after loading weights, before the optimizer: it holds the shards
        shard_model(model, config, env.device, amp_dtype)
        if model_ema is not None:
            shard_model(model_ema.module, config, env.device, amp_dtype)
    optimizer = build_optimizer(config, model)
    if is_moe(config):
        experts = exclude_experts_from_ddp(model, env.world_size)
        logger.info(f"{len(experts)} expert parameters stay out of DDP's all-reduce (gradients divided by "
                    f"{env.world_size})")
    model = wrap_model(config, env, model)
    loss_scaler = GradScalerWithNorm(enabled=amp_dtype == torch.float16)
    n_iter = len(loader_train) // config.TRAIN.ACCUMULATION_STEPS
    lr_scheduler = build_scheduler(config, optimizer, n_iter)

    max_accuracy, start_epoch, resumed = 0.0, config.TRAIN.START_EPOCH, {}
    if resume:
        max_accuracy, start_epoch = load_checkpoint(config, resume, model_without_ddp, optimizer, lr_scheduler,
                                                    loss_scaler, logger, model_ema=model_ema, extra_out=resumed)
        acc1, acc5, _ = validate(config, loader_val, model, env.device, amp_dtype, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
        if config.EVAL_MODE:
            return
    elif config.EVAL_MODE:
        raise UserError("--eval needs weights: pass --resume CKPT (or MODEL.RESUME)")

    if config.THROUGHPUT_MODE:
        throughput(loader_val, model, env.device, amp_dtype, logger)
        return

    ctx = TrainContext(model=model, criterion=build_criterion(config, mixup_fn), optimizer=optimizer,
                       lr_scheduler=lr_scheduler, loss_scaler=loss_scaler, device=env.device, amp_dtype=amp_dtype,
                       mixup_fn=mixup_fn, model_ema=model_ema, tb_writer=create_tb_writer(config.OUTPUT, env.rank),
                       loss_fn=moe_classification_loss if is_moe(config) else None)
    with PreemptionHandler() as preemption:
        train(config, env, ctx, model_without_ddp, loader_train, loader_val, len(dataset_val),
              Progress(start_epoch, resumed.get('step', 0), max_accuracy, resumed.get('rng_states'),
                       resumed.get('best_score')),
              preemption, logger)


def pick_resume_file(config, logger) -> str:
    """Training: the newest checkpoint in the output folder wins, so a requeued job continues where it
    stopped. Evaluation: an explicit --resume wins; without one, the newest checkpoint is evaluated."""
    resume = config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME and not (config.EVAL_MODE and resume):
        latest = auto_resume_helper(config.OUTPUT, logger, tag=checkpoint_tag(config))
        if latest:
            if resume:
                logger.warning(f"auto-resume changing resume file from {resume} to {latest}")
            resume = latest
    return resume


@dataclass
class Progress:
    """Where training (re)starts: epoch, batches already done in it, best accuracy, saved RNG states, and the
    best TRAIN.BEST_METRIC so far (what model_best.pth holds; None when no checkpoint recorded one)."""
    epoch: int
    step: int = 0
    max_accuracy: float = 0.0
    rng_states: Optional[list] = None
    best_score: Optional[float] = None


def train(config, env: DistEnv, ctx: TrainContext, model_without_ddp, loader_train, loader_val, num_val: int,
          progress: Progress, preemption: PreemptionHandler, logger) -> None:
    """The epoch loop: train, evaluate (unless ``loader_val`` is None), keep the best, checkpoint, log.

    A stop signal ends it after a checkpoint that resumes mid-epoch.
    """
    logger.info("Start training")
    start_time = time.time()
    max_accuracy = progress.max_accuracy
    best = BestTracker(config, env, progress.best_score, max_accuracy)
    for epoch in range(progress.epoch, config.TRAIN.EPOCHS):
        epoch_start = time.time()
        # Each epoch's random draws (mixup, drop path) depend only on (seed, epoch, rank), so an epoch
        # resumed from a checkpoint repeats exactly; a mid-epoch stop saved the exact states instead.
        seed_process(mix_seed(config.SEED, epoch, env.rank))
        start_step = progress.step if epoch == progress.epoch else 0
        if start_step and progress.rng_states:
            start_step = resume_position(progress, env, len(loader_train), logger)
        loader_train.set_epoch(epoch, start_step)
        def save_step(epoch_: int, step: int) -> None:
            save_step_checkpoint(config, env, ctx, model_without_ddp, epoch_, step, max_accuracy, logger,
                                 best.extra())
        stats = train_one_epoch(config, ctx, loader_train, epoch, logger, start_step, preemption, save_step)
        if stats['stopped_at'] is not None:
            save_step(epoch, stats['stopped_at'])
            logger.info("stopped by a signal after writing a checkpoint; run the same command to continue")
            return
        if epoch == progress.epoch:  # the optimizer state exists after the first step
            logger.info(describe_held_bytes(held_bytes(model_without_ddp, ctx.optimizer), env.rank))
        metrics = evaluate_epoch(config, ctx, loader_val, num_val, logger) if loader_val is not None else {}
        if 'acc1' in metrics:
            max_accuracy = max(max_accuracy, metrics['acc1'])
            logger.info(f'Max accuracy: {max_accuracy:.2f}%')
            if best.is_new_best(metrics[config.TRAIN.BEST_METRIC]):
                save_best_checkpoint(config, epoch, model_without_ddp, metrics[config.TRAIN.BEST_METRIC],
                                     ctx.optimizer, ctx.lr_scheduler, ctx.loss_scaler, logger, model_ema=ctx.model_ema,
                                     rank=env.rank)
        if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
            save_training_checkpoint(config, env.rank, epoch, model_without_ddp, max_accuracy, ctx.optimizer,
                                     ctx.lr_scheduler, ctx.loss_scaler, logger, model_ema=ctx.model_ema,
                                     extra=best.extra())
        record_epoch(config, env, ctx, epoch, stats, metrics, time.time() - epoch_start)
    if checkpoint_tag(config).startswith('.rank'):
        save_moe_final(config, model_without_ddp, env.rank, logger)
    logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def evaluate_epoch(config, ctx: TrainContext, loader_val, num_val: int, logger) -> dict:
    """Validation after an epoch: acc1, acc5, loss of the model, and ema_acc1 / ema_acc5 with EMA on."""
    acc1, acc5, loss = validate(config, loader_val, ctx.model, ctx.device, ctx.amp_dtype, logger)
    logger.info(f"Accuracy of the network on the {num_val} test images: {acc1:.1f}%")
    metrics = {'acc1': acc1, 'acc5': acc5, 'loss': loss}
    if ctx.model_ema is not None:
        metrics['ema_acc1'], metrics['ema_acc5'], _ = validate(
            config, loader_val, ctx.model_ema.module, ctx.device, ctx.amp_dtype, logger, label='EMA ')
    return metrics


class BestTracker:
    """Decides when model_best.pth (TRAIN.SAVE_BEST) is rewritten: when TRAIN.BEST_METRIC beats the best so far
    (the same decision on every rank: validation figures are the job's). The best so far comes back on resume
    (the checkpoints carry it as 'best_score'; an older checkpoint's max_accuracy stands in for acc1), so a
    resumed run never replaces a better file; without a recorded best, or without the file, the first
    validation writes one."""

    def __init__(self, config, env: DistEnv, best_score: Optional[float], max_accuracy: float):
        self.enabled = bool(config.TRAIN.SAVE_BEST)
        self.path = best_checkpoint_path(config, sharded_folder=bool(config.TRAIN.SHARDED_CKPT) and env.distributed)
        if best_score is None and config.TRAIN.BEST_METRIC == 'acc1' and max_accuracy > 0:
            best_score = max_accuracy
        self.best_score = best_score
        self.device = env.device

    def is_new_best(self, score: float) -> bool:
        """Record ``score``; True (on every rank alike) when model_best.pth is to be written now."""
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score = score
        if not self.enabled:
            return False
        # every rank agrees (a sharded model is gathered by all of them): any rank missing the file rewrites it
        missing = all_reduce_max(torch.tensor(float(not os.path.exists(self.path)), device=self.device))
        return improved or bool(missing)

    def extra(self) -> dict:
        """The checkpoint entry that carries the best score across a resume."""
        return {} if self.best_score is None else {'best_score': float(self.best_score)}


def record_epoch(config, env: DistEnv, ctx: TrainContext, epoch: int, stats: dict, metrics: dict,
                 seconds: float) -> None:
    """An epoch's figures to TensorBoard and, on rank 0, a row of OUTPUT/summary.csv."""
    lr = max(group['lr'] for group in ctx.optimizer.param_groups)
    scalars = {'train/throughput': stats['images_per_second'], 'train/epoch_loss': stats['loss']}
    scalars.update({f'val/{name}': value for name, value in metrics.items()})
    if ctx.tb_writer is not None:
        for name, value in scalars.items():
            ctx.tb_writer.add_scalar(name, value, epoch)
        ctx.tb_writer.flush()
    if env.is_main:
        write_summary_row(config.OUTPUT, {
            'epoch': epoch, 'lr': lr, 'train_loss': stats['loss'], 'val_loss': metrics.get('loss'),
            'val_acc1': metrics.get('acc1'), 'val_acc5': metrics.get('acc5'), 'ema_acc1': metrics.get('ema_acc1'),
            'images_per_second': stats['images_per_second'], 'epoch_seconds': seconds})


def resume_position(progress: Progress, env: DistEnv, num_steps: int, logger) -> int:
    """The batch to resume a mid-epoch checkpoint at. Written by as many processes as run now: each rank takes
    its own random state back and starts where it stopped. Written by another number (a requeue on another
    allocation): the batch that has seen as many images over all ranks, without the old random states."""
    old_world = len(progress.rng_states)
    if old_world == env.world_size:
        restore_rng_state(progress.rng_states[env.rank])
        return progress.step
    step = min(progress.step * old_world // env.world_size, num_steps)
    logger.warning(f"resuming a checkpoint of {old_world} processes on {env.world_size}: weights, optimizer, "
                   f"scheduler and EMA carry over, the old ranks' random streams and batch order cannot; "
                   f"epoch {progress.epoch} continues at batch {step} of {num_steps}")
    return step


def save_step_checkpoint(config, env: DistEnv, ctx: TrainContext, model_without_ddp, epoch: int, step: int,
                         max_accuracy: float, logger, extra: Optional[dict] = None) -> None:
    """On every rank (it gathers their random states): rank 0 writes a checkpoint that resumes after ``step``
    batches of ``epoch`` (after a stop signal, or every TRAIN.SAVE_STEPS optimizer steps)."""
    rng_states = [capture_rng_state()]
    if env.distributed:
        rng_states = [None] * env.world_size
        torch.distributed.all_gather_object(rng_states, capture_rng_state())
    save_training_checkpoint(config, env.rank, epoch, model_without_ddp, max_accuracy, ctx.optimizer,
                             ctx.lr_scheduler, ctx.loss_scaler, logger, model_ema=ctx.model_ema, step=step,
                             extra={'rng_states': rng_states, **(extra or {})})
    barrier()


def run(argv: list[str] | None = None, parse: Callable = parse_option, entry: Optional[Callable] = None) -> int:
    """Entry point: user mistakes become one line on stderr and exit status 2, without a traceback.

    With several processes, a failure on one rank ends the others within seconds, with its message
    (utils/peers.py). ``parse(argv) -> (args, config)`` and ``entry(config, env)`` default to this script's;
    the SimMIM scripts pass their own.
    """
    env = watch = None
    try:
        _, config = parse(argv)
        env = init_distributed()
        if env.distributed and config.PEER_TIMEOUT > 0:
            watch = PeerWatch(env.rank, timeout=config.PEER_TIMEOUT)
        if env.device.type == 'cpu' and config.HOST_MEMORY_CACHE:  # on a GPU node it would only grow host memory
            keep_freed_memory()
        if env.device.type == 'cuda':
            configure_cuda(config.ALLOW_TF32)
        config = scale_learning_rates(config, env.world_size)
        seed_process(config.SEED + env.rank)
        prepare_output(config)
        (entry or main)(config, env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if watch is not None:
            watch.report(str(e), status=2, priority=failure_priority(e))
        return 2
    except BaseException as e:
        if watch is not None:
            watch.report(f"{type(e).__name__}: {e}".splitlines()[0], status=1, priority=failure_priority(e))
        raise
    else:
        if watch is not None:
            watch.stop()
    finally:
        if env is not None:
            cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(run())
