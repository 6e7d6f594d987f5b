"""The fast path draws the plain path's crops and flips; reduced JPEG decoding of training crops stays within noise."""
from __future__ import annotations

import io
import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

import data.decode as decode
import data.transforms as transforms
from data import build_loader
from data.decode import decode_pil
from data.transforms import RandomResizedCropDecoder, build_eval_transform
from test_data_common import data_config, jpeg_folder


@pytest.fixture(scope='module')
def photo_jpeg() -> bytes:
    """A real 640 x 427 photograph (shipped with scikit-learn) as JPEG bytes."""
    from sklearn.datasets import load_sample_image
    out = io.BytesIO()
    Image.fromarray(load_sample_image('china.jpg')).save(out, format='JPEG', quality=90)
    return out.getvalue()


def _pixels(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy().astype(int)
    return np.asarray(image).astype(int)


def test_fast_and_plain_training_paths_draw_the_same_crop_and_flip_for_each_sample(tmp_path):
    root = jpeg_folder(tmp_path, num_classes=3, train_per_class=4, val_per_class=1)
    plain_recipe = {'DATA.IMG_SIZE': 40, 'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.0, 'AUG.REPROB': 0.0}
    runs = {}
    for fast, epoch in ((True, 1), (False, 1), (False, 2)):
        loader = build_loader(data_config(root, **{**plain_recipe, 'DATA.FAST_LOADER': fast}))[2]
        loader.set_epoch(epoch)
        runs[fast, epoch] = torch.cat([x for x, _ in loader])
    same_draws = (runs[True, 1] - runs[False, 1]).abs().mean()
    other_draws = (runs[False, 2] - runs[False, 1]).abs().mean()
    assert same_draws < 0.01 < other_draws  # within resampling noise (0.01 is ~0.6 grey levels)


def test_decoder_crops_exactly_where_timms_random_resized_crop_does(photo_jpeg):
    timm_crop = RandomResizedCropAndInterpolation(64, interpolation='bicubic')
    pil_route = RandomResizedCropDecoder(64, reduce=False, pil_resize=True)
    tensor_route = RandomResizedCropDecoder(64, reduce=False, pil_resize=False)
    for seed in range(8):
        random.seed(seed)
        expected = _pixels(timm_crop(decode_pil(photo_jpeg)))
        random.seed(seed)
        assert np.array_equal(_pixels(pil_route(photo_jpeg)), expected)  # same box, same PIL operations
        random.seed(seed)
        assert np.abs(_pixels(tensor_route(photo_jpeg)) - expected).mean() < 0.5  # same box, torch's resize


def test_large_crops_are_decoded_reduced_within_resampling_noise(photo_jpeg, monkeypatch):
    scales = []

    def spy(img, factor):
        scales.append(decode.draft_reduce(img, factor))
        return scales[-1]
    monkeypatch.setattr(transforms, 'draft_reduce', spy)
    reduced = RandomResizedCropDecoder(64, scale=(0.5, 1.0))
    full = RandomResizedCropDecoder(64, scale=(0.5, 1.0), reduce=False, pil_resize=True)
    diffs = []
    for seed in range(8):
        random.seed(seed)
        fast = _pixels(reduced(photo_jpeg))
        random.seed(seed)
        diffs.append(np.abs(fast - _pixels(full(photo_jpeg))).mean())
    assert max(scales) >= 2  # boxes of 256+ px for a 64 px output: decoded at half size or less
    assert 0 < max(diffs) < 1.5  # grey levels


def test_small_crops_are_decoded_at_full_size(photo_jpeg, monkeypatch):
    scales = []
    monkeypatch.setattr(transforms, 'draft_reduce', lambda img, factor: scales.append(factor) or 1.0)
    decoder = RandomResizedCropDecoder(64, scale=(0.08, 0.08))  # boxes of ~150 px: under 4 x 64 px
    for seed in range(4):
        random.seed(seed)
        decoder(photo_jpeg)
    assert set(scales) <= {1}


def test_evaluation_of_large_jpegs_is_bitwise_identical_on_both_paths(photo_jpeg):
    fast, decoder, finish = build_eval_transform(64, fast=True)  # the photo is 9x the 73 px resize target
    plain, plain_decoder, _ = build_eval_transform(64, fast=False)
    assert torch.equal(finish(fast(decoder(photo_jpeg))[None])[0], plain(plain_decoder(photo_jpeg)))


def test_truncated_jpeg_is_unreadable_on_the_reduced_path(photo_jpeg):
    random.seed(0)
    with pytest.raises(OSError):  # a 427 px box for a 64 px output: decoded at 1/2
        RandomResizedCropDecoder(64, scale=(1.0, 1.0))(photo_jpeg[:len(photo_jpeg) // 2])


def test_pillow_simd_is_recognised_by_its_distribution(monkeypatch):
    assert decode.pillow_build().endswith(PIL.__version__)
    versions = {'pillow-simd': PIL.__version__}

    def version(name):
        if name not in versions:
            raise decode.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(decode.metadata, 'version', version)
    assert decode._simd_build()
    versions['pillow-simd'] = '9.0.0.post1'  # a stale record: stock Pillow was installed over it
    assert not decode._simd_build()


@pytest.mark.parametrize('variant', ['baseline', 'progressive', 'grey', 'exif'])
def test_jpeg_size_from_the_frame_header_is_pillows_size(variant):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    out, options = io.BytesIO(), {}
    if variant == 'grey':
        image = image.convert('L')
    elif variant == 'progressive':
        options['progressive'] = True
    elif variant == 'exif':
        exif = Image.Exif()
        exif[0x010F] = 'camera'  # an APP1 segment before the frame header
        options['exif'] = exif.tobytes()
    image.save(out, format='JPEG', **options)
    data = out.getvalue()
    assert decode.jpeg_size(data) == Image.open(io.BytesIO(data)).size == (53, 37)


def test_jpeg_size_leaves_other_data_to_pillow():
    png = io.BytesIO()
    Image.new('RGB', (5, 4)).save(png, format='PNG')
    assert decode.jpeg_size(png.getvalue()) is None
    assert decode.jpeg_size(b'\xff\xd8\xff\xe0\x00') is None  # a JPEG cut off before its frame header
