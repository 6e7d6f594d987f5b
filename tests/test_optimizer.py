"""build_optimizer: no weight decay where the official recipe has none, layer-wise lr decay, optimizer names, timm's
optimizers (LAMB, Lion, ...) on the same parameter groups, resuming exactly."""
from __future__ import annotations

import logging

import pytest
import torch
from timm.optim import Lamb, Lion
from torch import nn

from config import get_default_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer, swin_layer_id
from utils.amp import GradScalerWithNorm
from utils.checkpoint import TrainingState, build_checkpointer
from utils.errors import UserError


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))


class _Stage(nn.Module):
    def __init__(self, dim: int, depth: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.downsample = nn.Sequential() if not downsample else nn.Module()
        if downsample:
            self.downsample.reduction = nn.Linear(dim, dim, bias=False)


class TinySwinLike(nn.Module):
    """Parameter names laid out as in the official Swin: patch_embed, layers.i.blocks.j, downsample, norm, head."""

    def __init__(self, dim: int = 8, depths=(1, 2)):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.layers = nn.ModuleList(_Stage(dim, d, i < len(depths) - 1) for i, d in enumerate(depths))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}


def _cfg(**train):
    cfg = get_default_config()
    cfg.TRAIN.BASE_LR = 1e-3
    for key, value in train.items():
        if key == 'NAME':
            cfg.TRAIN.OPTIMIZER.NAME = value
        else:
            setattr(cfg.TRAIN, key, value)
    cfg.freeze()
    return cfg


def _names(model, group):
    ids = {id(p) for p in group['params']}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_for_norms_biases_and_the_models_skip_lists():
    model = TinySwinLike()
    opt = build_optimizer(_cfg(WEIGHT_DECAY=0.05), model)
    decay, no_decay = opt.param_groups  # the official two groups, in the official order
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert _names(model, decay) == {'patch_embed.weight', 'layers.0.blocks.0.attn.weight',
                                    'layers.1.blocks.0.attn.weight', 'layers.1.blocks.1.attn.weight',
                                    'layers.0.downsample.reduction.weight', 'head.weight'}
    assert {'absolute_pos_embed', 'layers.1.blocks.1.relative_position_bias_table', 'norm.weight',
            'head.bias', 'layers.0.blocks.0.norm1.weight'} <= _names(model, no_decay)


def test_frozen_parameters_are_left_out():
    model = TinySwinLike()
    model.head.weight.requires_grad_(False)
    opt = build_optimizer(_cfg(), model)
    assert 'head.weight' not in set().union(*(_names(model, g) for g in opt.param_groups))


def test_wrapped_model_still_gets_its_skip_lists():
    model = TinySwinLike()
    opt = build_optimizer(_cfg(), torch.compile(model))  # compiles lazily: wrapping costs nothing here
    assert 'absolute_pos_embed' in _names(model, opt.param_groups[1])


@pytest.mark.parametrize('name', ['layers.0.blocks.0.attn.weight', 'layers.0.downsample.reduction.weight'])
def test_downsample_shares_the_layer_of_its_stages_last_block(name):
    assert swin_layer_id(name, [1, 2]) == 1


def test_layer_decay_scales_follow_depth_and_split_decay_groups():
    model = TinySwinLike(depths=(1, 2))  # num_layers = 1 + 2 + 1 = 4
    opt = build_optimizer(_cfg(LAYER_DECAY=0.5), model)
    scale_of = {n: g['lr_scale'] for g in opt.param_groups for n in _names(model, g)}
    assert scale_of['patch_embed.weight'] == scale_of['absolute_pos_embed'] == 0.5 ** 4
    assert scale_of['layers.0.blocks.0.attn.weight'] == scale_of['layers.0.downsample.reduction.weight'] == 0.5 ** 3
    assert scale_of['layers.1.blocks.0.attn.weight'] == 0.5 ** 2
    assert scale_of['layers.1.blocks.1.attn.bias'] == 0.5 ** 1
    assert scale_of['head.weight'] == scale_of['norm.weight'] == 1.0
    for g in opt.param_groups:  # decay and no-decay parameters of one layer sit in separate groups
        decays = {not (n.endswith('bias') or 'norm' in n or 'relative' in n or n == 'absolute_pos_embed')
                  for n in _names(model, g)}
        assert decays == {g['weight_decay'] > 0}


def test_scheduler_multiplies_each_groups_lr_by_its_scale():
    model = TinySwinLike(depths=(1, 2))
    cfg = _cfg(LAYER_DECAY=0.5, WARMUP_EPOCHS=0, EPOCHS=10, MIN_LR=0.0)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, n_iter_per_epoch=10)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(1e-3 * g['lr_scale'])


def test_optimizer_names():
    model = TinySwinLike()
    adamw = build_optimizer(_cfg(NAME='adamw'), model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults['fused'] is True  # the fused kernel runs on the CPU too
    assert adamw.defaults['betas'] == (0.9, 0.999) and adamw.defaults['lr'] == 1e-3
    assert isinstance(build_optimizer(_cfg(NAME='fused_adam'), model), torch.optim.AdamW)
    sgd = build_optimizer(_cfg(NAME='sgd'), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults['nesterov'] and sgd.defaults['momentum'] == 0.9
    with pytest.raises(UserError, match=r"TRAIN.OPTIMIZER.NAME 'adamx' is not supported; choose one of adamw, "
                                        r"fused_adam, sgd \(official\) or of timm's: .*\blamb\b.*\blion\b"):
        build_optimizer(_cfg(NAME='adamx'), model)


def _groups(model, opt) -> list:
    return [(_names(model, g), g['weight_decay'], g['lr_scale']) for g in opt.param_groups]


@pytest.mark.parametrize('name, kind', [('lamb', Lamb), ('lion', Lion)])
def test_timm_optimizers_get_our_parameter_groups(name, kind):
    """Our no-decay lists and layer decay reach timm's optimizer: the groups are AdamW's, group for group."""
    model = TinySwinLike()
    opt = build_optimizer(_cfg(NAME=name, LAYER_DECAY=0.5), model)
    assert type(opt) is kind and opt.defaults['lr'] == 1e-3
    assert _groups(model, opt) == _groups(model, build_optimizer(_cfg(LAYER_DECAY=0.5), model))


def test_betas_and_eps_reach_a_timm_optimizer_only_when_set():
    model = TinySwinLike()
    assert build_optimizer(_cfg(NAME='lion'), model).defaults['betas'] == (0.9, 0.99)  # Lion's own, not AdamW's
    assert build_optimizer(_cfg(NAME='lamb'), model).defaults['eps'] == 1e-6  # LAMB's own
    cfg = _cfg(NAME='lion')
    cfg.defrost()
    cfg.TRAIN.OPTIMIZER.BETAS = (0.95, 0.98)
    assert build_optimizer(cfg, model).defaults['betas'] == (0.95, 0.98)
    cfg.TRAIN.OPTIMIZER.NAME = 'adan'  # three betas
    with pytest.raises(UserError, match=r"TRAIN.OPTIMIZER.BETAS \[0.95, 0.98\] has 2 entries; .*'adan' takes 3"):
        build_optimizer(cfg, model)


def _tiny_run(tmp_path, name: str, seed: int = 0):
    """A tiny Swin (the CPU path), its optimizer ``name`` with layer decay, and the cosine schedule (2 steps an
    epoch)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = get_default_config()
    cfg.OUTPUT = str(tmp_path)
    cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.DROP_PATH_RATE = 32, 3, 0.0
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS = 16, [1, 1], [1, 2]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    cfg.TRAIN.OPTIMIZER.NAME, cfg.TRAIN.LAYER_DECAY = name, 0.9
    cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.EPOCHS = 1e-3, 0, 2
    cfg.freeze()
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    state = TrainingState(model, opt, build_scheduler(cfg, opt, 2), GradScalerWithNorm(enabled=False))
    return build_checkpointer(cfg, state, 0, logging.getLogger('test_optimizer')), state


def _steps(state: TrainingState, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        images, targets = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        state.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(state.model(images), targets).backward()
        state.optimizer.step()
        state.lr_scheduler.step_update(step + 1)


@pytest.mark.parametrize('name', ['lamb', 'lion'])
def test_timm_optimizers_resume_bit_identically(tmp_path, name):
    """4 steps straight, against 2 steps, a checkpoint, fresh objects resumed from it (other initial weights), and
    2 more steps: the same weights and optimizer state to the bit."""
    _, straight = _tiny_run(tmp_path / 'straight', name)
    _steps(straight, range(4))
    checkpointer, first = _tiny_run(tmp_path / 'stopped', name)
    _steps(first, range(2))
    path = checkpointer.save(0, 0.0)
    checkpointer, resumed = _tiny_run(tmp_path / 'stopped', name, seed=1)
    assert checkpointer.resume(path).epoch == 1
    assert type(resumed.optimizer).__name__ == {'lamb': 'Lamb', 'lion': 'Lion'}[name]
    _steps(resumed, range(2, 4))
    for (key, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), key
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        a, b = straight.optimizer.state[p], resumed.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
