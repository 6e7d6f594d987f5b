"""predict.py: top-5 classes with probabilities, class names from the training folder, any checkpoint."""
from __future__ import annotations

import re

import pytest
import torch

import main
import predict
from cli import write_tiny_config
from conftest import write_image_folder


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained by main.py on three colour classes: (config, checkpoint, data folder)."""
    root = tmp_path_factory.mktemp('predict')
    data = write_image_folder(root / 'data')
    cfg = write_tiny_config(root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    code = main.run([str(a) for a in ['--cfg', cfg, '--data-path', data, '--output', root / 'out',
                                      '--disable_amp', '--opts', 'TRAIN.EPOCHS', '4', 'TRAIN.BASE_LR', '1.0']])
    torch.set_num_threads(before)
    assert code == 0
    return cfg, root / 'out' / 'tiny_test' / 'default' / 'ckpt_epoch_3.pth', data


def _top(stdout: str) -> dict[str, tuple[float, str]]:
    """{image path: (probability %, class name) of its first line}."""
    best, path = {}, None
    for line in stdout.splitlines():
        match = re.match(r'^\s+([\d.]+)%  (.+)$', line)
        if match is None:
            path = line
        elif path not in best:
            best[path] = (float(match.group(1)), match.group(2))
    return best


def test_predicts_the_class_of_training_images_from_our_checkpoint(trained, capsys):
    _, ckpt, data = trained
    images = [data / 'train' / f'class_{c}' / f'train_{c}_0.png' for c in range(3)]
    assert predict.run([str(p) for p in images] + ['--weights', str(ckpt), '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    best = _top(out)
    assert [best[str(p)][1] for p in images] == ['class_0', 'class_1', 'class_2']  # names from the saved data path
    assert len(re.findall(r'^\s+[\d.]+%  class_\d$', out, flags=re.M)) == 3 * 3  # top-k capped at 3 classes
    assert all(prob > 50 for prob, _ in best.values())


def test_released_style_weights_need_the_config_and_read_names_from_data_path(trained, tmp_path, capsys):
    cfg, ckpt, data = trained
    released = tmp_path / 'released.pth'
    torch.save({'model': torch.load(ckpt, weights_only=True)['model']}, released)
    folder = data / 'val' / 'class_1'
    assert predict.run([str(folder), '--weights', str(released), '--cfg', str(cfg), '--data-path', str(data)]) == 0
    best = _top(capsys.readouterr().out)
    assert len(best) == 4 and {name for _, name in best.values()} == {'class_1'}
    assert predict.run([str(folder), '--weights', str(released)]) == 2
    assert 'pass the model\'s --cfg' in capsys.readouterr().err


def test_a_missing_image_is_one_line_naming_it(trained, capsys):
    _, ckpt, _ = trained
    assert predict.run(['nowhere.png', '--weights', str(ckpt)]) == 2
    assert capsys.readouterr().err.strip() == 'error: no such image or folder: nowhere.png'


def test_native_size_classifies_images_at_their_own_resolution(trained, tmp_path, capsys):
    _, ckpt, data = trained
    from PIL import Image
    images = []
    for c, size in enumerate([(45, 71), (37, 29), (52, 40)]):  # (width, height): none a multiple of patch or window
        path = tmp_path / f'odd_{c}.png'
        Image.open(data / 'train' / f'class_{c}' / f'train_{c}_1.png').resize(size).save(path)
        images.append(path)
    assert predict.run([str(p) for p in images] + ['--weights', str(ckpt), '--native-size', '--device', 'cpu']) == 0
    best = _top(capsys.readouterr().out)
    assert [best[str(p)][1] for p in images] == ['class_0', 'class_1', 'class_2']
