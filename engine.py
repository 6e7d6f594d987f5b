"""One epoch of training, exact evaluation and throughput timing, as plain functions.

The log lines are the official framework's (``Train: [e/E][i/N] ...``, `` * Acc@1 x Acc@5 y``,
``batch_size B throughput X``) so that existing log parsers keep working. Multi-label data (DATA.LABEL_FILE) are
evaluated by :func:`validate_multilabel`, whose line is ours: `` * mAP x F1-macro y F1-micro z (threshold t)``.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from timm.utils import AverageMeter

from config import img_size_hw
from utils.distributed import all_reduce_max, all_reduce_sum, unwrap_model
from utils.errors import UserError
from utils.metrics import ClassCounter, ClassCounts, MultiLabelMetrics, all_gather_rows, multilabel_metrics
from utils.sharding import is_sharded, set_gradient_sync


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
    # a tracking.RunRecorder: TensorBoard and the --log trackers (None: the log lines only)
    recorder: Any = None
    # (ctx, batch) -> (loss, batch size[, {name: part of the loss}]): classification by default; SimMIM and
    # Swin-MoE (whose parts 'loss-cls' and 'loss-aux' join the log line) pass their own.
    loss_fn: Callable = None

    def __post_init__(self):
        if self.loss_fn is None:
            self.loss_fn = classification_loss


def mixed_batch(ctx: TrainContext, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A (samples, targets) batch on the device, after mixup/cutmix when on."""
    samples, targets = (t.to(ctx.device, non_blocking=True) for t in batch)
    if ctx.mixup_fn is not None:
        samples, targets = ctx.mixup_fn(samples, targets)
    return samples, targets


def classification_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy of a (samples, targets) batch, after mixup/cutmix when on."""
    samples, targets = mixed_batch(ctx, batch)
    with autocast(ctx.device, ctx.amp_dtype):
        return ctx.criterion(ctx.model(samples), targets), samples.shape[0]


def moe_classification_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, int, dict]:
    """Swin-MoE: cross-entropy plus the model's weighted auxiliary load-balancing loss (official main_moe.py)."""
    samples, targets = mixed_batch(ctx, batch)
    with autocast(ctx.device, ctx.amp_dtype):
        logits, l_aux = ctx.model(samples)
        l_cls = ctx.criterion(logits, targets)
    return l_cls + l_aux, samples.shape[0], {'loss-cls': l_cls, 'loss-aux': l_aux}


def masked_reconstruction_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, int]:
    """SimMIM's loss for an (images, masks) batch: the model returns the L1 loss on the masked pixels."""
    images, masks = (t.to(ctx.device, non_blocking=True) for t in batch)
    with autocast(ctx.device, ctx.amp_dtype):
        return ctx.model(images, masks), images.shape[0]


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
    """Skip the gradient reduction on the steps that only accumulate: DDP's all-reduce, FSDP's reduce-scatter."""
    if is_sharded(model):
        set_gradient_sync(model, not accumulating)
        return contextlib.nullcontext()
    if accumulating and hasattr(model, 'no_sync'):
        return model.no_sync()
    return contextlib.nullcontext()


@dataclass
class MidEpoch:
    """Where an epoch starts and what may end it early: ``start_step`` (batches already done, on a resume),
    ``preemption`` (a stop-signal watcher whose ``received`` is set by SIGTERM/SIGUSR1...), and
    ``save_step(epoch, batches_done)``, which writes the resumable mid-epoch checkpoint."""
    start_step: int = 0
    preemption: Optional[Any] = None
    save_step: Optional[Callable[[int, int], None]] = None


def train_one_epoch(config, ctx: TrainContext, data_loader: Iterable, epoch: int, logger: logging.Logger,
                    mid: Optional[MidEpoch] = None) -> dict[str, Any]:
    """Train one epoch from batch ``mid.start_step`` on.

    ``mid.save_step`` is called on every rank after each TRAIN.SAVE_STEPS-th optimizer step (counted over the
    run) but the epoch's last.

    A step whose gradients are inf/NaN is skipped on every rank alike (DDP's all-reduce spreads them); more
    than TRAIN.MAX_NONFINITE_STEPS in a row end the run with a UserError. The step's numbers stay on the device
    and are read, with one all-reduce for the stop signal and the non-finite count, at the log steps only
    (every PRINT_FREQ batches and the last), so the steps in between do not wait for the host.

    Returns the mean loss, grad norm, images per second, the number of skipped optimizer steps, and
    ``stopped_at``: the number of batches done when a stop signal ended the epoch early (None when it ran to
    the end).
    """
    mid = mid or MidEpoch()
    start_step, preemption, save_step = mid.start_step, mid.preemption, mid.save_step
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    accum, save_steps = config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.get('SAVE_STEPS', 0)
    num_steps = len(data_loader)
    stats = StepStats(ctx.device, config.TRAIN.MAX_NONFINITE_STEPS)
    progress, check_due = EpochProgress(epoch, config.TRAIN.EPOCHS, num_steps, logger), False
    start = end = time.time()
    images, stopped_at, read = 0, None, None
    for idx, batch in enumerate(data_loader, start=start_step):
        update = (idx + 1) % accum == 0
        with no_sync(ctx.model, not update):
            loss, batch_size, *parts = ctx.loss_fn(ctx, batch)
            grad_norm = ctx.loss_scaler(loss / accum, ctx.optimizer, clip_grad=config.TRAIN.CLIP_GRAD or None,
                                        parameters=ctx.model.parameters(), update_grad=update)
        stats.add_loss(loss, batch_size, parts[0] if parts else None)
        if update:
            stats.add_step(grad_norm, ctx.loss_scaler.last_skipped, idx)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.lr_scheduler.step_update((epoch * num_steps + idx) // accum)
            if ctx.model_ema is not None:
                ctx.model_ema.update(ctx.model, step=(epoch * num_steps + idx) // accum)
            if save_step is not None and save_steps and ((epoch * num_steps + idx + 1) // accum) % save_steps == 0 \
                    and idx != num_steps - 1:
                save_step(epoch, idx + 1)
        images += batch_size
        progress.step_time.update(time.time() - end)
        end = time.time()
        log_now = idx % config.PRINT_FREQ == 0 or idx == num_steps - 1
        check_due = check_due or log_now
        checking = check_due and (update or idx == num_steps - 1)  # a stop lands after an optimizer step
        if log_now or checking:
            read = stats.read(stop_requested=preemption is not None and preemption.received is not None,
                              agree=checking)
        if log_now:
            log_train_step(ctx, progress, idx, read)
        if checking:
            check_due = False
            stats.raise_if_too_many_in_a_row(read, epoch)
            if read['stop']:
                stopped_at = idx + 1
                logger.warning(f"stop signal received: epoch {epoch} stops after step {idx}")
                break
    epoch_time = time.time() - start
    if read is None:  # nothing left to train in this epoch
        read = stats.read(stop_requested=False, agree=False)
    if read['skipped']:
        logger.warning(f"EPOCH {epoch}: {read['skipped']} optimizer steps skipped (inf/NaN gradients)")
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")
    return {'loss': read['loss_avg'], 'grad_norm': read['grad_norm_avg'], 'skipped_steps': read['skipped'],
            'images_per_second': images / max(epoch_time, 1e-9), 'stopped_at': stopped_at, 'steps': num_steps}


class StepStats:
    """The training steps' numbers, kept on the device and read in one transfer at the log steps.

    Losses and grad norms are averaged over the finite ones; skipped (non-finite) optimizer steps are counted,
    with the longest run of them in a row and the step where that run first passed ``max_in_a_row``.
    """

    _FIELDS = ('loss_sum', 'loss_count', 'loss', 'norm_sum', 'norm_count', 'grad_norm', 'skipped', 'in_a_row',
               'longest', 'exceeded_at')

    def __init__(self, device: torch.device, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.values = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)
        self.values[self._FIELDS.index('exceeded_at')] = -1
        self._at = {name: i for i, name in enumerate(self._FIELDS)}
        self.parts: dict[str, torch.Tensor] = {}  # name -> [last, sum] of a part of the loss (Swin-MoE)

    def _get(self, name: str) -> torch.Tensor:
        return self.values[self._at[name]]

    def _set(self, name: str, value: torch.Tensor) -> None:
        self.values[self._at[name]] = value

    def add_loss(self, loss: torch.Tensor, batch_size: int, parts: Optional[dict] = None) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        for name, value in (parts or {}).items():
            value = value.detach().double().to(self.values.device)
            total = self.parts.get(name, torch.zeros(2, dtype=torch.float64, device=self.values.device))[1]
            self.parts[name] = torch.stack([value, total + torch.where(finite, value * batch_size, 0.0)])
        self._set('loss_sum', self._get('loss_sum') + torch.where(finite, loss * batch_size, 0.0))
        self._set('loss_count', self._get('loss_count') + finite * batch_size)
        self._set('loss', loss)

    def add_step(self, grad_norm: torch.Tensor, skipped: torch.Tensor, idx: int) -> None:
        norm = grad_norm.detach().double().to(self.values.device)
        finite = torch.isfinite(norm)
        skipped = skipped.to(self.values.device)
        self._set('norm_sum', self._get('norm_sum') + torch.where(finite, norm, 0.0))
        self._set('norm_count', self._get('norm_count') + finite)
        self._set('grad_norm', norm)
        self._set('skipped', self._get('skipped') + skipped)
        in_a_row = torch.where(skipped, self._get('in_a_row') + 1, 0.0)
        self._set('in_a_row', in_a_row)
        self._set('longest', torch.maximum(self._get('longest'), in_a_row))
        first = (in_a_row > self.max_in_a_row) & (self._get('exceeded_at') < 0)
        self._set('exceeded_at', torch.where(first, float(idx), self._get('exceeded_at')))

    def read(self, stop_requested: bool, agree: bool) -> dict:
        """The numbers on the host (one transfer). With ``agree``, ``stop`` and ``exceeded_at`` are first agreed
        over all ranks with one MAX all-reduce: every rank then stops, or fails, after the same step."""
        flags = torch.stack([torch.tensor(float(stop_requested), dtype=torch.float64, device=self.values.device),
                             self._get('exceeded_at')])
        if agree:
            flags = all_reduce_max(flags)
        stop, exceeded_at, *values = torch.cat([flags, self.values, *self.parts.values()]).tolist()
        read = dict(zip(self._FIELDS, values), stop=bool(stop), exceeded_at=int(exceeded_at))
        count = read['loss_count'] or float('nan')
        parts = values[len(self._FIELDS):]
        read['parts'] = {name: (parts[2 * i], parts[2 * i + 1] / count) for i, name in enumerate(self.parts)}
        read['loss_avg'] = read['loss_sum'] / read['loss_count'] if read['loss_count'] else float('nan')
        read['grad_norm_avg'] = read['norm_sum'] / read['norm_count'] if read['norm_count'] else float('nan')
        read['skipped'] = int(read['skipped'])
        return read

    def raise_if_too_many_in_a_row(self, read: dict, epoch: int) -> None:
        if read['exceeded_at'] >= 0:
            raise UserError(f"non-finite gradients at epoch {epoch} step {read['exceeded_at']}: more than "
                            f"{self.max_in_a_row} optimizer steps in a row had inf/NaN loss or gradients "
                            f"(TRAIN.MAX_NONFINITE_STEPS={self.max_in_a_row}); the last good checkpoint is kept; "
                            f"lower TRAIN.BASE_LR or check the data")


@dataclass
class EpochProgress:
    """Where an epoch is, for its log steps: the epoch of ``epochs`` (TRAIN.EPOCHS), ``num_steps`` batches, and the
    host-side meters (the step time, the loss scale as seen at the log steps)."""
    epoch: int
    epochs: int
    num_steps: int
    logger: logging.Logger
    step_time: AverageMeter = field(default_factory=AverageMeter)
    loss_scale: AverageMeter = field(default_factory=AverageMeter)


def log_train_step(ctx: TrainContext, progress: EpochProgress, idx: int, read: dict) -> None:
    """The official ``Train: [e/E][i/N]`` line for batch ``idx`` from :meth:`StepStats.read`, and the step's loss,
    lr and grad_norm to ``ctx.recorder`` (TensorBoard, trackers) at the global batch index."""
    lr = ctx.optimizer.param_groups[0]['lr']
    wd = ctx.optimizer.param_groups[0]['weight_decay']
    step_time, scale, epoch, num_steps = progress.step_time, progress.loss_scale, progress.epoch, progress.num_steps
    scale.update(ctx.loss_scaler.get_scale())
    eta = step_time.avg * (num_steps - idx - 1)
    progress.logger.info(
        f'Train: [{epoch}/{progress.epochs}][{idx}/{num_steps}]\t'
        f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t wd {wd:.4f}\t'
        f'time {step_time.val:.4f} ({step_time.avg:.4f})\t'
        f'loss {read["loss"]:.4f} ({read["loss_avg"]:.4f})\t'
        + ''.join(f'{name} {last:.4f} ({avg:.4f})\t' for name, (last, avg) in read['parts'].items()) +
        f'grad_norm {read["grad_norm"]:.4f} ({read["grad_norm_avg"]:.4f})\t'
        f'loss_scale {scale.val:.4f} ({scale.avg:.4f})\t'
        f'mem {memory_mb(ctx.device):.0f}MB')
    if read['skipped']:
        progress.logger.warning(f"{read['skipped']} optimizer steps skipped so far in epoch {epoch} (inf/NaN "
                                f"gradients; {int(read['in_a_row'])} in a row now)")
    if ctx.recorder is not None:
        ctx.recorder.log_step(epoch * num_steps + idx,
                              {'train/loss': read['loss'], 'train/lr': lr, 'train/grad_norm': read['grad_norm']})


@dataclass
class EvalOptions:
    """What an evaluation reports besides its figures: ``label`` (e.g. 'EMA ') goes before 'Acc@1' in its summary
    lines, so parsers of the official line see only the main model's; ``class_counter``, when given, also counts
    each class's top-1 predictions (per-class accuracy, confusion matrix; see :meth:`per_class`)."""
    label: str = ''
    class_counter: Optional[ClassCounter] = None

    @classmethod
    def per_class(cls, num_classes: int, device: torch.device) -> 'EvalOptions':
        return cls(class_counter=ClassCounter(num_classes, device))


@torch.no_grad()
def validate(config, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype], logger: logging.Logger,
             options: Optional[EvalOptions] = None) -> tuple[float, float, float]:
    """Top-1, top-5 (percent) and mean loss over the whole validation set.

    Each rank counts its own shard; the sums are added across ranks, so every image counts once
    and the result does not depend on the number of processes. See :class:`EvalOptions` for ``options``.
    """
    options = options or EvalOptions()
    label, class_counter = options.label, options.class_counter
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    # correct@1, correct@5, summed loss on the device (read at the log steps only); the image count on the host
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    num_steps = len(data_loader)
    missing = forwards_to_join(model, device, num_steps)
    end = time.time()
    for idx, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        if isinstance(output, tuple):  # Swin-MoE: (logits, auxiliary loss)
            output = output[0]
        output = output.float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(targets[:, None])
        sums += torch.stack([hits[:, :1].sum(), hits.sum(), criterion(output, targets)]).to(torch.float64)
        if class_counter is not None:
            class_counter.update(top5[:, 0], targets)
        count += len(targets)
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            correct1, correct5, loss_sum = sums.tolist()  # one transfer
            n = max(count, 1)
            logger.info(f'Test: [{idx}/{num_steps}]\tTime {time.time() - end:.3f}\t'
                        f'Loss {loss_sum / n:.4f}\tAcc@1 {100 * correct1 / n:.3f}\t'
                        f'Acc@5 {100 * correct5 / n:.3f}\tMem {memory_mb(device):.0f}MB')
    join_collective_forwards(config, model, device, amp_dtype, missing)
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64).to(device)])
    correct1, correct5, loss_sum, total = all_reduce_sum(totals).tolist()
    count = max(total, 1.0)
    acc1, acc5, loss = 100 * correct1 / count, 100 * correct5 / count, loss_sum / count
    logger.info(f' * {label}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}')
    logger.info(f'{label}validation over {int(total)} images: mean loss {loss:.6f}')
    return acc1, acc5, loss


@torch.no_grad()
def validate_multilabel(config, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
                        amp_dtype: Optional[torch.dtype], logger: logging.Logger,
                        label: str = '') -> tuple[MultiLabelMetrics, float]:
    """mAP, F1 (at TEST.THRESHOLD) and per-class AP of multi-hot targets over the whole validation set, and the
    mean binary cross-entropy (over images and classes).

    Average precision ranks all the images, so each rank keeps its shard's logits and targets on the device and
    they are gathered from every rank at the end: the figures are those of the whole set, whatever the number of
    processes (every rank computes them, so decisions taken on them agree).
    """
    model.eval()
    rows, sums, count = [], torch.zeros(1, dtype=torch.float64, device=device), 0
    num_steps = len(data_loader)
    missing = forwards_to_join(model, device, num_steps)
    end = time.time()
    for idx, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True).float()
        with autocast(device, amp_dtype):
            output = model(images)
        if isinstance(output, tuple):  # Swin-MoE: (logits, auxiliary loss)
            output = output[0]
        output = output.float()
        sums += torch.nn.functional.binary_cross_entropy_with_logits(output, targets, reduction='sum').double()
        rows.append(torch.cat([output, targets], dim=1))
        count += len(targets)
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            logger.info(f'Test: [{idx}/{num_steps}]\tTime {time.time() - end:.3f}\t'
                        f'Loss {sums.item() / max(count * output.shape[1], 1):.4f}\tMem {memory_mb(device):.0f}MB')
    join_collective_forwards(config, model, device, amp_dtype, missing)
    width = config.MODEL.NUM_CLASSES
    local = torch.cat(rows) if rows else torch.zeros(0, 2 * width, device=device)
    every = all_gather_rows(local)
    loss_sum = all_reduce_sum(sums).item()
    metrics = multilabel_metrics(every[:, :width], every[:, width:], config.TEST.THRESHOLD)
    loss = loss_sum / max(len(every) * width, 1)
    logger.info(f' * {label}mAP {metrics.map:.3f} F1-macro {metrics.f1_macro:.3f} F1-micro {metrics.f1_micro:.3f} '
                f'(threshold {config.TEST.THRESHOLD:g})')
    logger.info(f'{label}validation over {len(every)} images: mean loss {loss:.6f}')
    return metrics, loss


@dataclass
class Evaluation:
    """One validation's figures: ``metrics`` acc1, acc5, loss (single-label data) or map, f1_macro, f1_micro,
    loss (multi-label); ``per_class`` the per-class figures when asked for (multi-label: always there)."""
    metrics: dict[str, float]
    per_class: Optional[ClassCounts | MultiLabelMetrics] = None

    @property
    def score(self) -> float:
        """The main figure: Acc@1, or mAP for multi-label data."""
        return self.metrics['map'] if 'map' in self.metrics else self.metrics['acc1']


def is_multilabel(config) -> bool:
    """Whether the run's data are multi-label (a DATA.LABEL_FILE)."""
    return bool(config.DATA.LABEL_FILE)


def evaluate(config, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype], logger: logging.Logger,
             options: Optional[EvalOptions] = None) -> Evaluation:
    """:func:`validate`, or :func:`validate_multilabel` for multi-label data (whose per-class figures are always
    there); with a class counter in ``options`` the single-label per-class counts too. Logs the official
    ``Accuracy of the network`` line (mAP for multi-label data) for the main model (no label)."""
    options = options or EvalOptions()
    if is_multilabel(config):
        metrics, loss = validate_multilabel(config, data_loader, model, device, amp_dtype, logger, options.label)
        result = Evaluation({**metrics.scores(), 'loss': loss}, metrics)
    else:
        acc1, acc5, loss = validate(config, data_loader, model, device, amp_dtype, logger, options)
        counter = options.class_counter
        result = Evaluation({'acc1': acc1, 'acc5': acc5, 'loss': loss}, counter.result() if counter else None)
    dataset = getattr(data_loader, 'dataset', None)
    if not options.label and dataset is not None:
        what = 'mAP' if is_multilabel(config) else 'Accuracy'
        logger.info(f"{what} of the network on the {len(dataset)} test images: {result.score:.1f}%")
    return result


def forward_is_collective(model: torch.nn.Module) -> bool:
    """Whether every rank must take part in each forward of ``model``: FSDP all-gathers each unit's weights,
    and modules that exchange data between ranks say so with a true ``collective_forward`` (Swin-MoE's experts
    on several processes)."""
    return is_sharded(model) or any(getattr(m, 'collective_forward', False) for m in unwrap_model(model).modules())


def forwards_to_join(model: torch.nn.Module, device: torch.device, num_steps: int) -> int:
    """How many throw-away forwards this rank owes after its ``num_steps`` batches so that it runs as many
    collective forwards as the rank with the most (0 when the forward is not a collective). Agreed before the
    first batch: once the ranks are in their forwards, an all-reduce of one would meet another's collective."""
    if not forward_is_collective(model):
        return 0
    return int(all_reduce_max(torch.tensor(num_steps, device=device)).item()) - num_steps


def join_collective_forwards(config, model: torch.nn.Module, device: torch.device,
                             amp_dtype: Optional[torch.dtype], missing: int) -> None:
    """Run ``missing`` forwards of one blank image whose outputs are thrown away: exact evaluation gives a rank
    fewer batches where the set does not split evenly, and the others' collective forwards wait for it. They
    count nowhere, so the result stays the exact one."""
    if missing <= 0:
        return
    height, width = img_size_hw(config.DATA.IMG_SIZE)
    chans = unwrap_model(model).patch_embed.proj.in_channels
    blank = torch.zeros(1, chans, height, width, device=device)
    for _ in range(missing):
        with autocast(device, amp_dtype):
            model(blank)


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
