"""TRAIN.LAYER_DECAY on the real models: each block's lr shrinks with its distance from the head."""
from __future__ import annotations

import pytest
import torch

from config import get_default_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer

SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}


def _cfg(model_type: str, layer_decay: float):
    cfg = get_default_config()
    cfg.MODEL.TYPE = model_type
    section = cfg.MODEL[SECTIONS[model_type]]
    section.EMBED_DIM, section.DEPTHS, section.NUM_HEADS, section.WINDOW_SIZE = 16, [1, 2], [1, 2], 4
    if model_type == 'swinv2':
        section.PRETRAINED_WINDOW_SIZES = [0, 0]
    cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES = 32, 3
    cfg.TRAIN.LAYER_DECAY, cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_EPOCHS = layer_decay, 1e-3, 0
    cfg.freeze()
    return cfg


def _groups_by_name(model, optimizer):
    where = {id(p): g for g in optimizer.param_groups for p in g['params']}
    return {name: where[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'swin_mlp'])
def test_lr_scale_follows_block_depth(model_type):
    cfg = _cfg(model_type, 0.5)
    model = build_model(cfg)
    groups = _groups_by_name(model, build_optimizer(cfg, model))  # every parameter is in a group
    scale = {name: g['lr_scale'] for name, g in groups.items()}
    blocks = 3  # depths [1, 2]: ids 0 (stem), 1..3 (blocks), 4 (norm and head)
    assert scale['patch_embed.proj.weight'] == 0.5 ** (blocks + 1)
    for name, value in scale.items():
        if name.startswith('layers.0.'):  # the one block of stage 0 and the downsample after it
            assert value == 0.5 ** 3, name
        elif name.startswith('layers.1.blocks.0.'):
            assert value == 0.5 ** 2, name
        elif name.startswith('layers.1.blocks.1.'):
            assert value == 0.5 ** 1, name
        elif name.startswith(('norm.', 'head.')):
            assert value == 1.0, name


@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'swin_mlp'])
def test_layer_decay_keeps_the_no_weight_decay_rules(model_type):
    cfg = _cfg(model_type, 0.75)
    model = build_model(cfg)
    groups = _groups_by_name(model, build_optimizer(cfg, model))
    decayed = {name for name, g in groups.items() if g['weight_decay'] > 0}
    assert 'layers.1.blocks.1.mlp.fc1.weight' in decayed and 'head.weight' in decayed
    assert 'layers.1.blocks.1.norm1.weight' not in decayed and 'head.bias' not in decayed
    if model_type == 'swin':
        assert 'layers.0.blocks.0.attn.relative_position_bias_table' not in decayed
    if model_type == 'swinv2':
        assert not {'layers.0.blocks.0.attn.cpb_mlp.0.weight', 'layers.0.blocks.0.attn.logit_scale'} & decayed
    if model_type == 'swin_mlp':
        assert 'layers.0.blocks.0.spatial_mlp.weight' in decayed


def test_scheduler_lr_of_the_stem_is_the_base_lr_times_its_scale():
    cfg = _cfg('swinv2', 0.5)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    build_scheduler(cfg, optimizer, n_iter_per_epoch=4).step_update(0)
    group = _groups_by_name(model, optimizer)['patch_embed.proj.weight']
    assert group['lr'] == pytest.approx(1e-3 * 0.5 ** 4)
    assert max(g['lr'] for g in optimizer.param_groups) == pytest.approx(1e-3)


def test_without_layer_decay_there_are_the_two_official_groups():
    cfg = _cfg('swin', 1.0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert len(optimizer.param_groups) == 2 and all('lr_scale' not in g for g in optimizer.param_groups)
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.parameters()))
    torch.testing.assert_close(optimizer.param_groups[1]['weight_decay'], 0.0)
