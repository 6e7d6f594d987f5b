"""One epoch of training, exact evaluation and throughput timing, as plain functions.

The log lines are the official framework's (``Train: [e/E][i/N] ...``, `` * Acc@1 x Acc@5 y``,
``batch_size B throughput X``) so that existing log parsers keep working.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from timm.utils import AverageMeter

from utils.distributed import all_reduce_sum
from utils.errors import UserError


@dataclass
class TrainContext:
    """What every training step needs besides the batch: built once in main.py."""
    model: torch.nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_scaler: Any
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None: full precision
    mixup_fn: Optional[Callable] = None
    model_ema: Any = None
    tb_writer: Any = None
    # (ctx, batch) -> (loss, batch size): classification by default; SimMIM passes its own.
    loss_fn: Callable = None

    def __post_init__(self):
        if self.loss_fn is None:
            self.loss_fn = classification_loss


def classification_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy of a (samples, targets) batch, after mixup/cutmix when on."""
    samples, targets = (t.to(ctx.device, non_blocking=True) for t in batch)
    if ctx.mixup_fn is not None:
        samples, targets = ctx.mixup_fn(samples, targets)
    with autocast(ctx.device, ctx.amp_dtype):
        return ctx.criterion(ctx.model(samples), targets), samples.shape[0]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Mixed-precision context for ``device``, or a no-op for full precision."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MB: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def no_sync(model: torch.nn.Module, accumulating: bool):
    """Skip DDP's gradient all-reduce on the steps that only accumulate."""
    if accumulating and hasattr(model, 'no_sync'):
        return model.no_sync()
    return contextlib.nullcontext()


def train_one_epoch(config, ctx: TrainContext, data_loader: Iterable, epoch: int, logger: logging.Logger,
                    start_step: int = 0, preemption=None) -> dict[str, Any]:
    """Train one epoch from batch ``start_step`` on.

    Returns the mean loss, grad norm and images per second, and ``stopped_at``: the number of batches
    done when a stop signal ended the epoch early (None when it ran to the end).
    """
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    accum = config.TRAIN.ACCUMULATION_STEPS
    num_steps = len(data_loader)
    meters = {name: AverageMeter() for name in ('time', 'loss', 'grad_norm', 'loss_scale')}
    guard = NonFiniteGuard(config.TRAIN.MAX_NONFINITE_STEPS, ctx.device)
    start = end = time.time()
    images, stopped_at = 0, None
    for idx, batch in enumerate(data_loader, start=start_step):
        update = (idx + 1) % accum == 0
        with no_sync(ctx.model, not update):
            loss, batch_size = ctx.loss_fn(ctx, batch)
            if guard.skip_loss(loss, epoch, idx, logger):
                ctx.optimizer.zero_grad(set_to_none=True)
                continue
            grad_norm = ctx.loss_scaler(loss / accum, ctx.optimizer, clip_grad=config.TRAIN.CLIP_GRAD or None,
                                        parameters=ctx.model.parameters(), update_grad=update)
        if update:
            guard.check_step(ctx.loss_scaler.last_step_skipped, epoch, idx, logger)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.lr_scheduler.step_update((epoch * num_steps + idx) // accum)
            if ctx.model_ema is not None:
                ctx.model_ema.update(ctx.model, step=(epoch * num_steps + idx) // accum)
        images += batch_size
        update_meters(meters, loss, grad_norm, ctx.loss_scaler, batch_size, time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            log_train_step(config, ctx, meters, epoch, idx, num_steps, logger)
        if update and preemption is not None and preemption.should_stop(ctx.device):
            stopped_at = idx + 1
            logger.warning(f"stop signal received: epoch {epoch} stops after step {idx}")
            break
    epoch_time = time.time() - start
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")
    return {'loss': meters['loss'].avg, 'grad_norm': meters['grad_norm'].avg,
            'images_per_second': images / max(epoch_time, 1e-9), 'stopped_at': stopped_at}


class NonFiniteGuard:
    """Skips steps whose loss or gradients are inf/NaN; too many in a row stop the run with a UserError.

    The loss check is agreed across ranks, so every rank skips the same micro-batch and DDP stays in step.
    """

    def __init__(self, max_consecutive: int, device: torch.device):
        self.max_consecutive, self.device, self.in_a_row = max_consecutive, device, 0

    def skip_loss(self, loss: torch.Tensor, epoch: int, idx: int, logger: logging.Logger) -> bool:
        bad = all_reduce_sum(torch.logical_not(torch.isfinite(loss.detach())).float().reshape(1))
        if bad.item() == 0:
            return False
        self._count(f"non-finite loss at epoch {epoch} step {idx}", logger)
        return True

    def check_step(self, skipped: bool, epoch: int, idx: int, logger: logging.Logger) -> None:
        if skipped:
            self._count(f"non-finite gradients at epoch {epoch} step {idx}", logger)
        else:
            self.in_a_row = 0

    def _count(self, what: str, logger: logging.Logger) -> None:
        self.in_a_row += 1
        logger.warning(f"{what}: step skipped ({self.in_a_row} in a row)")
        if self.in_a_row > self.max_consecutive:
            raise UserError(f"{what}: {self.in_a_row} steps in a row had inf/NaN loss or gradients "
                            f"(TRAIN.MAX_NONFINITE_STEPS={self.max_consecutive}); the last good checkpoint "
                            f"is kept; lower TRAIN.BASE_LR or check the data")


def update_meters(meters: dict, loss: torch.Tensor, grad_norm, loss_scaler, batch: int, step_time: float):
    meters['loss'].update(loss.item(), batch)
    if grad_norm is not None and torch.isfinite(grad_norm):
        meters['grad_norm'].update(float(grad_norm))
    meters['loss_scale'].update(loss_scaler.get_scale())
    meters['time'].update(step_time)


def log_train_step(config, ctx: TrainContext, meters: dict, epoch: int, idx: int, num_steps: int,
                    logger: logging.Logger) -> None:
    lr = ctx.optimizer.param_groups[0]['lr']
    wd = ctx.optimizer.param_groups[0]['weight_decay']
    eta = meters['time'].avg * (num_steps - idx - 1)
    t, loss, norm, scale = meters['time'], meters['loss'], meters['grad_norm'], meters['loss_scale']
    logger.info(
        f'Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t'
        f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t wd {wd:.4f}\t'
        f'time {t.val:.4f} ({t.avg:.4f})\t'
        f'loss {loss.val:.4f} ({loss.avg:.4f})\t'
        f'grad_norm {norm.val:.4f} ({norm.avg:.4f})\t'
        f'loss_scale {scale.val:.4f} ({scale.avg:.4f})\t'
        f'mem {memory_mb(ctx.device):.0f}MB')
    if ctx.tb_writer is not None:
        step = epoch * num_steps + idx
        ctx.tb_writer.add_scalar('train/loss', loss.val, step)
        ctx.tb_writer.add_scalar('train/lr', lr, step)
        ctx.tb_writer.add_scalar('train/grad_norm', norm.val, step)


@torch.no_grad()
def validate(config, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype], logger: logging.Logger, label: str = '') -> tuple[float, float, float]:
    """Top-1, top-5 (percent) and mean loss over the whole validation set.

    Each rank counts its own shard; the sums are added across ranks, so every image counts once
    and the result does not depend on the number of processes. ``label`` (e.g. 'EMA ') goes before
    'Acc@1' in the summary line, so parsers of the official line see only the main model's.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    num_steps = len(data_loader)
    end = time.time()
    for idx, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(targets[:, None])
        batch = torch.stack([hits[:, :1].sum(), hits.sum(), criterion(output, targets), torch.tensor(
            len(targets), device=device)]).to(torch.float64)
        totals += batch
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            n = max(totals[3].item(), 1.0)
            logger.info(f'Test: [{idx}/{num_steps}]\tTime {time.time() - end:.3f}\t'
                        f'Loss {totals[2].item() / n:.4f}\tAcc@1 {100 * totals[0].item() / n:.3f}\t'
                        f'Acc@5 {100 * totals[1].item() / n:.3f}\tMem {memory_mb(device):.0f}MB')
    totals = all_reduce_sum(totals)
    count = max(totals[3].item(), 1.0)
    acc1, acc5, loss = 100 * totals[0].item() / count, 100 * totals[1].item() / count, totals[2].item() / count
    logger.info(f' * {label}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}')
    return acc1, acc5, loss


@torch.no_grad()
def throughput(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
               amp_dtype: Optional[torch.dtype], logger: logging.Logger, warmup: int = 50,
               repeats: int = 30) -> float:
    """Images per second of the forward pass on one batch, after ``warmup`` passes, as the official prints it.

    A second line adds what ``benchmarks/speed.py`` reports besides the rate: the precision, the
    seconds per batch and the peak memory of the process (GPU memory allocated on CUDA, RSS on CPU).
    """
    model.eval()
    images, _ = next(iter(data_loader))
    images = images.to(device, non_blocking=True)
    batch_size = images.shape[0]
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    with autocast(device, amp_dtype):
        for _ in range(warmup):
            model(images)
        _synchronize(device)
        logger.info(f"throughput averaged with {repeats} times")
        start = time.time()
        for _ in range(repeats):
            model(images)
        _synchronize(device)
    elapsed = time.time() - start
    rate = repeats * batch_size / elapsed
    logger.info(f"batch_size {batch_size} throughput {rate}")
    precision = str(amp_dtype).replace('torch.', '') if amp_dtype is not None else 'float32'
    logger.info(f"throughput: {precision} on {device.type}, {elapsed / repeats * 1000:.1f} ms per batch, "
                f"peak memory {memory_mb(device):.0f} MB")
    return rate


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
