"""The config tree: official keys and defaults, BASE inheritance, --opts, flags, freezing, clear errors."""
from __future__ import annotations

import argparse

import pytest

from config import get_config, get_default_config, scale_learning_rates
from utils.errors import UserError


def _args(cfg, **flags):
    return argparse.Namespace(cfg=str(cfg), opts=flags.pop('opts', None), **flags)


def test_defaults_match_the_official_framework():
    c = get_default_config()
    assert c.DATA.BATCH_SIZE == 128 and c.DATA.CACHE_MODE == 'part' and c.DATA.IMG_SIZE == 224
    assert c.MODEL.SWIN.DEPTHS == [2, 2, 6, 2] and c.MODEL.SWIN.QK_SCALE is None
    assert c.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES == [0, 0, 0, 0]
    assert c.TRAIN.BASE_LR == 5e-4 and c.TRAIN.WARMUP_EPOCHS == 20 and c.TRAIN.CLIP_GRAD == 5.0
    assert c.TRAIN.OPTIMIZER.BETAS == (0.9, 0.999) and c.AUG.AUTO_AUGMENT == 'rand-m9-mstd0.5-inc1'
    assert c.AMP_ENABLE is True and c.TAG == 'default' and c.SAVE_FREQ == 1 and c.PRINT_FREQ == 10


def test_base_files_merge_first_relative_to_the_including_file(tmp_path):
    (tmp_path / 'base.yaml').write_text('MODEL:\n  NAME: base_name\n  DROP_PATH_RATE: 0.5\nTRAIN:\n  EPOCHS: 7\n')
    (tmp_path / 'sub').mkdir()
    child = tmp_path / 'sub' / 'child.yaml'
    child.write_text("BASE: ['../base.yaml']\nMODEL:\n  DROP_PATH_RATE: 0.2\n")
    c = get_config(_args(child))
    assert c.MODEL.NAME == 'base_name' and c.TRAIN.EPOCHS == 7 and c.MODEL.DROP_PATH_RATE == 0.2


def test_opts_override_the_file_and_flags_override_both(tmp_path):
    f = tmp_path / 'c.yaml'
    f.write_text('DATA:\n  BATCH_SIZE: 32\nTRAIN:\n  BASE_LR: 1e-3\n')
    c = get_config(_args(f, opts=['DATA.BATCH_SIZE', '16', 'TRAIN.BASE_LR', '2', 'MODEL.SWIN.DEPTHS', '[1, 1]'],
                         batch_size=8, zip=True, disable_amp=True, output='runs', tag='t1'))
    assert c.DATA.BATCH_SIZE == 8 and c.TRAIN.BASE_LR == 2.0 and isinstance(c.TRAIN.BASE_LR, float)
    assert c.MODEL.SWIN.DEPTHS == [1, 1] and c.DATA.ZIP_MODE and not c.AMP_ENABLE
    assert c.OUTPUT.replace('\\', '/') == 'runs/swin_tiny_patch4_window7_224/t1'


def test_yaml_scientific_notation_is_a_number(tmp_path):
    f = tmp_path / 'c.yaml'
    f.write_text('TRAIN:\n  MIN_LR: 5e-6\n')
    assert get_config(_args(f)).TRAIN.MIN_LR == 5e-6


def test_result_is_frozen(tmp_path):
    f = tmp_path / 'c.yaml'
    f.write_text('')
    c = get_config(_args(f))
    with pytest.raises(AttributeError):
        c.TRAIN.EPOCHS = 1


@pytest.mark.parametrize('text, needle', [
    ('TRAIN:\n  EPOCH: 3\n', 'TRAIN.EPOCH'),
    ('TRAIN:\n  EPOCHS: three\n', 'TRAIN.EPOCHS'),
    ('DATA:\n  CACHE_MODE: some\n', 'DATA.CACHE_MODE'),
    ('MODEL:\n  SWIN: 3\n', 'MODEL.SWIN'),
])
def test_bad_yaml_keys_and_values_name_the_key(tmp_path, text, needle):
    f = tmp_path / 'c.yaml'
    f.write_text(text)
    with pytest.raises(UserError, match=needle.replace('.', r'\.')):
        get_config(_args(f))


@pytest.mark.parametrize('opts, needle', [(['TRAIN.EPOCH', '3'], 'TRAIN.EPOCH'),
                                          (['TRAIN.EPOCHS', '1.5'], 'TRAIN.EPOCHS'),
                                          (['NOPE.EPOCHS', '1'], 'NOPE.EPOCHS'),
                                          (['TRAIN.EPOCHS'], 'TRAIN.EPOCHS')])
def test_bad_opts_name_the_key(tmp_path, opts, needle):
    f = tmp_path / 'c.yaml'
    f.write_text('')
    with pytest.raises(UserError, match=needle.replace('.', r'\.')):
        get_config(_args(f, opts=opts))


def test_missing_and_unparsable_files_are_named(tmp_path):
    with pytest.raises(UserError, match='missing.yaml'):
        get_config(_args(tmp_path / 'missing.yaml'))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL: [\n')
    with pytest.raises(UserError, match='bad.yaml'):
        get_config(_args(bad))


def test_learning_rates_scale_with_total_batch_over_512(tmp_path):
    f = tmp_path / 'c.yaml'
    f.write_text('DATA:\n  BATCH_SIZE: 128\nTRAIN:\n  ACCUMULATION_STEPS: 2\n')
    scaled = scale_learning_rates(get_config(_args(f)), world_size=4)
    assert scaled.TRAIN.BASE_LR == pytest.approx(5e-4 * 128 * 4 / 512 * 2)
    assert scaled.TRAIN.MIN_LR == pytest.approx(5e-6 * 2) and scaled.is_frozen()


def test_official_22k_configs_get_the_22k_class_count():
    c = get_config(_args('configs/swin/swin_base_patch4_window7_224_22k.yaml'))
    assert c.MODEL.NUM_CLASSES == 21841
    c = get_config(_args('configs/swin/swin_base_patch4_window7_224_22k.yaml', opts=['MODEL.NUM_CLASSES', '100']))
    assert c.MODEL.NUM_CLASSES == 100
