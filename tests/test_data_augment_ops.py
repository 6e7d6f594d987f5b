"""RandAugment's shears and translations as row/column operations give PIL's pixels, and the op stream stays timm's."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import RandAugment, rand_augment_transform

from data import augment_ops
from data.augment_ops import axis_affine, use_fast_affine, use_safe_posterize
from data.transforms import build_train_transform

BICUBIC, BILINEAR, NEAREST = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.NEAREST
FILL = (124, 116, 104)  # timm's fill for ImageNet mean


@pytest.fixture(scope='module')
def photo() -> Image.Image:
    """A 96 x 72 crop of a real photograph (scikit-learn's), flat sky and sharp edges included."""
    from sklearn.datasets import load_sample_image
    return Image.fromarray(load_sample_image('china.jpg')).crop((200, 0, 296, 72))


def _diff(ours: Image.Image, pil: Image.Image) -> np.ndarray:
    assert ours.mode == pil.mode and ours.size == pil.size
    return np.abs(np.asarray(ours).astype(int) - np.asarray(pil).astype(int))


def _matrices(width: int, height: int) -> dict[str, tuple]:
    return {'shear x': (1, 0.27, 0, 0, 1, 0), 'shear y': (1, 0, 0, -0.19, 1, 0),
            'translate x': (1, 0, 0.37 * width, 0, 1, 0), 'translate y': (1, 0, 0, 0, 1, -0.41 * height),
            'shear x + shift': (1, -0.3, 5.5, 0, 1, 0), 'shear y + shift': (1, 0, 0, 0.12, 1, -7.25),
            'whole-pixel shift': (1, 0, 3, 0, 1, 0), 'beyond the image': (1, 0, 2.5 * width, 0, 1, 0)}


@pytest.mark.parametrize('resample', [BICUBIC, BILINEAR])
@pytest.mark.parametrize('name', list(_matrices(1, 1)))
def test_one_axis_affine_gives_pils_pixels_up_to_rounding(photo, name, resample):
    matrix = _matrices(*photo.size)[name]
    pil = photo.transform(photo.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=FILL)
    diff = _diff(axis_affine(photo, matrix, resample, FILL), pil)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005  # single vs double precision: rare 1-level steps


def test_flat_areas_and_whole_pixel_shifts_are_exact():
    flat = Image.new('RGB', (50, 40), (255, 37, 0))
    for matrix in ((1, 0.3, 0, 0, 1, 0), (1, 0, 0, 0.21, 1, 0)):
        pil = flat.transform(flat.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=FILL)
        assert not _diff(axis_affine(flat, matrix, BICUBIC, FILL), pil).any()


def test_fill_colour_forms_accepted_by_pil(photo):
    matrix = (1, 0, 30, 0, 1, 0)
    for fill in (None, 90, (10, 20, 30)):
        pil = photo.transform(photo.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)
        assert _diff(axis_affine(photo, matrix, BICUBIC, fill), pil).max() <= 1


@pytest.mark.parametrize('case', ['rotation', 'nearest', 'grey image'])
def test_everything_else_is_left_to_pil(photo, case):
    matrix, resample, image = (1, 0.2, 0, 0, 1, 0), BICUBIC, photo
    if case == 'rotation':
        matrix = (0.96, 0.28, -5, -0.28, 0.96, 14)
    elif case == 'nearest':
        resample = NEAREST
    else:
        image = photo.convert('L')
    pil = image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=FILL[0])
    assert not _diff(axis_affine(image, matrix, resample, FILL[0]), pil).any()


def test_fast_randaugment_draws_the_same_ops_and_gives_timms_images(photo):
    hparams = {'img_mean': FILL, 'interpolation': BICUBIC}
    timm_ra = rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)
    fast_ra = rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)
    assert use_fast_affine(fast_ra) == 4  # ShearX, ShearY, TranslateXRel, TranslateYRel
    use_safe_posterize(timm_ra), use_safe_posterize(fast_ra)
    for seed in range(40):
        random.seed(seed), np.random.seed(seed)  # RandAugment picks its ops with NumPy's generator
        expected = timm_ra(photo)
        after_timm = random.random()
        random.seed(seed), np.random.seed(seed)
        diff = _diff(fast_ra(photo), expected)
        assert random.random() == after_timm  # same draws consumed: the rest of the pipeline stays in step
        # One-level steps, which a following contrast op may stretch, in a fraction of a percent of values.
        assert (diff > 0).mean() < 0.005 and diff.mean() < 0.01


def test_random_interpolation_is_drawn_as_timm_draws_it(photo):
    timm_ra = rand_augment_transform('rand-m9-mstd0.5-n1', {'img_mean': FILL})  # random bilinear/bicubic
    fast_ra = rand_augment_transform('rand-m9-mstd0.5-n1', {'img_mean': FILL})
    use_fast_affine(fast_ra)
    for ra in (timm_ra, fast_ra):
        ra.ops = [op for op in ra.ops if op.name == 'ShearX']
        ra.ops[0].prob = 1.0
    for seed in range(10):
        random.seed(seed), np.random.seed(seed)
        expected = timm_ra(photo)
        random.seed(seed), np.random.seed(seed)
        assert _diff(fast_ra(photo), expected).max() <= 1


def _randaugment_fns(transform) -> dict[str, object]:
    ra = next(t for t in transform.transforms if isinstance(t, RandAugment))
    return {op.name: op.aug_fn for op in ra.ops}


def test_fast_training_path_uses_the_row_operations_and_the_plain_path_keeps_timms():
    fast = _randaugment_fns(build_train_transform(64, fast=True)[0].secondary)
    plain = _randaugment_fns(build_train_transform(64, fast=False)[0])
    assert fast['ShearX'] is augment_ops.shear_x and fast['TranslateYRel'] is augment_ops.translate_y_rel
    assert plain['ShearX'] is timm_aa.shear_x and plain['TranslateYRel'] is timm_aa.translate_y_rel
    assert fast['Rotate'] is plain['Rotate'] is timm_aa.rotate
    assert fast['PosterizeIncreasing'] is plain['PosterizeIncreasing'] is augment_ops.safe_posterize
