"""Turn a config into a model: the only place in models/ that reads config keys."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from utils.errors import UserError
from . import cpu
from .simmim import SimMIM
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_transformer_moe import SwinTransformerMoE
from .swin_transformer_v2 import SwinTransformerV2

__all__ = ['build_model']


def _common_args(config, sub) -> dict:
    """Constructor arguments every family shares, from MODEL.* and the family's sub-section."""
    return dict(img_size=config.DATA.IMG_SIZE, patch_size=sub.PATCH_SIZE, in_chans=sub.IN_CHANS,
                num_classes=config.MODEL.NUM_CLASSES, embed_dim=sub.EMBED_DIM, depths=list(sub.DEPTHS),
                num_heads=list(sub.NUM_HEADS), window_size=sub.WINDOW_SIZE, mlp_ratio=sub.MLP_RATIO,
                drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=sub.APE,
                patch_norm=sub.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
                frozen_stages=_frozen_stages(config, len(sub.DEPTHS)))


def _frozen_stages(config, num_stages: int) -> int:
    """The backbone's ``frozen_stages`` from TRAIN.FROZEN_STAGES; TRAIN.HEAD_ONLY freezes every stage (and
    :func:`build_model` the final norm after them). Configs saved before these keys freeze nothing."""
    train = config.TRAIN
    if train.get('HEAD_ONLY', False):
        return num_stages
    frozen = train.get('FROZEN_STAGES', -1)
    if not -1 <= frozen <= num_stages:
        raise UserError(f"TRAIN.FROZEN_STAGES {frozen} must be in [-1, {num_stages}] for a model of {num_stages} "
                        "stages (-1: nothing frozen; 0: the patch embedding; k: it and the first k stages)")
    return frozen


def _backbone_args(config) -> dict:
    """What the V1, V2 and Swin-MLP backbones take beyond the shared arguments."""
    return dict(dynamic_img_size=config.MODEL.DYNAMIC_IMG_SIZE)


def _build(model_type: str, config) -> nn.Module:
    if model_type == 'swin':
        sub = config.MODEL.SWIN
        # FUSED_WINDOW_PROCESS is accepted and ignored: the plain roll + partition path is used.
        return SwinTransformer(**_common_args(config, sub), qkv_bias=sub.QKV_BIAS, qk_scale=sub.QK_SCALE,
                               fused_window_process=config.FUSED_WINDOW_PROCESS, **_backbone_args(config))
    if model_type == 'swinv2':
        sub = config.MODEL.SWINV2
        pretrained = list(sub.PRETRAINED_WINDOW_SIZES)
        if not any(pretrained):  # the all-zero default fits any number of stages
            pretrained = [0] * len(sub.DEPTHS)
        return SwinTransformerV2(**_common_args(config, sub), qkv_bias=sub.QKV_BIAS,
                                 pretrained_window_sizes=pretrained, **_backbone_args(config))
    if model_type == 'swin_mlp':
        return SwinMLP(**_common_args(config, config.MODEL.SWIN_MLP), **_backbone_args(config))
    if model_type == 'swin_moe':
        sub = config.MODEL.SWIN_MOE
        return SwinTransformerMoE(
            **_common_args(config, sub), qkv_bias=sub.QKV_BIAS, qk_scale=sub.QK_SCALE, mlp_fc2_bias=sub.MLP_FC2_BIAS,
            init_std=sub.INIT_STD, pretrained_window_sizes=list(sub.PRETRAINED_WINDOW_SIZES),
            moe_blocks=[list(b) for b in sub.MOE_BLOCKS], num_local_experts=sub.NUM_LOCAL_EXPERTS,
            top_value=sub.TOP_VALUE, capacity_factor=sub.CAPACITY_FACTOR, cosine_router=sub.COSINE_ROUTER,
            normalize_gate=sub.NORMALIZE_GATE, use_bpr=sub.USE_BPR, is_gshard_loss=sub.IS_GSHARD_LOSS,
            gate_noise=sub.GATE_NOISE, cosine_router_dim=sub.COSINE_ROUTER_DIM,
            cosine_router_init_t=sub.COSINE_ROUTER_INIT_T, moe_drop=sub.MOE_DROP, aux_loss_weight=sub.AUX_LOSS_WEIGHT)
    raise UserError(f"unknown MODEL.TYPE {model_type!r} (choose from swin, swinv2, swin_moe, swin_mlp)")


def build_model(config, is_pretrain: bool = False, device: Union[str, torch.device] = 'cpu') -> nn.Module:
    """Build the classifier described by ``config.MODEL`` (TYPE picks the family) at DATA.IMG_SIZE, for ``device``.

    ``is_pretrain``: the SimMIM pre-training model around a headless backbone (MODEL.SIMMIM.*).
    For a CPU the reference modules are swapped for their CPU versions (:mod:`models.cpu`; same parameters and
    keys; ``impl=cpu`` in the printed model) unless ``CPU_KERNELS`` is False or TRAIN.SHARDING is fsdp; any other
    device gets the reference model. The model is returned on the CPU, for the caller to move. A size or shape that
    the architecture cannot take is a UserError naming the keys involved.

    TRAIN.FROZEN_STAGES and TRAIN.HEAD_ONLY come out as parameters that do not require gradients (so the optimizer
    and DDP leave them out) and frozen stages that stay in eval mode (:class:`~models.swin_base.SwinBase`).
    """
    head_only = config.TRAIN.get('HEAD_ONLY', False)
    if is_pretrain:
        if head_only:
            raise UserError("TRAIN.HEAD_ONLY trains the classifier head alone: SimMIM pre-training has no head")
        encoder = build_model(config, device=device)
        encoder.reset_classifier(0)
        target = config.MODEL.SIMMIM.NORM_TARGET
        return SimMIM(encoder, norm_target_patch_size=target.PATCH_SIZE if target.ENABLE else 0)
    model = _build_reference(config)
    if head_only:  # a linear probe: the stages are frozen by the constructor, the final norm here
        model.norm.requires_grad_(False)
    # FSDP (TRAIN.SHARDING fsdp) all-gathers fresh weight tensors for every forward: the CPU modules' caches of
    # converted weights would only miss, so sharded runs keep the reference modules.
    sharded = config.get('TRAIN', {}).get('SHARDING', 'ddp') == 'fsdp'
    if torch.device(device).type == 'cpu' and config.get('CPU_KERNELS', True) and not sharded:
        cpu.accelerate(model)
    return model


def _build_reference(config) -> nn.Module:
    model_type = config.MODEL.TYPE
    try:
        return _build(model_type, config)
    except ValueError as e:
        section = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}[model_type]
        raise UserError(f"cannot build MODEL.TYPE {model_type!r} with DATA.IMG_SIZE {config.DATA.IMG_SIZE} and "
                        f"MODEL.{section}.* as given: {e}") from None
