"""A classifier's run, for main.py and main_moe.py: data, model, pretrained weights, resume, then evaluation,
throughput timing or the training loop.

Data flows one way: frozen config -> builders (data, model, optimizer, scheduler, checkpointer) -> trainer ->
checkpoints and logs.
"""
from __future__ import annotations

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import launch
from data import build_loader
from engine import EvalOptions, TrainContext, evaluate, throughput
from losses import BinaryCrossEntropy
from models import build_model
from tracking import build_recorder
from trainer import Trainer, amp_dtype_of, prepare_training, variant_for, with_distillation
from utils.checkpoint import Resumed, TrainingState, build_checkpointer, resume_file
from utils.distributed import DistEnv
from utils.errors import UserError
from utils.per_class import write_per_class
from utils.preemption import PreemptionHandler
from utils.pretrained import load_pretrained


def build_criterion(config, mixup_fn):
    """The training loss: soft-target cross-entropy after mixup/cutmix (which already smooth the labels),
    else label smoothing (MODEL.LABEL_SMOOTHING), else plain cross-entropy. TRAIN.LOSS bce (auto with multi-label
    data): binary cross-entropy, smoothing the targets itself without mixup, as timm's train.py sets it."""
    if uses_bce(config):
        smoothing = 0.0 if mixup_fn is not None else config.MODEL.LABEL_SMOOTHING
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=config.TRAIN.BCE_TARGET_THRESHOLD)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0.:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def uses_bce(config) -> bool:
    """TRAIN.LOSS bce, or auto on multi-label data."""
    return config.TRAIN.LOSS == 'bce' or (config.TRAIN.LOSS == 'auto' and bool(config.DATA.LABEL_FILE))


def evaluate_and_log(config, loader_val, model, env: DistEnv, logger) -> float:
    """One validation with the official summary line; returns Acc@1 (mAP for multi-label data). An --eval run
    with TEST.PER_CLASS writes the per-class CSV files (rank 0)."""
    per_class = config.EVAL_MODE and config.TEST.PER_CLASS
    options = EvalOptions.per_class(config.MODEL.NUM_CLASSES, env.device) if per_class else None
    result = evaluate(config, loader_val, model, env.device, amp_dtype_of(config, env), logger, options)
    if per_class and env.is_main:
        paths = write_per_class(config.OUTPUT, result.per_class, loader_val.dataset.classes)
        logger.info(f"per-class results written to {', '.join(paths)}")
    return result.score


def train_or_evaluate(config, env: DistEnv) -> None:
    """A classifier's run as main.py and main_moe.py make it: --eval, --throughput, or training (fine-tuning
    from --pretrained, resuming from --resume or the newest checkpoint)."""
    logger = launch.open_run_log(config, env)
    variant = variant_for(config.MODEL.TYPE)
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):  # a teacher that does not fit fails before the data loads
        variant = with_distillation(config, variant, env.device, logger)
    _, _, loader_train, loader_val, mixup_fn = build_loader(config)
    if env.device.type == 'cuda':  # uint8 batches cross to the GPU and are normalised there
        loader_train.finish_on = loader_val.finish_on = env.device
    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config, device=env.device)
    variant.log_model_size(model, config.DATA.IMG_SIZE, logger)
    model.to(env.device)
    resume = resume_file(config, env.rank, logger)
    if config.MODEL.PRETRAINED and not resume:  # fine-tuning starts from them; a resume supersedes them
        load_pretrained(config, model, logger)
        evaluate_and_log(config, loader_val, model, env, logger)
        if config.EVAL_MODE:  # --eval --pretrained: evaluate released weights, adapted to this model
            return
    if config.EVAL_MODE and not resume:
        raise UserError("--eval needs weights: pass --resume CKPT (or MODEL.RESUME)")

    run = prepare_training(config, env, model, len(loader_train), variant, logger)
    checkpoints = build_checkpointer(config, TrainingState(model, run.optimizer, run.lr_scheduler, run.scaler,
                                                           run.model_ema), env.rank, logger)
    resumed = Resumed(epoch=config.TRAIN.START_EPOCH)
    if resume:
        resumed = checkpoints.resume(resume, training=not config.EVAL_MODE, start_epoch=config.TRAIN.START_EPOCH)
        evaluate_and_log(config, loader_val, run.model, env, logger)
        if config.EVAL_MODE:
            return
    if config.THROUGHPUT_MODE:
        throughput(loader_val, run.model, env.device, amp_dtype_of(config, env), logger)
        return

    ctx = TrainContext(model=run.model, criterion=build_criterion(config, mixup_fn), optimizer=run.optimizer,
                       lr_scheduler=run.lr_scheduler, loss_scaler=run.scaler, device=env.device,
                       amp_dtype=amp_dtype_of(config, env), mixup_fn=mixup_fn, model_ema=run.model_ema,
                       loss_fn=variant.loss_fn)
    with build_recorder(config, env.rank, resumed.extras, logger) as ctx.recorder, PreemptionHandler() as preemption:
        Trainer(config, env, ctx, checkpoints, logger).fit(loader_train, loader_val, resumed, preemption)
