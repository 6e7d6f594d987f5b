"""Input of any channel count (MODEL.*.IN_CHANS), DATA.MEAN / DATA.STD, and the crop and flip keys
(AUG.RRC_SCALE, AUG.RRC_RATIO, AUG.HFLIP, AUG.VFLIP, TEST.CROP_PCT) on both loader paths."""
from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from data import build_loader, build_transform
from data.build import input_spec, train_augment
from data.decode import ChannelDecoder
from data.transforms import InputSpec, TrainAugment, build_eval_transform, build_train_transform
from engine import validate
from models import build_model
from utils.errors import UserError
from test_data_common import data_config

pytestmark = pytest.mark.usefixtures('one_torch_thread')

GRAY = {'MODEL.SWIN.IN_CHANS': 1, 'DATA.MEAN': [0.5], 'DATA.STD': [0.25]}
FIVE = {'MODEL.SWIN.IN_CHANS': 5, 'DATA.MEAN': [0.5] * 5, 'DATA.STD': [0.25] * 5}
NO_COLOUR = {'AUG.COLOR_JITTER': 0.0, 'AUG.AUTO_AUGMENT': 'none'}


def _png16(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(out, format='PNG')
    return out.getvalue()


def _tiff_pages(planes: list[np.ndarray]) -> bytes:
    out = io.BytesIO()
    pages = [Image.fromarray(p) for p in planes]
    pages[0].save(out, format='TIFF', save_all=True, append_images=pages[1:])
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _five_planes(rng, level: int, size: int) -> list[np.ndarray]:
    """Five channels: 16-bit ones at ``level * 257`` and 8-bit ones at ``level``, plus noise."""
    return [np.clip(level * 257 + rng.normal(0, 3000, (size, size)), 0, 65535).astype(np.uint16) if k % 2 == 0
            else np.clip(level + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8) for k in range(5)]


def write_channel_folder(root, channels: int, size: int = 48, per_class: tuple[int, int] = (4, 2),
                         width: int = 56):
    """root/{train,val}/class_c: grayscale 16-bit PNGs of size x width (1 channel), or 5-page TIFFs and .npy
    arrays of size x size (5 channels)."""
    rng = np.random.default_rng(0)
    for split, count in zip(('train', 'val'), per_class):
        for c, level in enumerate((40, 200)):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if channels == 1:
                    pixels = np.clip(level * 257 + rng.normal(0, 5000, (size, width)), 0, 65535)
                    (folder / f'{i}.png').write_bytes(_png16(pixels))
                elif i % 2:
                    (folder / f'{i}.npy').write_bytes(_npy(np.stack(_five_planes(rng, level, size), -1)
                                                           .astype(np.float32) / 65535))
                else:
                    (folder / f'{i}.tif').write_bytes(_tiff_pages(_five_planes(rng, level, size)))
    return root


# ---------------------------------------------------------------------------------- decoding
def test_16_bit_grayscale_keeps_full_depth_and_values_one_apart_stay_apart():
    pixels = np.array([[1000, 1001], [0, 65535]])
    out = ChannelDecoder(1)(_png16(pixels))
    assert out.shape == (1, 2, 2) and out.dtype == torch.float32
    assert out[0, 0, 0] != out[0, 0, 1] and out[0, 0, 0] == pytest.approx(1000 / 65535) and out.max() == 1.0


def test_multi_page_tiff_and_npy_decode_to_their_channels_at_full_depth():
    rng = np.random.default_rng(1)
    planes = _five_planes(rng, 100, 6)
    planes[0][0, :2] = (30000, 30001)
    tiff = ChannelDecoder(5)(_tiff_pages(planes))
    expected = torch.stack([torch.from_numpy(p.astype(np.float32) / (65535 if p.dtype == np.uint16 else 255))
                            for p in planes])
    assert tiff.shape == (5, 6, 6) and torch.allclose(tiff, expected) and tiff[0, 0, 0] != tiff[0, 0, 1]
    hwc = np.stack([p.astype(np.uint16) for p in planes], -1)  # (H, W, C) uint16
    assert torch.allclose(ChannelDecoder(5)(_npy(hwc)), torch.from_numpy(hwc / 65535).permute(2, 0, 1).float())
    chw = np.random.default_rng(2).random((5, 7, 9), dtype=np.float32)  # (C, H, W) float as it is
    assert torch.equal(ChannelDecoder(5)(_npy(chw)), torch.from_numpy(chw))
    with pytest.raises(ValueError, match='5 channels, the model takes 4'):
        ChannelDecoder(4)(_tiff_pages(planes))


def test_colour_images_read_as_grayscale_by_their_luma():
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8))
    out = io.BytesIO()
    rgb.save(out, format='PNG')
    expected = torch.from_numpy(np.asarray(rgb.convert('L')).astype(np.float32) / 255)
    assert torch.equal(ChannelDecoder(1)(out.getvalue())[0], expected)


# ---------------------------------------------------------------------------------- configuration
def test_defaults_are_the_official_recipe_and_imagenet_statistics(tmp_path):
    cfg = data_config(tmp_path, **{'DATA.IMG_SIZE': 224})
    assert input_spec(cfg) == InputSpec() and train_augment(cfg, InputSpec()) == TrainAugment()
    official = create_transform(224, is_training=True, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
                                re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic')
    plain = build_transform(True, data_config(tmp_path, **{'DATA.IMG_SIZE': 224, 'DATA.FAST_LOADER': False}))[0]
    assert repr(plain) == repr(official)
    evaluation = build_transform(False, cfg)[0]
    assert 'size=256' in repr(evaluation.transforms[0]) and 'size=(224, 224)' in repr(evaluation.transforms[1])


@pytest.mark.parametrize('model_type, section', [('swin', 'SWIN'), ('swinv2', 'SWINV2')])
def test_mean_and_std_of_another_length_than_in_chans_is_an_error_naming_the_keys(tmp_path, model_type, section):
    cfg = data_config(tmp_path, **{'MODEL.TYPE': model_type, f'MODEL.{section}.IN_CHANS': 1})
    with pytest.raises(UserError, match=rf'DATA.MEAN and DATA.STD need one value per input channel '
                                        rf'\(MODEL.{section}.IN_CHANS is 1\), got 3 and 3'):
        build_loader(cfg)


def test_bad_crop_and_flip_values_are_errors_naming_the_key(tmp_path):
    for key, value in (('AUG.RRC_SCALE', [0.5]), ('AUG.RRC_RATIO', [2.0, 1.0]), ('AUG.VFLIP', 1.5)):
        with pytest.raises(UserError, match=key):
            build_transform(True, data_config(tmp_path, **{key: value}))
    with pytest.raises(UserError, match='TEST.CROP_PCT'):
        build_transform(False, data_config(tmp_path, **{'TEST.CROP_PCT': 1.5}))


def test_crop_pct_sets_the_evaluation_resize_on_both_paths(tmp_path):
    for fast in (True, False):
        for pct, side in ((1.0, 64), (0.5, 128)):
            transform = build_eval_transform(64, fast=fast, crop_pct=pct)[0]
            assert f'size={side}' in repr(transform.transforms[0])
        gray = build_eval_transform((64, 96), fast=fast, crop_pct=0.5, spec=InputSpec(1, (0.5,), (0.5,)))[0]
        assert gray(torch.rand(1, 100, 150)).shape == (1, 64, 96)


def _through(cfg, is_train: bool, data: bytes) -> torch.Tensor:
    """One image through the split's decoder, transform and batch finishing, from fixed random streams."""
    random.seed(0)
    torch.manual_seed(0)
    transform, decoder, finish = build_transform(is_train, cfg)
    image = transform(decoder(data))
    return finish([image])[0] if finish is not None else image


@pytest.mark.parametrize('channels', [3, 1])
@pytest.mark.parametrize('fast', [True, False])
def test_flip_keys_flip_and_crop_keys_can_take_the_whole_image(tmp_path, fast, channels):
    """With AUG.RRC_SCALE [1, 1] and AUG.RRC_RATIO [1, 1] the training crop of a square image is the whole
    image, which evaluation at TEST.CROP_PCT 1 gives unflipped: the flips are then all that differ."""
    rng = np.random.default_rng(4)
    if channels == 3:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(out, format='PNG')
        data = out.getvalue()
    else:
        data = _png16(rng.integers(0, 65536, (48, 48)))
    keys = {'DATA.IMG_SIZE': 48, 'DATA.FAST_LOADER': fast, 'AUG.RRC_SCALE': [1.0, 1.0], 'AUG.RRC_RATIO': [1.0, 1.0],
            'AUG.REPROB': 0.0, 'TEST.CROP_PCT': 1.0, **NO_COLOUR, **({} if channels == 3 else GRAY)}
    upright = _through(data_config(tmp_path, **keys), False, data)
    for hflip, vflip, dims in ((0.0, 0.0, ()), (0.0, 1.0, (-2,)), (1.0, 1.0, (-2, -1))):
        cfg = data_config(tmp_path, **{**keys, 'AUG.HFLIP': hflip, 'AUG.VFLIP': vflip})
        expected = upright.flip(dims) if dims else upright
        assert torch.allclose(_through(cfg, True, data), expected, atol=0.02)  # 0.02: a grey level (fast RGB)
    assert not torch.allclose(upright.flip(-2), upright, atol=0.5)


# ---------------------------------------------------------------------------------- whole runs
def _tiny(root, channels: dict, **keys):
    return data_config(root, **{'DATA.IMG_SIZE': 64, 'MODEL.NUM_CLASSES': 2, 'MODEL.SWIN.EMBED_DIM': 16,
                                'MODEL.SWIN.DEPTHS': [1, 1], 'MODEL.SWIN.NUM_HEADS': [1, 2],
                                'MODEL.SWIN.WINDOW_SIZE': 4, 'AUG.MIXUP': 0.0, 'AUG.CUTMIX': 0.0,
                                **channels, **keys})


@pytest.mark.parametrize('channels, keys', [(1, GRAY), (5, FIVE)])
def test_grayscale_and_5_channel_data_train_a_step_and_evaluate(tmp_path, caplog, channels, keys):
    root = write_channel_folder(tmp_path, channels)
    cfg = _tiny(root, keys)
    with caplog.at_level(logging.WARNING):
        dataset_train, dataset_val, loader_train, loader_val, _ = build_loader(cfg)
    assert ('AUG.COLOR_JITTER 0.4 and AUG.AUTO_AUGMENT rand-m9-mstd0.5-inc1: RGB augmentation, off for this '
            f'{channels}-channel input') in caplog.text
    assert len(dataset_train) == 8 and len(dataset_val) == 4
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader_train.set_epoch(0)
    samples, targets = next(iter(loader_train))
    assert samples.shape == (4, channels, 64, 64) and samples.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(model(samples), targets)
    loss.backward()
    assert model.patch_embed.proj.weight.grad.shape[1] == channels and torch.isfinite(loss)
    optimizer.step()
    acc1, _, val_loss = validate(cfg, loader_val, model, torch.device('cpu'), None, logging.getLogger('test'))
    assert 0 <= acc1 <= 100 and np.isfinite(val_loss)


@pytest.mark.parametrize('channels, keys', [(1, GRAY), (5, FIVE)])
def test_other_channel_counts_draw_the_same_crops_on_both_paths(tmp_path, channels, keys):
    root = write_channel_folder(tmp_path, channels, per_class=(2, 2))
    train, val = {}, {}
    for fast in (True, False):
        cfg = _tiny(root, keys, **{'DATA.FAST_LOADER': fast, 'DATA.IMG_SIZE': 40, 'AUG.REPROB': 0.0, **NO_COLOUR})
        loaders = build_loader(cfg)
        loaders[2].set_epoch(1)
        loaders[3].finish_on = torch.device('cpu') if fast else None  # float batches finished on arrival too
        train[fast] = torch.cat([x for x, _ in loaders[2]])
        val[fast] = torch.cat([x for x, _ in loaders[3]])
    assert (train[True] - train[False]).abs().max() < 1e-5  # one multiply-add against subtract and divide
    assert torch.equal(val[True], val[False]) and val[True].shape == (4, channels, 40, 40)


def test_colour_augmentation_is_refused_below_the_builder_for_other_channel_counts():
    with pytest.raises(UserError, match='colour jitter and auto-augment work on RGB images only'):
        build_train_transform(64, spec=InputSpec(1, (0.5,), (0.5,)))
    transform, decoder, finish = build_train_transform(64, spec=InputSpec(1, (0.5,), (0.5,)), **{
        'color_jitter': 0.0, 'auto_augment': 'none'})
    assert isinstance(decoder, ChannelDecoder) and finish.mean.shape == (1, 1, 1)


def test_main_fine_tunes_rgb_weights_on_16_bit_grayscale_images(tmp_path):
    """End to end (one launch): main.py with MODEL.SWIN.IN_CHANS 1 trains from an RGB checkpoint, adapted."""
    from cli import TINY_CONFIG, train_tiny
    from config import get_default_config
    cfg = get_default_config()
    cfg.merge_from_other_cfg(cfg.load_cfg(TINY_CONFIG))
    torch.save({'model': build_model(cfg).state_dict()}, tmp_path / 'rgb.pth')
    root = write_channel_folder(tmp_path / 'gray', 1, size=32, width=32)
    _, out, log = train_tiny(tmp_path, root, 'MODEL.SWIN.IN_CHANS', '1', 'DATA.MEAN', '[0.5]', 'DATA.STD', '[0.25]',
                             'TRAIN.EPOCHS', '1', 'MODEL.PRETRAINED', str(tmp_path / 'rgb.pth'))
    assert 'patch_embed.proj.weight adapted from 3 to 1 input channels' in log
    assert ' * Acc@1 ' in log and (out / 'ckpt_epoch_0.pth').is_file()


def test_simmim_pretraining_reads_other_channel_counts_with_their_statistics():
    from data.simmim import build_simmim_transform
    transform, decoder, finish = build_simmim_transform(32, InputSpec(1, (0.5,), (0.25,)))
    image = transform(decoder(_png16(np.full((40, 40), 65535))))
    assert image.shape == (1, 32, 32) and torch.allclose(finish([image]), torch.full((1, 1, 32, 32), 2.0))
