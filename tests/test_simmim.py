"""SimMIM: random patch masks, a mask token in the encoder, masked L1 loss, pre-training and fine-tuning."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import main_simmim_ft
import main_simmim_pt
from cli import write_tiny_config
from config import get_default_config
from data.simmim import MaskGenerator
from models import build_model
from models.simmim import norm_targets
from utils.errors import UserError


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def tiny_cfg(model_type: str = 'swin', norm_target: bool = False):
    cfg = get_default_config()
    cfg.MODEL.TYPE = model_type
    section = cfg.MODEL.SWIN if model_type == 'swin' else cfg.MODEL.SWINV2
    section.EMBED_DIM, section.DEPTHS, section.NUM_HEADS, section.WINDOW_SIZE = 16, [1, 1], [1, 2], 4
    if model_type == 'swinv2':
        section.PRETRAINED_WINDOW_SIZES = [0, 0]
    cfg.DATA.IMG_SIZE = 32
    cfg.MODEL.SIMMIM.NORM_TARGET.ENABLE = norm_target
    cfg.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 5
    cfg.freeze()
    return cfg


def test_mask_generator_hides_the_ratio_of_whole_mask_patches():
    gen = MaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (8, 8)  # one entry per model patch
    cells = mask.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
    assert (cells.min(axis=1) == cells.max(axis=1)).all()  # each 8 px square is hidden or shown whole
    assert cells[:, 0].sum() == 10  # ceil(16 * 0.6)
    batch = gen.batch(3, seed=7)
    assert batch.shape == (3, 8, 8) and torch.equal(batch, gen.batch(3, seed=7))
    assert not torch.equal(batch, gen.batch(3, seed=8))


def test_mask_sizes_that_do_not_tile_are_user_errors():
    with pytest.raises(UserError, match='DATA.MASK_PATCH_SIZE 6'):
        MaskGenerator(input_size=32, mask_patch_size=6, model_patch_size=4)
    with pytest.raises(UserError, match='DATA.IMG_SIZE 36'):
        MaskGenerator(input_size=36, mask_patch_size=8, model_patch_size=4)


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_pretraining_model_has_the_official_keys(model_type):
    keys = build_model(tiny_cfg(model_type), is_pretrain=True).state_dict().keys()
    assert {'encoder.mask_token', 'encoder.patch_embed.proj.weight', 'encoder.norm.weight',
            'decoder.0.weight', 'decoder.0.bias'} <= set(keys)
    assert not any(k.startswith('encoder.head') for k in keys)


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_fully_masked_images_are_indistinguishable_to_the_encoder(model_type):
    model = build_model(tiny_cfg(model_type), is_pretrain=True).eval()
    everything = torch.ones(2, 8, 8)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode(a, everything), model.encode(b, everything))
        assert not torch.allclose(model.encode(a, torch.zeros(2, 8, 8)), model.encode(b, torch.zeros(2, 8, 8)))
        assert model.reconstruct(a, everything).shape == (2, 3, 32, 32)


def test_loss_is_the_l1_error_on_masked_pixels_only():
    model = build_model(tiny_cfg(), is_pretrain=True)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8)
    mask[:, :4] = 1  # the top half of every image
    pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    prediction = images + 0.5 * pixel_mask + 3.0 * (1 - pixel_mask)  # off by 0.5 where hidden, 3 elsewhere
    model.reconstruct = lambda x, m: prediction
    assert model(images, mask).item() == pytest.approx(0.5, rel=1e-4)


def test_normalised_targets_ignore_local_brightness_and_contrast():
    images = torch.rand(1, 3, 16, 16)
    assert torch.allclose(norm_targets(images, 5), norm_targets(4 * images + 2, 5), atol=1e-3)
    with pytest.raises(ValueError, match='odd'):
        norm_targets(images, 4)
    model = build_model(tiny_cfg(norm_target=True), is_pretrain=True)
    assert model.norm_target_patch_size == 5


def _epoch_losses(log: str) -> list[float]:
    """Running average loss at the last step of each epoch (the official 'loss val (avg)' field)."""
    ends = re.findall(r'Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\].*?\tloss [\d.]+ \(([\d.]+)\)', log)
    return [float(avg) for _, idx, total, avg in ends if int(idx) == int(total) - 1]


def test_pretraining_loss_falls_and_its_weights_fine_tune(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_config(tmp_path)
    out = tmp_path / 'out'
    code = main_simmim_pt.run([str(a) for a in [
        '--cfg', cfg, '--data-path', image_folder, '--output', out, '--tag', 'pt', '--disable-amp',
        '--opts', 'DATA.MASK_PATCH_SIZE', '8', 'TRAIN.EPOCHS', '4', 'TRAIN.BASE_LR', '2.0']])
    assert code == 0
    run = out / 'tiny_test' / 'pt'
    losses = _epoch_losses((run / 'log_rank0.txt').read_text())
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    weights = torch.load(run / 'ckpt_epoch_3.pth', weights_only=True)['model']
    assert 'encoder.mask_token' in weights and 'decoder.0.weight' in weights

    code = main_simmim_ft.run([str(a) for a in [
        '--cfg', cfg, '--data-path', image_folder, '--output', out, '--tag', 'ft', '--disable-amp',
        '--pretrained', run / 'ckpt_epoch_3.pth',
        '--opts', 'MODEL.SWIN.WINDOW_SIZE', '8', 'TRAIN.EPOCHS', '1', 'TRAIN.LAYER_DECAY', '0.8']])
    assert code == 0
    log = (out / 'tiny_test' / 'ft' / 'log_rank0.txt').read_text()
    assert "'encoder.' prefix removed" in log
    assert re.search(r'dropped \d+ entries: decoder\.0\.weight, decoder\.0\.bias, mask_token', log)
    assert 'Max accuracy' in log
    finetuned = torch.load(out / 'tiny_test' / 'ft' / 'ckpt_epoch_0.pth', weights_only=True)['model']
    assert 'head.weight' in finetuned and not any(k.startswith(('encoder.', 'decoder.')) for k in finetuned)


def test_pretraining_resumes_after_its_newest_checkpoint(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    args = ['--cfg', write_tiny_config(tmp_path), '--data-path', image_folder, '--output', tmp_path / 'out',
            '--disable-amp', '--opts', 'DATA.MASK_PATCH_SIZE', '8', 'PRINT_FREQ', '100']
    assert main_simmim_pt.run([str(a) for a in args + ['TRAIN.EPOCHS', '1']]) == 0
    log = tmp_path / 'out' / 'tiny_test' / 'default' / 'log_rank0.txt'
    before = len(log.read_text())
    assert main_simmim_pt.run([str(a) for a in args + ['TRAIN.EPOCHS', '2']]) == 0
    second = log.read_text()[before:]
    assert 'Train: [1/2]' in second and 'Train: [0/2]' not in second
    assert (tmp_path / 'out' / 'tiny_test' / 'default' / 'ckpt_epoch_1.pth').is_file()
