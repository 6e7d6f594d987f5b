"""--pretrained: weights of another window, image size or class count initialise a model for fine-tuning."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

import main
from config import get_default_config
from cli import write_tiny_config
from models import build_model
from utils.errors import UserError
from utils.pretrained import load_pretrained, read_class_map, resize_rel_pos_bias_table

LOG = logging.getLogger('test_pretrained')
REL = 'layers.0.blocks.0.attn.relative_position_bias_table'


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def tiny_cfg(model_type: str = 'swin', pretrained: str = '', **keys):
    cfg = get_default_config()
    cfg.MODEL.TYPE = model_type
    section = {'swin': cfg.MODEL.SWIN, 'swinv2': cfg.MODEL.SWINV2, 'swin_mlp': cfg.MODEL.SWIN_MLP}[model_type]
    section.EMBED_DIM, section.DEPTHS, section.NUM_HEADS, section.WINDOW_SIZE = 16, [1, 1], [1, 2], 4
    cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.PRETRAINED = 32, 3, pretrained
    for dotted, value in keys.items():
        node, *path = dotted.split('__')
        target = cfg[node]
        for part in path[:-1]:
            target = target[part]
        if path:
            target[path[-1]] = value
        else:
            cfg[node] = value
    if model_type == 'swinv2':
        section.PRETRAINED_WINDOW_SIZES = [0, 0]
    cfg.freeze()
    return cfg


def save_weights(model, path) -> str:
    torch.save({'model': model.state_dict()}, path)
    return str(path)


def test_bias_table_resize_keeps_each_heads_values():
    table = torch.stack([torch.full((49,), 1.0), torch.full((49,), 2.0)], dim=1)  # window 4, 2 heads
    resized = resize_rel_pos_bias_table(table, 225)  # window 8
    assert resized.shape == (225, 2)
    assert torch.allclose(resized[:, 0], torch.ones(225)) and torch.allclose(resized[:, 1], torch.full((225,), 2.0))


def test_window4_weights_load_into_window8_model_with_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg(MODEL__NUM_CLASSES=5))
    path = save_weights(source, tmp_path / 'w4.pth')
    model = build_model(tiny_cfg(MODEL__SWIN__WINDOW_SIZE=8))
    report = load_pretrained(tiny_cfg(pretrained=path, MODEL__SWIN__WINDOW_SIZE=8), model, LOG)
    own, src = model.state_dict(), source.state_dict()
    assert own[REL].shape == (225, 1) and src[REL].shape == (49, 1)
    assert any(line.startswith(REL) for line in report.resized)
    assert torch.equal(own['layers.0.blocks.0.mlp.fc1.weight'], src['layers.0.blocks.0.mlp.fc1.weight'])
    assert torch.equal(own['layers.1.blocks.0.attn.relative_position_bias_table'],  # stage 1 is 4x4 either way
                       src['layers.1.blocks.0.attn.relative_position_bias_table'])
    assert own['head.weight'].shape == (3, 32) and not own['head.weight'].any() and 're-initialised' in report.head
    assert model.layers[0].blocks[0].attn.relative_position_index.shape == (64, 64)  # rebuilt, not loaded


def test_absolute_position_embedding_is_resized_to_the_new_image_size(tmp_path):
    source = build_model(tiny_cfg(MODEL__SWIN__APE=True))
    path = save_weights(source, tmp_path / 'ape32.pth')
    model = build_model(tiny_cfg(MODEL__SWIN__APE=True, DATA__IMG_SIZE=64))
    load_pretrained(tiny_cfg(pretrained=path), model, LOG)
    embed = model.absolute_pos_embed.detach()
    assert embed.shape == (1, 256, 16)
    # Bicubic upsampling by 2: the mean over positions is kept (to interpolation accuracy).
    assert torch.allclose(embed.mean(dim=1), source.absolute_pos_embed.detach().mean(dim=1), atol=2e-3)
    assert torch.equal(model.head.weight, source.head.weight)  # same class count: the head is kept


def test_class_map_picks_the_head_rows_it_names(tmp_path):
    source = build_model(tiny_cfg(MODEL__NUM_CLASSES=10))
    path = save_weights(source, tmp_path / 'many.pth')
    (tmp_path / 'map.txt').write_text('7\n2\n9\n0\n')
    model = build_model(tiny_cfg(MODEL__NUM_CLASSES=4))
    report = load_pretrained(tiny_cfg(pretrained=path), model, LOG, class_map=read_class_map(tmp_path / 'map.txt'))
    rows = torch.tensor([7, 2, 9, 0])
    assert torch.equal(model.head.weight, source.head.weight[rows])
    assert torch.equal(model.head.bias, source.head.bias[rows])
    assert report.head.startswith('mapped: 10 -> 4')
    with pytest.raises(UserError, match='3 entries but the model has 4'):
        load_pretrained(tiny_cfg(pretrained=path), model, LOG, class_map=[1, 2, 3])


def test_swinv2_position_bias_mlp_is_carried_as_is(tmp_path):
    source = build_model(tiny_cfg('swinv2'))
    path = save_weights(source, tmp_path / 'v2.pth')
    model = build_model(tiny_cfg('swinv2', MODEL__SWINV2__WINDOW_SIZE=8))
    report = load_pretrained(tiny_cfg('swinv2', pretrained=path), model, LOG)
    key = 'layers.0.blocks.0.attn.cpb_mlp.0.weight'
    assert torch.equal(model.state_dict()[key], source.state_dict()[key]) and not report.resized
    assert model.layers[0].blocks[0].attn.relative_coords_table.shape == (1, 15, 15, 2)


def test_official_files_with_stale_buffers_load(tmp_path):
    """Released files carry relative_position_index / attn_mask of their own window: they are dropped."""
    source = build_model(tiny_cfg())
    state = dict(source.state_dict())
    state[REL.replace('bias_table', 'index')] = torch.zeros(16, 16, dtype=torch.long)
    state['layers.0.blocks.0.attn_mask'] = torch.zeros(4, 16, 16)
    torch.save({'model': state}, tmp_path / 'official.pth')
    model = build_model(tiny_cfg(MODEL__SWIN__WINDOW_SIZE=8))
    report = load_pretrained(tiny_cfg(pretrained=str(tmp_path / 'official.pth')), model, LOG)
    assert any('derived buffers' in entry for entry in report.dropped)


def test_another_architecture_is_an_error_naming_keys_and_shapes(tmp_path):
    path = save_weights(build_model(tiny_cfg(MODEL__SWIN__EMBED_DIM=24)), tmp_path / 'wide.pth')
    expected = (r'official layout \(Swin V1\) do not fit the model: '
                r'shape patch_embed\.proj\.weight weights \[24, 3, 4, 4\] vs model \[16, 3, 4, 4\]')
    with pytest.raises(UserError, match=expected):
        load_pretrained(tiny_cfg(pretrained=path), build_model(tiny_cfg()), LOG)


def write_gray_levels(root, levels, train_per_class: int = 8, seed: int = 0):
    """One class per grey level, with heavy noise: a random network barely tells them apart (LayerNorm
    removes most of a uniform brightness), a network trained on such levels does."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', 4)):
        for c, level in enumerate(levels):
            folder = root / split / f'level_{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


def _last_val_loss(log: str) -> float:
    return float(re.findall(r'Test: \[\d+/\d+\].*?\tLoss ([\d.]+)', log)[-1])


def test_pretrained_window4_fine_tunes_at_window8_better_than_from_scratch(tmp_path, monkeypatch):
    """End to end: main.py trains at window 4 on 4 classes; --pretrained fine-tunes 3 new classes at window 8."""
    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_config(tmp_path)
    source = write_gray_levels(tmp_path / 'source', [50, 100, 150, 200], seed=1)
    target = write_gray_levels(tmp_path / 'target', [50, 125, 200], seed=2)
    common = ['--cfg', cfg, '--output', tmp_path / 'out', '--disable_amp']
    assert main.run([str(a) for a in common + ['--data-path', source, '--tag', 'src', '--opts',
                     'MODEL.NUM_CLASSES', '4', 'TRAIN.EPOCHS', '8', 'TRAIN.BASE_LR', '1.0']]) == 0
    weights = tmp_path / 'out' / 'tiny_test' / 'src' / 'ckpt_epoch_7.pth'
    finetune = ['--data-path', target, '--opts', 'MODEL.SWIN.WINDOW_SIZE', '8', 'TRAIN.EPOCHS', '1',
                'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '1.0']
    assert main.run([str(a) for a in common + ['--tag', 'ft', '--pretrained', weights] + finetune]) == 0
    assert main.run([str(a) for a in common + ['--tag', 'scratch'] + finetune]) == 0
    ft_log = (tmp_path / 'out' / 'tiny_test' / 'ft' / 'log_rank0.txt').read_text()
    scratch_log = (tmp_path / 'out' / 'tiny_test' / 'scratch' / 'log_rank0.txt').read_text()
    assert 'relative_position_bias_table: [49, 1] -> [225, 1]' in ft_log and 'classifier head re-initialised' in ft_log
    assert _last_val_loss(ft_log) < _last_val_loss(scratch_log) - 0.1


def test_the_shipped_22k_to_1k_map_keeps_the_official_rows_of_a_22k_head(tmp_path):
    from utils.pretrained import DEFAULT_22K_MAP
    rows = read_class_map(DEFAULT_22K_MAP)
    assert len(rows) == 1000 == len(set(rows)) and 0 <= min(rows) and max(rows) < 21841
    assert rows[:3] == [359, 368, 460] and rows[-1] == 21817  # the official data/map22kto1k.txt
    source = build_model(tiny_cfg(MODEL__NUM_CLASSES=21841))
    path = save_weights(source, tmp_path / 'w22k.pth')
    model = build_model(tiny_cfg(MODEL__NUM_CLASSES=1000))
    report = load_pretrained(tiny_cfg(pretrained=path, MODEL__NUM_CLASSES=1000), model, LOG)  # no class-map key
    assert report.head.startswith('mapped: 21841 -> 1000')
    assert torch.equal(model.head.weight, source.head.weight[torch.tensor(rows)])


def test_rgb_weights_adapted_to_one_channel_give_the_rgb_models_logits_on_replicated_gray(tmp_path, caplog):
    rgb = build_model(tiny_cfg()).eval()
    path = save_weights(rgb, tmp_path / 'rgb.pth')
    gray = build_model(tiny_cfg(MODEL__SWIN__IN_CHANS=1)).eval()
    with caplog.at_level(logging.INFO, logger=LOG.name):
        load_pretrained(tiny_cfg(pretrained=path, MODEL__SWIN__IN_CHANS=1), gray, LOG)
    assert ('pretrained: patch_embed.proj.weight adapted from 3 to 1 input channels (summed over R, G and B, '
            "as timm's adapt_input_conv)") in caplog.text
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_rgb_weights_for_five_channels_repeat_rgb_scaled_by_three_fifths(tmp_path):
    five = build_model(tiny_cfg('swinv2', MODEL__SWINV2__IN_CHANS=5))
    path = save_weights(build_model(tiny_cfg(model_type='swinv2')), tmp_path / 'v2.pth')
    load_pretrained(tiny_cfg('swinv2', path, MODEL__SWINV2__IN_CHANS=5), five, LOG)
    source = torch.load(path)['model']['patch_embed.proj.weight']
    expected = torch.cat([source, source[:, :2]], dim=1) * 3 / 5
    assert five.patch_embed.proj.in_channels == 5 and torch.allclose(five.patch_embed.proj.weight, expected)
