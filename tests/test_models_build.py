"""build_model: config keys -> constructor arguments, every shipped YAML builds, clear errors; the registry."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import get_default_config, merge_yaml
from models import (DERIVED_BUFFERS, SwinMLP, SwinTransformer, SwinTransformerMoE, SwinTransformerV2, build_model,
                    count_params, create_model, is_derived_buffer, is_model, list_models)
from utils.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
ALL_YAMLS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob('*.yaml'))
FAMILY = {'swin': SwinTransformer, 'swinv2': SwinTransformerV2, 'swin_mlp': SwinMLP, 'swin_moe': SwinTransformerMoE}


def _cfg(yaml: str = None, **changes):
    cfg = get_default_config()
    if yaml:
        merge_yaml(cfg, str(CONFIGS / yaml))
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split('__')
        for part in parents:
            node = node[part]
        node[leaf] = value
    cfg.freeze()
    return cfg


def _tiny_swin(**changes):
    return _cfg(**{'DATA__IMG_SIZE': 32, 'MODEL__SWIN__EMBED_DIM': 16, 'MODEL__SWIN__DEPTHS': [2, 2],
                   'MODEL__SWIN__NUM_HEADS': [1, 2], 'MODEL__SWIN__WINDOW_SIZE': 4, **changes})


@pytest.mark.parametrize('yaml', ALL_YAMLS)
def test_every_shipped_yaml_parses_and_builds(yaml):
    cfg = _cfg(yaml)
    with torch.device('meta'):
        model = build_model(cfg)
    assert isinstance(model, FAMILY[cfg.MODEL.TYPE])
    assert model.patch_embed.img_size == (cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
    assert model.num_classes == cfg.MODEL.NUM_CLASSES
    if is_model(cfg.MODEL.NAME):  # the registry's variant of the same name is the same architecture
        with torch.device('meta'):
            twin = create_model(cfg.MODEL.NAME, num_classes=cfg.MODEL.NUM_CLASSES)
        assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_the_short_name_is_swin_tiny():
    short, full = _cfg('swin_tiny.yaml'), _cfg('swin/swin_tiny_patch4_window7_224.yaml')
    assert short.dump() == full.dump()
    with torch.device('meta'):
        assert count_params(build_model(short)) == 28_288_354


@pytest.mark.parametrize('yaml, drop_path', [('swin/swin_tiny_patch4_window7_224.yaml', 0.2),
                                             ('swin/swin_small_patch4_window7_224.yaml', 0.3),
                                             ('swin/swin_base_patch4_window7_224.yaml', 0.5),
                                             ('swinv2/swinv2_tiny_patch4_window8_256.yaml', 0.2)])
def test_paper_drop_path_rates_reach_the_last_block(yaml, drop_path):
    with torch.device('meta'):
        model = build_model(_cfg(yaml))
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(drop_path)
    assert model.layers[0].blocks[0].drop_path.drop_prob == 0.0  # rises from 0


def test_config_keys_reach_the_constructor():
    model = build_model(_tiny_swin(MODEL__NUM_CLASSES=7, MODEL__SWIN__APE=True, MODEL__SWIN__QK_SCALE=0.25,
                                   MODEL__SWIN__QKV_BIAS=False, MODEL__SWIN__MLP_RATIO=2.0, MODEL__DROP_RATE=0.3,
                                   TRAIN__USE_CHECKPOINT=True, FUSED_WINDOW_PROCESS=True))
    blk = model.layers[0].blocks[0]
    assert model.head.out_features == 7 and model.absolute_pos_embed is not None
    assert blk.attn.scale == 0.25 and blk.attn.qkv.bias is None and blk.mlp.fc1.out_features == 32
    assert model.pos_drop.p == 0.3 and all(layer.use_checkpoint for layer in model.layers)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize('family', ['swin', 'swinv2', 'swin_mlp'])
def test_dynamic_img_size_key_builds_a_model_that_takes_any_size(family):
    section = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}[family]
    cfg = _cfg(**{'DATA__IMG_SIZE': 32, 'MODEL__TYPE': family, 'MODEL__DYNAMIC_IMG_SIZE': True,
                  f'MODEL__{section}__EMBED_DIM': 16, f'MODEL__{section}__DEPTHS': [2, 2],
                  f'MODEL__{section}__NUM_HEADS': [1, 2], f'MODEL__{section}__WINDOW_SIZE': 4})
    model = build_model(cfg).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 71)).shape == (1, 1000)
    assert model.dynamic_img_size and not build_model(_tiny_swin()).dynamic_img_size


def test_swinv2_and_swin_mlp_read_their_own_sections():
    v2 = build_model(_cfg(MODEL__TYPE='swinv2', DATA__IMG_SIZE=64, MODEL__SWINV2__EMBED_DIM=16,
                          MODEL__SWINV2__NUM_HEADS=[1, 2, 4, 8], MODEL__SWINV2__WINDOW_SIZE=8,
                          MODEL__SWINV2__PRETRAINED_WINDOW_SIZES=[4, 4, 4, 2]))
    assert isinstance(v2, SwinTransformerV2) and v2.embed_dim == 16
    assert v2.layers[3].blocks[0].attn.pretrained_window_size == (2, 2)
    mlp = build_model(_cfg(MODEL__TYPE='swin_mlp', DATA__IMG_SIZE=64, MODEL__SWIN_MLP__EMBED_DIM=16,
                           MODEL__SWIN_MLP__NUM_HEADS=[1, 2, 4, 8], MODEL__SWIN_MLP__WINDOW_SIZE=8))
    assert isinstance(mlp, SwinMLP) and mlp.layers[0].blocks[0].num_heads == 1


def test_swinv2_default_pretrained_window_sizes_fit_any_number_of_stages():
    model = build_model(_cfg(MODEL__TYPE='swinv2', DATA__IMG_SIZE=32, MODEL__SWINV2__EMBED_DIM=16,
                             MODEL__SWINV2__DEPTHS=[2, 2], MODEL__SWINV2__NUM_HEADS=[1, 2],
                             MODEL__SWINV2__WINDOW_SIZE=4))
    assert len(model.layers) == 2


def test_swin_moe_builds_natively_with_its_moe_blocks_and_official_keys():
    model = build_model(_cfg(MODEL__TYPE='swin_moe', DATA__IMG_SIZE=64, MODEL__SWIN_MOE__EMBED_DIM=16,
                             MODEL__SWIN_MOE__DEPTHS=[2, 2], MODEL__SWIN_MOE__NUM_HEADS=[1, 2],
                             MODEL__SWIN_MOE__WINDOW_SIZE=4, MODEL__SWIN_MOE__MOE_BLOCKS=[[-1], [1]]))
    keys = model.state_dict().keys()
    assert 'layers.1.blocks.1.mlp._moe_layer.gates.0.wg.weight' in keys
    assert 'layers.1.blocks.0.mlp.fc1.weight' in keys and not any('layers.0' in k and '_moe_layer' in k for k in keys)


def test_swin_moe_without_gate_noise_for_the_load_loss_is_a_user_error_naming_the_section():
    with pytest.raises(UserError, match='MODEL.SWIN_MOE.*GATE_NOISE'):
        build_model(_cfg(MODEL__TYPE='swin_moe', MODEL__SWIN_MOE__GATE_NOISE=0.0,
                         MODEL__SWIN_MOE__MOE_BLOCKS=[[-1], [-1], [1], [-1]]))


TINY = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=3)


@pytest.mark.parametrize('cls, extra', [
    (SwinTransformer, {}), (SwinTransformerV2, dict(pretrained_window_sizes=(0, 0))), (SwinMLP, {}),
    (SwinTransformerMoE, dict(moe_blocks=[[1], [-1]]))], ids=['swin', 'swinv2', 'swin_mlp', 'swin_moe'])
def test_every_family_saves_no_derived_buffer_and_drops_them_on_load(cls, extra):
    """The derived-buffer rule, stated once (models.DERIVED_BUFFERS): every buffer a model holds is derived, none is
    saved, and a state dict that carries them (an official checkpoint) loads strictly."""
    model = cls(**TINY, **extra)
    buffers = dict(model.named_buffers())
    assert all(is_derived_buffer(name) for name in buffers)
    assert buffers or cls is SwinMLP  # Swin-MLP pads instead of masking and has no position bias
    assert not any(is_derived_buffer(key) for key in model.state_dict())
    model.load_state_dict({**model.state_dict(), **buffers, 'layers.0.blocks.0.attn_mask': torch.zeros(1)})
    assert set(DERIVED_BUFFERS) == {'relative_position_index', 'relative_coords_table', 'attn_mask'}


def test_unknown_model_type_is_named():
    with pytest.raises(UserError, match="'vit'"):
        build_model(_cfg(MODEL__TYPE='vit'))


def test_image_size_the_windows_cannot_tile_names_the_keys():
    with pytest.raises(UserError, match=r'DATA.IMG_SIZE 200 .*MODEL.SWIN'):
        build_model(_cfg(DATA__IMG_SIZE=200))


def test_registry_lists_and_creates_variants():
    names = list_models()
    for expected in ('swin_tiny_patch4_window7_224', 'swin_large_patch4_window12_384',
                     'swinv2_tiny_patch4_window8_256', 'swinv2_base_patch4_window12_192_22k',
                     'swinv2_large_patch4_window12to24_192to384_22kto1k_ft', 'swin_mlp_tiny_c24_patch4_window8_256'):
        assert expected in names
    assert list_models('swinv2_*_window16_256') == ['swinv2_base_patch4_window16_256',
                                                   'swinv2_small_patch4_window16_256',
                                                   'swinv2_tiny_patch4_window16_256']
    with torch.device('meta'):
        model = create_model('swin_base_patch4_window12_384', num_classes=10)
        v2 = create_model('swinv2_base_patch4_window12to16_192to256_22kto1k_ft')
    assert model.patch_embed.img_size == (384, 384) and model.head.out_features == 10
    assert model.layers[0].blocks[0].window_size == 12 and model.embed_dim == 128
    assert v2.layers[0].blocks[0].attn.pretrained_window_size == (12, 12)
    with pytest.raises(ValueError, match='no pretrained weights'):
        create_model('swin_tiny_patch4_window7_224', pretrained=True)
    with pytest.raises(KeyError, match='swin_tiny_patch4_window7_999'):
        create_model('swin_tiny_patch4_window7_999')
