"""The epoch loop (train, evaluate, keep the best, checkpoint, log) and what a kind of run changes in it.

    prepared = prepare_training(config, env, model, steps_per_epoch, variant, logger)   # optimizer, DDP/FSDP, ...
    Trainer(config, env, context, checkpointer, logger).fit(loader_train, loader_val, resumed, preemption)

A :class:`Variant` is the one switch between classification, Swin-MoE and SimMIM pre-training: its loss, the
parameters it keeps out of DDP, how it counts the model's size. Distillation is classification with a teacher in
its loss (:func:`with_distillation`). Checkpoint names (Swin-MoE's per-rank files)
are the :class:`~utils.checkpoint.Checkpointer`'s business.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from data.samplers import mix_seed
from distillation import build_distillation_loss
from engine import (EvalOptions, MidEpoch, TrainContext, classification_loss, evaluate, is_multilabel,
                    masked_reconstruction_loss, moe_classification_loss, train_one_epoch)
from lr_scheduler import build_scheduler
from models.complexity import count_flops, count_params
from models.moe import exclude_experts_from_ddp, moe_param_counts
from optimizer import build_optimizer
from utils.amp import GradScalerWithNorm, resolve_amp
from utils.checkpoint import Checkpointer, Resumed
from utils.distributed import DistEnv, all_reduce_max, barrier
from utils.ema import ModelEma
from utils.errors import UserError
from utils.per_class import write_per_class
from utils.rng import capture_rng_state, restore_rng_state, seed_process
from utils.sharding import describe_held_bytes, held_bytes, is_sharded, shard_model
from utils.summary import write_summary_row


# ------------------------------------------------------------------------------------------------ variants

@dataclass(frozen=True)
class Variant:
    """What one kind of run changes in the shared loop: ``loss_fn(ctx, batch)`` (see :class:`TrainContext`),
    ``experts_apart``: rank-local expert parameters stay out of DDP's all-reduce (Swin-MoE), and how the model's
    size is logged: ``moe_sizes`` as the official main_moe.py does, ``flops`` False for parameters only (the
    official SimMIM pre-training script)."""
    name: str
    loss_fn: Callable = classification_loss
    experts_apart: bool = False
    moe_sizes: bool = False
    flops: bool = True

    def log_model_size(self, model: torch.nn.Module, img_size, logger) -> None:
        logger.info(f"number of params: {count_params(model)}")
        if not self.flops:
            return
        if self.moe_sizes:  # official main_moe.py: one expert's worth per MoE layer, and all experts of the job
            single, whole = moe_param_counts(model)
            logger.info(f"number of params single: {single}")
            logger.info(f"number of params whole: {whole}")
            logger.info(f"number of GFLOPs: {model.flops() / 1e9}")  # routing is data-dependent: the official formula
            return
        logger.info(f"number of GFLOPs: {count_flops(model, img_size) / 1e9}")


CLASSIFICATION = Variant('classification')
SWIN_MOE = Variant('swin_moe', loss_fn=moe_classification_loss, experts_apart=True, moe_sizes=True)
SIMMIM = Variant('simmim', loss_fn=masked_reconstruction_loss, flops=False)


def variant_for(model_type: str) -> Variant:
    """The variant a classifier of MODEL.TYPE ``model_type`` trains as."""
    return SWIN_MOE if model_type == 'swin_moe' else CLASSIFICATION


def with_distillation(config, variant: Variant, device: torch.device, logger) -> Variant:
    """``variant`` with DISTILL.*'s teacher in its loss (distillation.py); ``variant`` itself without a teacher
    (DISTILL.TEACHER_WEIGHTS empty). Only plain classification takes one."""
    if not config.DISTILL.TEACHER_WEIGHTS:
        return variant
    if variant.loss_fn is not classification_loss:
        raise UserError(f"distillation (--teacher-weights, DISTILL.*) trains classifiers: a {variant.name} run "
                        "cannot take a teacher")
    return replace(variant, name=f'{variant.name}+distillation',
                   loss_fn=build_distillation_loss(config, device, logger))


# ----------------------------------------------------------------------------------------- the training set-up

@dataclass
class Prepared:
    """The training objects around a model: ``model`` is what runs (DDP / compile wrapped), ``plain`` the model
    the optimizer and checkpoints hold."""
    model: torch.nn.Module
    plain: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: GradScalerWithNorm
    model_ema: Optional[ModelEma]


def prepare_training(config, env: DistEnv, model: torch.nn.Module, steps_per_epoch: int, variant: Variant,
                     logger) -> Prepared:
    """EMA, FSDP sharding (TRAIN.SHARDING fsdp on several processes), optimizer, DDP and torch.compile, loss
    scaler and scheduler, in the order they depend on each other. ``model`` holds its final weights already
    (pretrained ones are loaded before: sharding and the optimizer take them from here)."""
    amp_dtype = amp_dtype_of(config, env)
    model_ema = ModelEma(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    if uses_sharding(config, env, logger):  # before the optimizer: it holds the shards
        shard_model(model, config, env.device, amp_dtype)
        if model_ema is not None:
            shard_model(model_ema.module, config, env.device, amp_dtype)
    if config.TRAIN.FROZEN_STAGES >= 0 or config.TRAIN.HEAD_ONLY:
        logger.info(describe_frozen(model))
    optimizer = build_optimizer(config, model)
    if variant.experts_apart:
        experts = exclude_experts_from_ddp(model, env.world_size)
        logger.info(f"{len(experts)} expert parameters stay out of DDP's all-reduce (gradients divided by "
                    f"{env.world_size})")
    wrapped = wrap_model(env, model, compile_model=bool(config.TRAIN.COMPILE))
    scaler = GradScalerWithNorm(enabled=amp_dtype == torch.float16)
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch // config.TRAIN.ACCUMULATION_STEPS)
    return Prepared(wrapped, model, optimizer, lr_scheduler, scaler, model_ema)


def describe_frozen(model: torch.nn.Module) -> str:
    """One log line: how many parameters TRAIN.FROZEN_STAGES / TRAIN.HEAD_ONLY froze, and what still trains."""
    params = dict(model.named_parameters())
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    # named by top-level module, stages by number: 'layers.2, layers.3, norm, head'
    trained = dict.fromkeys('.'.join(name.split('.')[:2 if name.startswith('layers.') else 1])
                            for name, p in params.items() if p.requires_grad)
    return (f"frozen: {frozen} of {sum(p.numel() for p in params.values())} parameters (no gradient, no optimizer "
            f"state); training {', '.join(trained) or 'nothing'}")


def amp_dtype_of(config, env: DistEnv) -> Optional[torch.dtype]:
    """The autocast dtype of this run, None for full precision."""
    enabled, dtype = resolve_amp(config, env.device)
    return dtype if enabled else None


def uses_sharding(config, env: DistEnv, logger) -> bool:
    """TRAIN.SHARDING fsdp with several processes. One process has nothing to share the model with: it
    trains the whole model (and still reads and writes sharded checkpoints)."""
    if config.TRAIN.SHARDING != 'fsdp':
        return False
    if not env.distributed:
        logger.warning("TRAIN.SHARDING fsdp in one process: nothing to shard over, the model stays whole")
        return False
    return True


def wrap_model(env: DistEnv, model: torch.nn.Module, compile_model: bool = False) -> torch.nn.Module:
    """DDP across processes (after the optimizer is built on the plain model) unless FSDP sharded it, then
    torch.compile if asked."""
    if env.distributed and not is_sharded(model):
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, not a second copy
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None, broadcast_buffers=False,
            gradient_as_bucket_view=True)
    if compile_model:
        model = torch.compile(model)
    return model


# --------------------------------------------------------------------------------------------- the loop

class Trainer:
    """Runs the epochs of one training run from where ``resumed`` says, checkpointing through ``checkpointer``.

    Each epoch's random draws (mixup, drop path) depend only on (seed, epoch, rank), so an epoch resumed from a
    checkpoint repeats exactly; a mid-epoch stop saves every rank's exact random state instead. A stop signal
    ends the run after a checkpoint that resumes mid-epoch.
    """

    def __init__(self, config, env: DistEnv, ctx: TrainContext, checkpointer: Checkpointer, logger):
        self.config, self.env, self.ctx, self.checkpointer, self.logger = config, env, ctx, checkpointer, logger

    def fit(self, loader_train, loader_val, resumed: Resumed, preemption) -> None:
        """Train until TRAIN.EPOCHS, validating after each epoch unless ``loader_val`` is None."""
        config, logger = self.config, self.logger
        logger.info("Start training")
        start_time = time.time()
        max_accuracy = resumed.max_accuracy
        best = BestTracker(bool(config.TRAIN.SAVE_BEST), self.checkpointer.best_path, self.env.device,
                           initial_best(resumed, config.TRAIN.BEST_METRIC))
        for epoch in range(resumed.epoch, config.TRAIN.EPOCHS):
            epoch_start = time.time()
            seed_process(mix_seed(config.SEED, epoch, self.env.rank))
            start_step = self._start_step(resumed, epoch, len(loader_train))
            loader_train.set_epoch(epoch, start_step)

            def save_step(epoch_: int, step: int) -> None:
                self.save_step(epoch_, step, max_accuracy, self._extra(best))
            stats = train_one_epoch(config, self.ctx, loader_train, epoch, logger,
                                    MidEpoch(start_step, preemption, save_step))
            if stats['stopped_at'] is not None:
                save_step(epoch, stats['stopped_at'])
                logger.info("stopped by a signal after writing a checkpoint; run the same command to continue")
                return
            if epoch == resumed.epoch:  # the optimizer state exists after the first step
                logger.info(describe_held_bytes(held_bytes(self.checkpointer.state.model, self.ctx.optimizer),
                                                self.env.rank))
            per_class = config.TEST.PER_CLASS and epoch == config.TRAIN.EPOCHS - 1
            metrics = self.evaluate(loader_val, per_class) if loader_val is not None else {}
            score = 'map' if is_multilabel(config) else 'acc1'
            if score in metrics:  # multi-label: max_accuracy (checkpoints, log) is the best mAP
                max_accuracy = max(max_accuracy, metrics[score])
                logger.info(f'Max {"mAP" if score == "map" else "accuracy"}: {max_accuracy:.2f}%')
                if best.is_new_best(metrics[best_metric_of(config)]):
                    self.checkpointer.save_best(epoch, metrics[best_metric_of(config)])
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                self.checkpointer.save(epoch, max_accuracy, extra=self._extra(best))
            self.record_epoch(epoch, stats, metrics, time.time() - epoch_start)
        self.checkpointer.save_final()
        logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')

    def _extra(self, best: 'BestTracker') -> dict:
        """The checkpoint entries beyond the official ones: the best score, the tracker runs to continue."""
        recorder = self.ctx.recorder
        return {**best.extra(), **(recorder.checkpoint_entry() if recorder is not None else {})}

    def _start_step(self, resumed: Resumed, epoch: int, num_steps: int) -> int:
        """The batch this epoch starts at: 0, or for the epoch a mid-epoch checkpoint stopped in, where it
        stopped (:func:`resume_position`)."""
        if epoch != resumed.epoch or not resumed.step:
            return 0
        rng_states = resumed.extras.get('rng_states')
        if not rng_states:
            return resumed.step
        return resume_position(resumed, rng_states, self.env, num_steps, self.logger)

    def evaluate(self, loader_val, per_class: bool = False) -> dict:
        """Validation after an epoch: acc1, acc5, loss of the model (multi-label data: map, f1_macro, f1_micro,
        loss), and the same prefixed ema_ (but the loss) with EMA on. ``per_class``: rank 0 also writes the
        per-class CSV files to the output folder."""
        ctx, config, logger = self.ctx, self.config, self.logger
        options = EvalOptions.per_class(config.MODEL.NUM_CLASSES, ctx.device) if per_class else None
        result = evaluate(config, loader_val, ctx.model, ctx.device, ctx.amp_dtype, logger, options)
        metrics = dict(result.metrics)
        if per_class and self.env.is_main:
            paths = write_per_class(config.OUTPUT, result.per_class, loader_val.dataset.classes)
            logger.info(f"per-class results written to {', '.join(paths)}")
        if ctx.model_ema is not None:
            ema = evaluate(config, loader_val, ctx.model_ema.module, ctx.device, ctx.amp_dtype, logger,
                           EvalOptions(label='EMA '))
            metrics.update({f'ema_{name}': value for name, value in ema.metrics.items() if name != 'loss'})
        return metrics

    def save_step(self, epoch: int, step: int, max_accuracy: float, extra: dict) -> None:
        """On every rank (it gathers their random states): the checkpoint that resumes after ``step`` batches of
        ``epoch`` (after a stop signal, or every TRAIN.SAVE_STEPS optimizer steps)."""
        rng_states = [capture_rng_state()]
        if self.env.distributed:
            rng_states = [None] * self.env.world_size
            torch.distributed.all_gather_object(rng_states, capture_rng_state())
        self.checkpointer.save(epoch, max_accuracy, step=step, extra={'rng_states': rng_states, **extra})
        barrier()

    def record_epoch(self, epoch: int, stats: dict, metrics: dict, seconds: float) -> None:
        """An epoch's figures: on rank 0 a row of OUTPUT/summary.csv, and the same row (with TensorBoard's
        per-epoch scalars) to the recorder."""
        ctx = self.ctx
        lr = max(group['lr'] for group in ctx.optimizer.param_groups)
        row = {'epoch': epoch, 'lr': lr, 'train_loss': stats['loss'], 'val_loss': metrics.get('loss'),
               'val_acc1': metrics.get('acc1'), 'val_acc5': metrics.get('acc5'), 'ema_acc1': metrics.get('ema_acc1'),
               'images_per_second': stats['images_per_second'], 'epoch_seconds': seconds,
               'val_map': metrics.get('map'), 'val_f1_macro': metrics.get('f1_macro'),
               'val_f1_micro': metrics.get('f1_micro'), 'ema_map': metrics.get('ema_map')}
        if self.env.is_main:
            write_summary_row(self.config.OUTPUT, row)
        if ctx.recorder is not None:
            scalars = {'train/throughput': stats['images_per_second'], 'train/epoch_loss': stats['loss']}
            scalars.update({f'val/{name}': value for name, value in metrics.items()})
            ctx.recorder.log_epoch(epoch, (epoch + 1) * stats['steps'], scalars, row)


def best_metric_of(config) -> str:
    """The metric model_best.pth is picked by: TRAIN.BEST_METRIC, whose acc1 / ema_acc1 mean mAP / EMA mAP on
    multi-label data."""
    metric = config.TRAIN.BEST_METRIC
    return metric.replace('acc1', 'map') if is_multilabel(config) else metric


def initial_best(resumed: Resumed, metric: str) -> Optional[float]:
    """The best TRAIN.BEST_METRIC so far: the checkpoint's 'best_score'; for an older checkpoint without one, its
    max_accuracy stands in for acc1; None when nothing was recorded."""
    best = resumed.extras.get('best_score')
    if best is None and metric == 'acc1' and resumed.max_accuracy > 0:
        best = resumed.max_accuracy
    return best


class BestTracker:
    """Decides when model_best.pth (TRAIN.SAVE_BEST) is rewritten: when the score beats the best so far (the same
    decision on every rank: validation figures are the job's). The best so far comes back on resume, so a
    resumed run never replaces a better file; without a recorded best, or without the file, the first
    validation writes one."""

    def __init__(self, enabled: bool, path: str, device: torch.device, best_score: Optional[float] = None):
        self.enabled, self.path, self.device, self.best_score = enabled, path, device, best_score

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


def resume_position(resumed: Resumed, rng_states: list, env: DistEnv, num_steps: int, logger) -> int:
    """The batch to resume a mid-epoch checkpoint at. Written by as many processes as run now: each rank takes
    its own random state back and starts where it stopped. Written by another number (a requeue on another
    allocation): the batch that has seen as many images over all ranks, without the old random states."""
    old_world = len(rng_states)
    if old_world == env.world_size:
        restore_rng_state(rng_states[env.rank])
        return resumed.step
    step = min(resumed.step * old_world // env.world_size, num_steps)
    logger.warning(f"resuming a checkpoint of {old_world} processes on {env.world_size}: weights, optimizer, "
                   f"scheduler and EMA carry over, the old ranks' random streams and batch order cannot; "
                   f"epoch {resumed.epoch} continues at batch {step} of {num_steps}")
    return step
