"""The official recipe through timm on today's Pillow, the fast path's equivalence, batch finishing."""
from __future__ import annotations

import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp, RandAugment, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from data import build_loader, build_mixup, build_transform, safe_posterize, use_safe_posterize
from data.transforms import (BatchNormalize, BatchRandomErasing, TensorRandomResizedCrop, build_eval_transform,
                             build_train_transform, pil_to_uint8)
from test_data_common import data_config, jpeg_folder


def _photo(size=(40, 30), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_timm_posterize_at_top_magnitude_fails_on_pillow_13_and_ours_gives_black_everywhere():
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # inc1 at magnitude 10 -> keep 0 bits
    if int(PIL.__version__.split('.')[0]) >= 13:
        with pytest.raises(ValueError, match='bits must be between'):
            op(_photo())
    else:  # Pillow <= 12, Pillow-SIMD 12 included: every bit dropped
        assert not np.asarray(op(_photo())).any()
    assert use_safe_posterize(op) == 1
    assert not np.asarray(op(_photo())).any()  # Pillow <= 12's answer on any Pillow


@pytest.mark.parametrize('bits', range(1, 9))
def test_safe_posterize_matches_pillow_where_pillow_accepts_the_bits(bits):
    image = _photo()
    assert np.array_equal(np.asarray(safe_posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))


def test_official_randaugment_reaches_the_zero_bit_case():
    ra = rand_augment_transform('rand-m9-mstd0.5-inc1', {})
    op = next(o for o in ra.ops if o.name == 'PosterizeIncreasing')
    assert op.magnitude_std == 0.5 and op.level_fn(10, op.hparams) == (0,)  # m9 + noise clips to 10


def _force_zero_bit_posterize(transform) -> None:
    """Make RandAugment apply only posterize at magnitude 10, every time."""
    ra = next(t for t in transform.secondary.transforms if isinstance(t, RandAugment))
    ra.ops = [op for op in ra.ops if op.name == 'PosterizeIncreasing']
    ra.ops[0].prob, ra.ops[0].magnitude, ra.ops[0].magnitude_std = 1.0, 10, 0


def test_full_official_recipe_loads_batches_in_workers_despite_zero_bit_posterize(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=4, val_per_class=1)
    dataset_train, _, loader_train, _, mixup_fn = build_loader(data_config(root, **{'DATA.NUM_WORKERS': 1}))
    _force_zero_bit_posterize(dataset_train.transform)
    loader_train.set_epoch(0)
    samples, targets = next(iter(loader_train))
    samples, soft_targets = mixup_fn(samples, targets)
    assert samples.shape == (4, 3, 32, 32) and soft_targets.shape == (4, 3)


def test_random_resized_crop_on_tensors_matches_pils_bicubic_resize():
    image = _photo((120, 90), seed=1)
    whole = dict(scale=(1.0, 1.0), ratio=(120 / 90, 120 / 90))  # the crop box is the whole image
    ours = TensorRandomResizedCrop(48, **whole)(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    pil = RandomResizedCropAndInterpolation(48, interpolation='bicubic', **whole)(image)
    diff = (ours.permute(1, 2, 0).int() - torch.from_numpy(np.array(pil)).int()).abs().float()
    assert ours.shape == (3, 48, 48) and ours.dtype == torch.uint8 and diff.mean() < 3


def test_both_paths_build_the_same_augmentations():
    plain, _, plain_finish = build_train_transform(224, fast=False)
    fast, _, finish = build_train_transform(224, fast=True)
    assert plain_finish is None and finish.erasing.probability == 0.25 and finish.erasing.mode == 'pixel'
    assert repr(plain.transforms[2]) == repr(fast.secondary.transforms[0])  # the same RandAugment ops
    jitter_only, _, _ = build_train_transform(224, auto_augment='none', fast=True)
    assert 'ColorJitter' in repr(jitter_only.secondary)  # colour jitter only replaces RandAugment, as in timm


def test_small_images_use_a_padded_random_crop_on_both_paths():
    plain, _, _ = build_train_transform(32, fast=False)
    fast, _, _ = build_train_transform(32, fast=True)
    assert 'RandomCrop(size=(32, 32), padding=4)' in repr(plain.transforms[0])
    assert 'padding=[4, 4, 4, 4]' in repr(fast.crop)


def test_eval_resizes_to_256_over_224_then_centre_crops():
    transform, _, _ = build_eval_transform(224, fast=False)
    out = transform(_photo((400, 300)))
    assert out.shape == (3, 224, 224)
    assert 'size=256' in repr(transform.transforms[0]) and 'CenterCrop' in repr(transform.transforms[1])


def test_fast_and_plain_evaluation_batches_are_bitwise_identical(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=2, val_per_class=3)
    runs = [list(build_loader(data_config(root, **{'DATA.IMG_SIZE': 40, 'DATA.FAST_LOADER': fast}))[3])
            for fast in (True, False)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*runs)) and len(runs[0]) == 3


def test_batch_random_erasing_is_reproducible_from_its_seed_and_erases():
    erase = BatchRandomErasing(probability=1.0, mode='pixel')
    batch = torch.zeros(4, 3, 32, 32)
    first, second, other = erase(batch.clone(), 7), erase(batch.clone(), 7), erase(batch.clone(), 8)
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert all((img != 0).any() for img in first)  # probability 1: every image has an erased patch


def test_batch_random_erasing_draws_the_same_rectangles_as_timms_random_erasing():
    from timm.data.random_erasing import RandomErasing
    batch = torch.ones(16, 3, 32, 32)
    random.seed(11)  # timm draws its rectangles from the global stream; ours from Random(seed)
    theirs = RandomErasing(probability=0.5, mode='const', max_count=2, device='cpu')(batch.clone())
    ours = BatchRandomErasing(probability=0.5, mode='const', max_count=2)(batch.clone(), 11)
    assert torch.equal(ours, theirs) and not torch.equal(ours, batch)


_AUG_KEYS = {'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.3, 'AUG.REPROB': 0.5, 'AUG.REMODE': 'const',
             'AUG.RECOUNT': 2, 'DATA.INTERPOLATION': 'bilinear', 'DATA.IMG_SIZE': 64}


def test_official_aug_keys_reach_timms_transforms_on_the_plain_path():
    transform, _, _ = build_transform(True, data_config('/unused', **_AUG_KEYS, **{'DATA.FAST_LOADER': False}))
    text = repr(transform)
    assert 'RandAugment' not in text and 'interpolation=bilinear' in text
    assert 'ColorJitter(brightness=(0.7, 1.3)' in text  # colour jitter replaces RandAugment, as in timm
    assert 'RandomErasing(p=0.5, mode=const, count=(1, 2))' in text


def test_official_aug_keys_reach_the_fast_path():
    transform, decoder, finish = build_transform(True, data_config('/unused', **_AUG_KEYS))
    assert 'RandAugment' not in repr(transform) and 'ColorJitter(brightness=(0.7, 1.3)' in repr(transform)
    assert (decoder.mode, decoder.size) == ('bilinear', (64, 64))
    erasing = finish.erasing
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.5, 'const', 2)
    assert build_transform(True, data_config('/unused', **{'AUG.REPROB': 0.0}))[2].erasing is None


def test_mixup_and_cutmix_take_their_parameters_from_the_aug_keys():
    mixup = build_mixup(data_config('/unused', **{
        'AUG.MIXUP': 0.5, 'AUG.CUTMIX': 0.6, 'AUG.CUTMIX_MINMAX': [0.3, 0.7], 'AUG.MIXUP_PROB': 0.7,
        'AUG.MIXUP_SWITCH_PROB': 0.3, 'AUG.MIXUP_MODE': 'pair', 'MODEL.LABEL_SMOOTHING': 0.2}))
    # a min-max range makes timm's cutmix ignore its alpha (set to 1.0), as in the official framework
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, list(mixup.cutmix_minmax)) == (0.5, 1.0, [0.3, 0.7])
    assert (mixup.mix_prob, mixup.switch_prob, mixup.mode) == (0.7, 0.3, 'pair')
    assert (mixup.label_smoothing, mixup.num_classes) == (0.2, 3)


def test_uint8_images_from_pil_hold_its_pixels_in_channel_order():
    image = _photo((37, 23))
    assert torch.equal(pil_to_uint8(image), torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_training_normalisation_is_within_rounding_of_the_exact_one_and_evaluation_is_exact():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    exact = BatchNormalize()(images)
    expected = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(images.float() / 255)
    assert torch.equal(exact, expected)  # evaluation: the plain path's numbers, bit for bit
    fused = BatchNormalize(exact=False)(images)
    assert torch.allclose(fused, exact, rtol=0, atol=1e-6) and not torch.equal(fused, exact)


@pytest.mark.parametrize('exact', [True, False])
def test_normalisation_off_the_cpu_takes_a_list_or_a_batch(exact):
    images = [torch.empty(3, 8, 8, dtype=torch.uint8, device='meta') for _ in range(2)]  # shapes only: no GPU here
    for given in (images, torch.stack(images)):
        out = BatchNormalize(exact=exact)(given)
        assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and out.device.type == 'meta'
