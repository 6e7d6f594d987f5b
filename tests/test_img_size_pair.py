"""DATA.IMG_SIZE as [H, W]: the config, both training paths, evaluation, SimMIM masks and a main.py run."""
from __future__ import annotations

import io
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from cli import run_main, train_tiny
from config import get_config, img_size_hw
from data import build_loader
from data.decode import blank_image, decode_pil, decode_tensor
from data.simmim import MaskGenerator
from data.transforms import RandomResizedCropDecoder, ResizeToCover, build_eval_transform, build_train_transform
from test_data_common import data_config, jpeg_folder
from utils.errors import UserError


def _config(*opts):
    return get_config(SimpleNamespace(cfg=None, opts=list(opts)))


@pytest.mark.parametrize('text, expected', [('[96, 160]', [96, 160]), ('160,96', [160, 96]), ('64', 64),
                                            ('[64]', 64)])
def test_img_size_takes_an_int_or_a_height_width_pair(text, expected):
    size = _config('DATA.IMG_SIZE', text).DATA.IMG_SIZE
    assert size == expected
    assert img_size_hw(size) == (tuple(expected) if isinstance(expected, list) else (expected, expected))


@pytest.mark.parametrize('text', ['[96, 160, 3]', '1.5', '[0, 64]', '-4', "'big'", '[True, 4]'])
def test_a_bad_img_size_is_a_user_error_naming_the_key(text):
    with pytest.raises(UserError, match=r'DATA.IMG_SIZE'):
        _config('DATA.IMG_SIZE', text)


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format='JPEG', quality=90)
    return out.getvalue()


def test_decoder_crops_a_height_by_width_box_where_timm_does():
    data = _jpeg(200, 150)
    timm_crop = RandomResizedCropAndInterpolation((48, 80), interpolation='bicubic')
    for pil_resize in (True, False):
        route = RandomResizedCropDecoder((48, 80), reduce=False, pil_resize=pil_resize)
        for seed in range(4):
            random.seed(seed)
            expected = np.asarray(timm_crop(decode_pil(data))).astype(int)
            random.seed(seed)
            out = route(data)
            got = out.permute(1, 2, 0).numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            assert got.shape == (48, 80, 3)
            assert np.abs(got.astype(int) - expected).mean() < (0.01 if pil_resize else 2.0)


def test_reduced_decoding_gives_the_height_by_width_output():
    route = RandomResizedCropDecoder((40, 24), scale=(0.9, 1.0))
    assert np.asarray(route(_jpeg(640, 480))).shape == (40, 24, 3)


@pytest.mark.parametrize('fast', [True, False])
def test_training_batches_come_out_height_by_width_on_both_paths(tmp_path, fast):
    root = jpeg_folder(tmp_path, num_classes=2, train_per_class=4, val_per_class=2, size=64)
    for size in ([40, 56], [24, 32]):  # a random resized crop, and the padded crop of small images
        cfg = data_config(root, **{'DATA.IMG_SIZE': size, 'DATA.FAST_LOADER': fast})
        _, _, train_loader, val_loader, _ = build_loader(cfg)
        train_loader.set_epoch(0)
        images, _ = next(iter(train_loader))
        assert tuple(images.shape[1:]) == (3, *size)
        if max(size) > 32:  # (images of at most 32 px are evaluated as they are, as the official rule has it)
            assert tuple(next(iter(val_loader))[0].shape[1:]) == (3, *size)


def test_small_pairs_use_the_padded_random_crop():
    plain, _, _ = build_train_transform((24, 32), fast=False)
    assert 'RandomCrop(size=(24, 32), padding=4)' in repr(plain.transforms[0])


def test_non_square_evaluation_keeps_the_aspect_ratio_then_centre_crops():
    transform, _, _ = build_eval_transform((48, 96), fast=False)
    stripes = np.zeros((300, 400, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel columns: any horizontal squash would blur them unevenly
    photo = Image.fromarray(stripes)
    assert tuple(transform(photo).shape) == (3, 48, 96)
    # 256/224 of (48, 96) is (54, 109): 400 x 300 is scaled by 109/400 on both axes, to 109 x 82.
    resized = transform.transforms[0](photo)
    assert resized.size == (109, 82)
    assert transform.transforms[0].size == (54, 109) and isinstance(transform.transforms[0], ResizeToCover)


@pytest.mark.parametrize('image, target', [((400, 300), (54, 109)), ((300, 400), (54, 109)), ((100, 100), (61, 30)),
                                           ((77, 301), (128, 128)), ((109, 54), (54, 109))])
def test_resize_to_cover_keeps_the_ratio_and_covers_the_target(image, target):
    out = ResizeToCover(target)(Image.new('RGB', image))
    width, height = out.size
    assert height >= target[0] and width >= target[1]
    assert height == target[0] or width == target[1]  # the smallest cover: one side fits exactly
    assert abs(width / height - image[0] / image[1]) <= 1.0 / min(width, height) * (image[0] / image[1] + 1)


def test_square_evaluation_is_unchanged():
    transform, _, _ = build_eval_transform([64, 64], fast=False)
    assert 'size=73' in repr(transform.transforms[0]) and 'CenterCrop(size=(64, 64))' in repr(transform.transforms[1])


def test_blank_stand_ins_have_the_pair_size():
    assert tuple(blank_image(decode_tensor, (24, 40)).shape) == (3, 24, 40)
    assert blank_image(decode_pil, (24, 40)).size == (40, 24)


def test_simmim_masks_cover_a_height_by_width_image():
    masks = MaskGenerator((64, 96), mask_patch_size=32, model_patch_size=4, mask_ratio=0.5).batch(3, seed=1)
    assert tuple(masks.shape) == (3, 16, 24)
    assert (masks.float().mean(dim=(1, 2)) == 0.5).all()
    with pytest.raises(UserError, match=r'DATA.IMG_SIZE \(64, 80\)'):
        MaskGenerator((64, 80), mask_patch_size=32)


def test_main_trains_evaluates_and_times_a_non_square_model(tmp_path, image_folder):
    common, out, log = train_tiny(tmp_path, image_folder, 'DATA.IMG_SIZE', '[32, 64]', 'TRAIN.EPOCHS', '1')
    assert re.search(r' \* Acc@1 [\d.]+ Acc@5 [\d.]+', log) and 'Train: [0/1]' in log
    saved = yaml.safe_load(torch.load(out / 'ckpt_epoch_0.pth', weights_only=True)['config'])
    assert saved['DATA']['IMG_SIZE'] == [32, 64]
    assert re.search(r'number of GFLOPs: [\d.]+', log)
    timed = run_main([*common, '--throughput', '--batch-size', '2', '--disable_amp', '--tag', 'timed',
                      '--opts', 'DATA.IMG_SIZE', '[32, 64]'], cwd=tmp_path)
    assert re.search(r'batch_size 2 throughput [\d.]+', timed.stdout + timed.stderr), timed.stderr[-2000:]
