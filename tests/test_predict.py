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


def _saved_untrained(folder, **keys) -> tuple[str, torch.nn.Module, object]:
    """An untrained tiny model saved as main.py saves one (weights and the run's config), with config ``keys``:
    (checkpoint path, the model in eval mode, its config)."""
    from config import get_default_config
    from models import build_model
    cfg = get_default_config()
    cfg.merge_from_file(str(write_tiny_config(folder)))
    for key, value in keys.items():
        node = cfg
        *parents, leaf = key.split('.')
        for name in parents:
            node = node[name]
        node[leaf] = value
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = folder / 'ckpt_epoch_0.pth'
    torch.save({'model': model.state_dict(), 'config': cfg.dump()}, path)
    return str(path), model, cfg


def _printed(stdout: str) -> dict[str, list[tuple[float, str]]]:
    """{image path: [(probability %, class name), ...]} as predict.py printed them."""
    found, path = {}, None
    for line in stdout.splitlines():
        match = re.match(r'^\s+([\d.]+)%  (.+)$', line)
        if match is None:
            path = line
            found[path] = []
        else:
            found[path].append((float(match.group(1)), match.group(2)))
    return found


def test_a_multilabel_model_prints_every_class_at_or_above_the_threshold_by_sigmoid(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    names = ['sea', 'sky', 'sand', 'boat', 'tree']
    (tmp_path / 'classes.txt').write_text('\n'.join(names) + '\n')
    ckpt, model, cfg = _saved_untrained(tmp_path, **{'MODEL.NUM_CLASSES': 5, 'DATA.LABEL_FILE': 'labels.csv',
                                                     'DATA.CLASSES_FILE': str(tmp_path / 'classes.txt'),
                                                     'DATA.MEAN': [0.4, 0.5, 0.6], 'DATA.STD': [0.2, 0.25, 0.3]})
    rng = np.random.default_rng(1)
    photos, expected = [], []
    for i in range(3):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f'photo_{i}.png')
        photos.append(str(tmp_path / f'photo_{i}.png'))
        x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) \
            / torch.tensor([0.2, 0.25, 0.3])[:, None, None]  # at 32 px evaluation takes the image as it is
        with torch.no_grad():
            expected.append(model(x[None])[0].sigmoid())
    threshold = float(torch.stack(expected).median())  # some classes above it, some below
    assert predict.run([*photos, '--weights', ckpt, '--device', 'cpu', '--threshold', str(threshold)]) == 0
    printed = _printed(capsys.readouterr().out)
    for photo, probs in zip(photos, expected):
        above = sorted(((p, names[c]) for c, p in enumerate(probs.tolist()) if p >= threshold), reverse=True)
        assert [name for _, name in printed[photo]] == [name for _, name in above]
        assert [p for p, _ in printed[photo]] == pytest.approx([100 * p for p, _ in above], abs=0.006)
    assert predict.run([photos[0], '--weights', ckpt, '--device', 'cpu', '--threshold', '0.999']) == 0
    assert capsys.readouterr().out.splitlines()[1] == '  no class at or above 99.9%'
    assert predict.run([photos[0], '--weights', ckpt, '--threshold', '1.5']) == 2
    assert capsys.readouterr().err.strip() == 'error: --threshold must be between 0 and 1, got 1.5'


def test_multilabel_names_never_come_from_a_label_file_in_another_order_than_the_runs_classes_file(tmp_path, capsys):
    (tmp_path / 'labels.csv').write_text('path,labels\ntrain/a.png,tree boat\n')  # sorted: boat, tree
    ckpt, _, _ = _saved_untrained(tmp_path, **{'MODEL.NUM_CLASSES': 2, 'DATA.LABEL_FILE': 'labels.csv',
                                               'DATA.CLASSES_FILE': 'gone.txt'})  # was: tree, boat
    write_image_folder(tmp_path / 'photos', num_classes=1, train_per_class=1, val_per_class=0)
    photo = str(tmp_path / 'photos' / 'train' / 'class_0' / 'train_0_0.png')
    args = [photo, '--weights', ckpt, '--device', 'cpu', '--threshold', '0.01', '--data-path', str(tmp_path)]
    assert predict.run(args) == 0
    out = capsys.readouterr()
    assert sorted(name for _, name in _printed(out.out)[photo]) == ['class 0', 'class 1']
    assert f"warning: no class names (DATA.CLASSES_FILE not found: {tmp_path / 'gone.txt'})" in out.err
    assert predict.run(args[:-1] + [str(tmp_path / 'nowhere')]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--data-path not found: {tmp_path / 'nowhere'}")


def test_a_grayscale_model_reads_16_bit_images_and_a_5_channel_model_reads_npy_arrays(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(2)
    for channels in (1, 5):
        folder = tmp_path / f'c{channels}'
        (folder / 'images').mkdir(parents=True)
        ckpt, model, _ = _saved_untrained(folder, **{'MODEL.SWIN.IN_CHANS': channels, 'DATA.MEAN': [0.5] * channels,
                                                     'DATA.STD': [0.25] * channels})
        if channels == 1:
            pixels = rng.integers(0, 65535, (32, 32), dtype=np.uint16)
            Image.fromarray(pixels).save(folder / 'images' / 'scan.png')
            x = torch.from_numpy(pixels.astype(np.float32) / 65535)[None]
        else:
            pixels = rng.random((32, 32, 5), dtype=np.float32)
            np.save(folder / 'images' / 'bands.npy', pixels)
            x = torch.from_numpy(pixels).permute(2, 0, 1)
        with torch.no_grad():
            probs = model(((x - 0.5) / 0.25)[None])[0].softmax(-1)
        assert predict.run([str(folder / 'images'), '--weights', ckpt, '--device', 'cpu']) == 0
        (path, top), = _printed(capsys.readouterr().out).items()
        assert path.startswith(str(folder / 'images'))
        best = probs.topk(3)
        assert [name for _, name in top] == [f'class {i}' for i in best.indices.tolist()]
        assert [p for p, _ in top] == pytest.approx([100 * p for p in best.values.tolist()], abs=0.006)
