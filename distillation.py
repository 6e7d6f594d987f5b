"""Knowledge distillation: a frozen teacher's logits join a classifier's training loss (DeiT's soft and hard kinds).

    loss = (1 - DISTILL.ALPHA) * base + DISTILL.ALPHA * distillation
    soft: KL(softmax(teacher / TAU) || softmax(student / TAU)) * TAU^2, the KL per image averaged over the batch
    hard: cross-entropy of the student's logits on the teacher's argmax (DeiT's hard distillation)

``base`` is the run's own criterion on the (mixed) targets. The teacher sees the same mixed batch as the student,
under the same autocast, without gradients; it is built by the model builder from DISTILL.TEACHER_CFG (or the
config its weights carry) and loaded from DISTILL.TEACHER_WEIGHTS (any layout ``--pretrained`` reads), in
evaluation mode with ``requires_grad`` off. It is no part of the trained model: not wrapped in DDP, not in the
optimizer, not in checkpoints; being deterministic, it keeps resumed runs exact.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from config import img_size_hw
from engine import TrainContext, autocast, mixed_batch
from models import build_model
from utils.checkpoint import load_converted
from utils.errors import UserError
from utils.pretrained import build_config, read_for_use


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL divergence of the student's from the teacher's class distribution at temperature ``tau``, times tau^2
    (Hinton's scaling, as DeiT and timm), averaged over the batch."""
    return F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction='batchmean',
                    log_target=True) * (tau * tau)


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's logits on the teacher's top class (DeiT)."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss:
    """A :class:`~trainer.Variant`'s loss, ``(ctx, batch) -> (loss, batch size)``: the run's criterion mixed with
    the distillation term of ``kind`` ('soft' or 'hard') against ``teacher``'s logits on the same batch."""

    def __init__(self, teacher: nn.Module, kind: str = 'soft', tau: float = 1.0, alpha: float = 0.5):
        if kind not in ('soft', 'hard'):
            raise ValueError(f"distillation kind {kind!r}: soft or hard")
        self.teacher, self.kind, self.tau, self.alpha = teacher, kind, float(tau), float(alpha)

    def distillation_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The distillation part of the loss, computed in float32 whatever the autocast dtype."""
        student, teacher = student.float(), teacher.float()
        if self.kind == 'hard':
            return hard_distillation(student, teacher)
        return soft_distillation(student, teacher, self.tau)

    def __call__(self, ctx: TrainContext, batch) -> tuple[torch.Tensor, int]:
        samples, targets = mixed_batch(ctx, batch)
        with autocast(ctx.device, ctx.amp_dtype):
            logits = ctx.model(samples)
            base = ctx.criterion(logits, targets)
            with torch.no_grad():
                teacher_logits = self.teacher(samples)
        loss = (1 - self.alpha) * base + self.alpha * self.distillation_term(logits, teacher_logits)
        return loss, samples.shape[0]


def _teacher_config(config, saved, snapshot):
    """The teacher's model config: DISTILL.TEACHER_CFG, else the config its weights carry (ours, or a snapshot's
    config.json); CPU_KERNELS as the run's."""
    distill = config.DISTILL
    if not distill.TEACHER_CFG and saved is None and not snapshot.config_kind:
        raise UserError(f"--teacher-weights {distill.TEACHER_WEIGHTS} holds no config: pass the teacher's "
                        "--teacher-cfg (DISTILL.TEACHER_CFG)")
    args = SimpleNamespace(cfg=distill.TEACHER_CFG or None, opts=None, weights=distill.TEACHER_WEIGHTS)
    try:
        teacher_cfg = build_config(args, saved, snapshot).clone()
    except UserError as e:
        raise UserError(f"teacher (DISTILL.TEACHER_CFG / TEACHER_WEIGHTS): {e}") from None
    teacher_cfg.defrost()
    teacher_cfg.CPU_KERNELS = config.CPU_KERNELS
    teacher_cfg.freeze()
    return teacher_cfg


def _check_teacher(config, teacher_cfg) -> None:
    """The teacher must predict the student's classes, from the student's images."""
    if teacher_cfg.MODEL.TYPE == 'swin_moe':
        raise UserError("DISTILL: a Swin-MoE teacher is not supported (its experts are spread over the ranks)")
    if teacher_cfg.MODEL.NUM_CLASSES != config.MODEL.NUM_CLASSES:
        raise UserError(f"DISTILL: the teacher has {teacher_cfg.MODEL.NUM_CLASSES} classes (MODEL.NUM_CLASSES of "
                        f"its config), the student {config.MODEL.NUM_CLASSES}: they must be the same")
    own, theirs = img_size_hw(config.DATA.IMG_SIZE), img_size_hw(teacher_cfg.DATA.IMG_SIZE)
    if own != theirs and not teacher_cfg.MODEL.DYNAMIC_IMG_SIZE:
        raise UserError(f"DISTILL: the teacher's DATA.IMG_SIZE {teacher_cfg.DATA.IMG_SIZE} differs from the "
                        f"student's {config.DATA.IMG_SIZE}; it sees the student's images: give its config "
                        "MODEL.DYNAMIC_IMG_SIZE True to let it take them")


def build_teacher(config, device: torch.device, logger: logging.Logger) -> nn.Module:
    """The frozen teacher of DISTILL.*: built by the model builder, its weights loaded strictly, on ``device``, in
    evaluation mode without gradients. UserError (one line) for weights that do not fit or another class count."""
    path = config.DISTILL.TEACHER_WEIGHTS
    snapshot, saved = read_for_use(path)
    if snapshot.layout.name == 'simmim':
        raise UserError(f"--teacher-weights {path} is a SimMIM pre-training checkpoint (no classifier)")
    teacher_cfg = _teacher_config(config, saved, snapshot)
    _check_teacher(config, teacher_cfg)
    teacher = build_model(teacher_cfg, device=device)
    load_converted(teacher, snapshot.state, snapshot.layout, path)
    teacher.to(device).eval().requires_grad_(False)
    logger.info(f"teacher: {teacher_cfg.MODEL.TYPE}/{teacher_cfg.MODEL.NAME} from {snapshot.describe()}")
    return teacher


def build_distillation_loss(config, device: torch.device, logger: logging.Logger) -> DistillationLoss:
    """DISTILL.*'s loss: the teacher (:func:`build_teacher`), DISTILL.TYPE, TAU and ALPHA."""
    distill = config.DISTILL
    teacher = build_teacher(config, device, logger)
    logger.info(f"distillation: {distill.TYPE}, loss = {1 - distill.ALPHA:g} * base + {distill.ALPHA:g} * "
                f"distillation" + (f" (tau {distill.TAU:g})" if distill.TYPE == 'soft' else ''))
    return DistillationLoss(teacher, distill.TYPE, distill.TAU, distill.ALPHA)
