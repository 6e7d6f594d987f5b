"""The optimizer: parameter groups without weight decay, optional layer-wise lr decay, AdamW or SGD (official), or
any of timm's optimizers that steps on such groups (LAMB, Lion, ...).

No weight decay for 1-D parameters (norms), biases, and whatever the model lists in
``no_weight_decay()`` / ``no_weight_decay_keywords()`` (Swin: absolute_pos_embed,
relative_position_bias_table; SwinV2 also logit_scale, cpb_mlp).

Without layer decay there are exactly two groups, [decay, no-decay], in the official order, so an
official checkpoint's optimizer state loads. With ``TRAIN.LAYER_DECAY != 1`` each group also carries
``lr_scale`` = LAYER_DECAY ** (num_layers - layer_id); the group's ``lr`` stays the base lr and the
scheduler (timm's ``Scheduler.update_groups``) multiplies it by ``lr_scale`` at every step.

timm's optimizers are built by ``timm.optim.create_optimizer_v2`` from these same groups (not from the model, so
timm's own grouping never runs): the no-decay lists and layer decay hold for them as for AdamW.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from config import get_default_config
from utils.distributed import unwrap_model
from utils.errors import UserError

OPTIMIZERS = ('adamw', 'fused_adam', 'sgd')  # the official names, built here
_DEFAULT_OPTIMIZER = get_default_config().TRAIN.OPTIMIZER


def _skip_lists(model: torch.nn.Module) -> tuple[set, set]:
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, 'no_weight_decay_keywords') else set()
    return skip, keywords


def is_no_decay(name: str, param: torch.Tensor, skip: Iterable[str] = (), keywords: Iterable[str] = ()) -> bool:
    """True for the parameters the official recipe leaves out of weight decay."""
    return (param.ndim <= 1 or name.endswith('.bias') or name in skip
            or any(k in name for k in keywords))


def swin_depths(model: torch.nn.Module) -> list[int]:
    """Blocks per stage, read from ``model.layers[i].blocks``; [] for a model without stages."""
    layers = getattr(model, 'layers', None)
    if layers is None:
        return []
    return [len(getattr(layer, 'blocks', ())) for layer in layers]


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth index of a parameter: 0 for the stem, 1.. for blocks in order, num_layers for norm/head.

    A stage's downsample shares the id of the stage's last block, as in the official SimMIM fine-tuning.
    """
    num_layers = sum(depths) + 1
    if name.startswith(('patch_embed', 'absolute_pos_embed', 'mask_token')):
        return 0
    parts = name.split('.')
    if parts[0] == 'layers' and len(parts) > 2:
        stage = int(parts[1])
        if parts[2] == 'blocks':
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths[:stage + 1])  # downsample (and anything else inside the stage)
    return num_layers


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Parameter groups keyed by (decay or not[, layer]); frozen parameters are left out."""
    skip, keywords = _skip_lists(model)
    depths = swin_depths(model) if layer_decay != 1.0 else []
    num_layers = sum(depths) + 1
    groups: dict[tuple, dict[str, Any]] = {}
    if layer_decay == 1.0:  # the official two groups, always both, in this order
        groups[(True,)] = {'params': [], 'weight_decay': weight_decay}
        groups[(False,)] = {'params': [], 'weight_decay': 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not is_no_decay(name, param, skip, keywords)
        key: tuple = (decay,)
        if layer_decay != 1.0:
            layer = swin_layer_id(name, depths)
            key = (decay, layer)
            groups.setdefault(key, {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                                    'lr_scale': layer_decay ** (num_layers - layer)})
        groups[key]['params'].append(param)
    return list(groups.values())


def _adamw(params, config, fused_ok: bool) -> torch.optim.Optimizer:
    opt = config.TRAIN.OPTIMIZER
    kwargs = {'fused': True} if fused_ok else {'foreach': True}
    return torch.optim.AdamW(params, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS),
                             weight_decay=config.TRAIN.WEIGHT_DECAY, **kwargs)


def timm_optimizers() -> list[str]:
    """The names timm's ``create_optimizer_v2`` takes on top of ours: all it lists but ours and the second-order
    ones (AdaHessian needs a backward that builds the graph of the gradients; our loop's does not). Some need a
    package of their own and CUDA (``bnb*``: bitsandbytes, ``fused*``: apex): asking for one without them is an
    error line."""
    from timm.optim import get_optimizer_info, list_optimizers
    return [name for name in list_optimizers()
            if name not in OPTIMIZERS and not get_optimizer_info(name).second_order]


def _timm_optimizer(name: str, params: list[dict[str, Any]], config) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` over our parameter groups. TRAIN.OPTIMIZER.EPS and BETAS reach it only where they
    differ from their defaults (AdamW's, for the official optimizers), as timm's train.py passes --opt-eps and
    --opt-betas only when given: otherwise the optimizer's own defaults hold (Lion's betas (0.9, 0.99), Adan's
    three). MOMENTUM reaches those that take one (LARS, SGDP, RMSprop, ...)."""
    from timm.optim import create_optimizer_v2, get_optimizer_info
    opt, default, info = config.TRAIN.OPTIMIZER, _DEFAULT_OPTIMIZER, get_optimizer_info(name)
    kwargs: dict[str, Any] = {}
    if opt.EPS != default.EPS:
        kwargs['eps'] = opt.EPS  # timm drops it for an optimizer without one (and betas likewise)
    if tuple(opt.BETAS) != tuple(default.BETAS):
        if info.has_betas and len(opt.BETAS) != info.num_betas:
            raise UserError(f"TRAIN.OPTIMIZER.BETAS {list(opt.BETAS)} has {len(opt.BETAS)} entries; "
                            f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} takes {info.num_betas}")
        kwargs['betas'] = tuple(opt.BETAS)
    try:
        return create_optimizer_v2(params, name, lr=config.TRAIN.BASE_LR, weight_decay=config.TRAIN.WEIGHT_DECAY,
                                   momentum=opt.MOMENTUM, **kwargs)
    except (ImportError, AssertionError) as e:  # timm asserts what bitsandbytes and apex need (CUDA, the package)
        raise UserError(f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} cannot be built here: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. a beta out of [0, 1)
        raise UserError(f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} with TRAIN.OPTIMIZER.EPS {opt.EPS} and BETAS "
                        f"{list(opt.BETAS)}: {e}") from None


def build_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """TRAIN.OPTIMIZER.NAME: 'adamw', 'fused_adam' (the official apex name: fused AdamW), 'sgd' (Nesterov), or one of
    :func:`timm_optimizers` ('lamb', 'lion', ...: :func:`_timm_optimizer`).

    ``config.TRAIN.BASE_LR`` is used as is: scale it for the batch size before calling.
    """
    model = unwrap_model(model)
    params = param_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.LAYER_DECAY)
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    tensors = [p for g in params for p in g['params']]
    # The fused AdamW kernel exists for CUDA and CPU and beats foreach on both (measured on 2 CPU
    # cores: 21 ms against 69 ms per Swin-T step); it needs all parameters floating and on one kind.
    fused_ok = bool(tensors) and all(p.is_floating_point() and p.device.type in ('cuda', 'cpu') for p in tensors) \
        and len({p.device.type for p in tensors}) == 1
    if name in ('adamw', 'fused_adam'):
        return _adamw(params, config, fused_ok=fused_ok)
    if name == 'sgd':
        return torch.optim.SGD(params, lr=config.TRAIN.BASE_LR, momentum=config.TRAIN.OPTIMIZER.MOMENTUM,
                               nesterov=True, weight_decay=config.TRAIN.WEIGHT_DECAY)
    others = timm_optimizers()
    if name in others:
        return _timm_optimizer(name, params, config)
    raise UserError(f"TRAIN.OPTIMIZER.NAME {config.TRAIN.OPTIMIZER.NAME!r} is not supported; choose one of "
                    f"{', '.join(OPTIMIZERS)} (official) or of timm's: {', '.join(others)}")
