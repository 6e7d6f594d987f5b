"""Weights of any layout where the scripts read weights (issue #31): main.py --pretrained / --eval --resume,
predict.py, validate.py and tools.export take timm and transformers files and snapshot folders; exports load back
in timm and transformers with the same logits; mix-ups are one error line.

Every model is the tiny config's (32 px, 2 stages of 1 block, window 4) with random weights, saved by timm and
transformers themselves; nothing is downloaded. main.py, predict.py, validate.py and the export run in-process.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

import main  # noqa: E402
import predict  # noqa: E402
import validate  # noqa: E402
from cli import write_tiny_config  # noqa: E402
from conftest import write_image_folder  # noqa: E402
from config import get_default_config, merge_yaml  # noqa: E402
from models import build_model  # noqa: E402
from test_weight_layouts import save_timm_folder  # noqa: E402
from tools.export import export, parse_args, run as export_run  # noqa: E402
from tools.model_parity import randomize_  # noqa: E402
from utils.checkpoint import load_weights  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.weight_layouts import OFFICIAL_ZOO, ZooEntry, read_snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TOL = 1e-5
TIMM_NAMES = {'swin': 'swin_tiny_patch4_window7_224', 'swinv2': 'swinv2_tiny_window8_256'}
NAMES = ['cat', 'dog', 'owl']


def timm_twin(model_type: str = 'swin', classes: int = 3) -> torch.nn.Module:
    """timm's model of the tiny config's shape (random weights)."""
    model = timm.create_model(TIMM_NAMES[model_type], pretrained=False, img_size=32, embed_dim=16, depths=(1, 1),
                              num_heads=(1, 2), window_size=4, num_classes=classes)
    return randomize_(model, seed=1).eval()


def hf_twin(classes: int = 3) -> torch.nn.Module:
    """transformers' SwinForImageClassification of the tiny config's shape, with class names."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4, num_labels=classes, id2label=dict(enumerate(NAMES[:classes])),
                                     label2id={n: i for i, n in enumerate(NAMES[:classes])})
    return randomize_(transformers.SwinForImageClassification(config), seed=2).eval()


def save_timm_file(model: torch.nn.Module, path: Path) -> str:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def tiny_config(root: Path, *opts):
    cfg = get_default_config()
    merge_yaml(cfg, str(write_tiny_config(root)))
    if opts:
        cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def normalised(path: Path) -> torch.Tensor:
    """A 32 px image as the evaluation feeds it (images of at most 32 px are not resized)."""
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((pixels - mean[:, None, None]) / std[:, None, None])[None]


def run_log(out: Path, tag: str = 'default') -> str:
    return (out / 'tiny_test' / tag / 'log_rank0.txt').read_text()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- --pretrained

def test_pretrained_reads_a_timm_file_and_a_transformers_folder_exactly(tmp_path):
    from utils.pretrained import load_pretrained
    import logging
    timm_model, hf_model = timm_twin(), hf_twin()
    hf_model.save_pretrained(tmp_path / 'hf')
    sources = {save_timm_file(timm_model, tmp_path / 'timm.safetensors'): lambda x: timm_model(x),
               str(tmp_path / 'hf'): lambda x: hf_model(pixel_values=x).logits}
    for path, twin in sources.items():
        cfg = tiny_config(tmp_path, 'MODEL.PRETRAINED', path)
        model = build_model(cfg).eval()
        report = load_pretrained(cfg, model, logging.getLogger('test'))
        assert report.head == 'kept'
        with torch.no_grad():
            assert (model(images()) - twin(images())).abs().max() <= TOL


def test_fine_tune_from_a_timm_file_to_5_classes_through_main(tmp_path):
    weights = save_timm_file(timm_twin(classes=3), tmp_path / 'swin_timm.safetensors')
    data = write_image_folder(tmp_path / 'data', num_classes=5, train_per_class=4, val_per_class=2)
    out = tmp_path / 'out'
    code = main.run([str(a) for a in ['--cfg', write_tiny_config(tmp_path), '--data-path', data, '--output', out,
                                      '--pretrained', weights, '--disable_amp', '--opts', 'MODEL.NUM_CLASSES', '5',
                                      'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']])
    assert code == 0
    log = run_log(out)
    assert f"weights: {weights}: timm layout (Swin V1), converted to the official layout" in log
    assert 'classifier head re-initialised to zero (3 classes in the weights, 5 in the model)' in log
    assert (out / 'tiny_test' / 'default' / 'ckpt_epoch_0.pth').is_file()


def test_main_pretrained_takes_a_transformers_folder(tmp_path):
    """--eval --pretrained FOLDER: the folder's weights, adapted to --cfg's model, score what transformers does."""
    twin = hf_twin()
    twin.save_pretrained(tmp_path / 'hf')
    data = write_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=2)
    out = tmp_path / 'out'
    assert main.run([str(a) for a in ['--cfg', write_tiny_config(tmp_path), '--data-path', data, '--output', out,
                                      '--eval', '--pretrained', tmp_path / 'hf', '--disable_amp']]) == 0
    log = run_log(out)
    assert re.search(rf"weights: {tmp_path / 'hf'}: Hugging Face transformers layout \(Swin V1\), prefix 'swin\.', "
                     "converted to the official layout", log)
    with torch.no_grad():
        files = sorted((data / 'val').glob('*/*.png'))
        right = sum(int(twin(pixel_values=normalised(f)).logits.argmax()) == int(f.parent.name[-1]) for f in files)
    assert float(re.findall(r' \* Acc@1 ([\d.]+)', log)[-1]) == pytest.approx(100 * right / len(files), abs=1e-3)


def test_v2_weights_into_a_v1_config_is_one_error_line(tmp_path, capsys):
    weights = save_timm_file(timm_twin('swinv2'), tmp_path / 'v2.safetensors')
    data = write_image_folder(tmp_path / 'data', train_per_class=4, val_per_class=1)
    code = main.run([str(a) for a in ['--cfg', write_tiny_config(tmp_path), '--data-path', data, '--output',
                                      tmp_path / 'out', '--pretrained', weights]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    assert 'timm layout (Swin V2)' in err[0] and 'the weights are Swin V2, the model is Swin V1' in err[0]
    assert 'missing layers.0.blocks.0.attn.relative_position_bias_table' in err[0] and 'unexpected layers.0' in err[0]


def test_22k_head_into_a_1k_model_without_a_class_map_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, 'MODEL.NUM_CLASSES', 21841)
    torch.save({'model': build_model(cfg).state_dict()}, tmp_path / 'w22k.pth')
    with pytest.raises(UserError) as e:
        load_weights(str(tmp_path / 'w22k.pth'), build_model(tiny_config(tmp_path, 'MODEL.NUM_CLASSES', 1000)))
    assert '\n' not in str(e.value) and 'a 21841-class head for a 1000-class model: give a class map' in str(e.value)


def test_eval_resume_of_a_timm_file_loads_it_as_weights(tmp_path):
    twin = timm_twin()
    weights = save_timm_file(twin, tmp_path / 'timm.safetensors')
    data = write_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=2)
    out = tmp_path / 'out'
    assert main.run([str(a) for a in ['--cfg', write_tiny_config(tmp_path), '--data-path', data, '--output', out,
                                      '--eval', '--resume', weights, '--disable_amp']]) == 0
    log = run_log(out)
    assert f"weights: {weights}: timm layout (Swin V1), converted to the official layout" in log
    with torch.no_grad():  # the accuracy timm's model has on these images
        files = sorted((data / 'val').glob('*/*.png'))
        right = sum(int(twin(normalised(f)).argmax()) == int(f.parent.name[-1]) for f in files)
    acc1 = float(re.findall(r' \* Acc@1 ([\d.]+)', log)[-1])
    assert acc1 == pytest.approx(100 * right / len(files), abs=1e-3)


def test_a_backbone_loads_timm_weights_through_load_weights(tmp_path):
    """The backbone API: load_weights reads any layout; the parts a backbone leaves out are ignored."""
    from models import SwinTransformer
    twin = timm_twin()
    backbone = SwinTransformer(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
                               features_only=True).eval()
    load_weights(save_timm_file(twin, tmp_path / 'timm.safetensors'), backbone)
    with torch.no_grad():
        theirs = twin.forward_intermediates(images(), intermediates_only=True, output_fmt='NCHW')
        mine = backbone(images())
    assert len(mine) == 2 and all((a - b).abs().max() <= TOL for a, b in zip(mine, theirs))


# ------------------------------------------------------------------------------------------------ predict.py

def test_predict_on_a_transformers_folder_prints_its_class_names(tmp_path, capsys):
    twin = hf_twin()
    twin.save_pretrained(tmp_path / 'hf')
    data = write_image_folder(tmp_path / 'data', train_per_class=1, val_per_class=1)
    photos = sorted((data / 'val').glob('*/*.png'))
    assert predict.run([str(p) for p in photos] + ['--weights', str(tmp_path / 'hf'), '--device', 'cpu']) == 0
    captured = capsys.readouterr()
    assert 'Hugging Face transformers layout (Swin V1)' in captured.err and '3 class names' in captured.err
    printed = re.findall(r'^\s+([\d.]+)%  (\w+)$', captured.out, flags=re.M)
    assert {name for _, name in printed} == set(NAMES)
    with torch.no_grad():  # each photo's first line: transformers' best class and its probability
        for photo, (prob, name) in zip(photos, printed[::3]):
            probs = twin(pixel_values=normalised(photo)).logits.softmax(-1)[0]
            assert name == NAMES[int(probs.argmax())] and float(prob) == pytest.approx(100 * float(probs.max()),
                                                                                        abs=0.006)


def test_predict_on_a_timm_folder_prepares_images_as_timm_does(tmp_path, capsys):
    """timm's crop_pct 0.9, bicubic, mean/std from the folder's config.json, on an image of another size."""
    twin = timm_twin()
    save_timm_folder(twin, tmp_path / 'timm', NAMES)
    photo = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (57, 45, 3), dtype=np.uint8)).save(photo)
    assert predict.run([str(photo), '--weights', str(tmp_path / 'timm'), '--device', 'cpu']) == 0
    printed = re.findall(r'^\s+([\d.]+)%  (\w+)$', capsys.readouterr().out, flags=re.M)
    data_config = {**timm.data.resolve_data_config({}, model=twin), 'input_size': (3, 32, 32)}
    assert data_config['crop_pct'] == 0.9
    with torch.no_grad():
        probs = twin(timm.data.create_transform(**data_config)(Image.open(photo).convert('RGB'))[None]).softmax(-1)
    expected = sorted(zip(probs[0].tolist(), NAMES), reverse=True)
    assert [name for _, name in printed] == [name for _, name in expected]
    assert [float(p) for p, _ in printed] == pytest.approx([100 * p for p, _ in expected], abs=0.006)


# ----------------------------------------------------------------------------------------------- validate.py

def _validate(tmp_path: Path, data: Path, spec, *extra) -> tuple[int, list[dict]]:
    results = tmp_path / 'results.csv'
    status = validate.cli([str(a) for a in ['--cfg', write_tiny_config(tmp_path), '--data-path', data, '--output',
                                            tmp_path / 'eval', '--checkpoints', spec, '--results-file', results,
                                            '--disable_amp', *extra]])
    with open(results, newline='') as f:
        return status, list(csv.DictReader(f))


def test_validate_evaluates_a_timm_folder_with_its_model(tmp_path):
    twin = timm_twin()
    save_timm_folder(twin, tmp_path / 'timm', NAMES)
    data = write_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=3)
    status, rows = _validate(tmp_path, data, tmp_path / 'timm')
    assert status == 0 and len(rows) == 1 and rows[0]['error'] == '' and rows[0]['zoo_acc1'] == ''
    with torch.no_grad():
        files = sorted((data / 'val').glob('*/*.png'))
        right = sum(int(twin(normalised(f)).argmax()) == int(f.parent.name[-1]) for f in files)
    assert float(rows[0]['acc1']) == pytest.approx(100 * right / len(files), abs=1e-3)
    log = run_log(tmp_path / 'eval')
    assert 'timm layout (Swin V1), converted to the official layout; model from its timm config.json' in log


def test_validate_puts_the_official_zoo_figures_next_to_a_released_file(tmp_path, monkeypatch):
    """A released file is recognised by name and keys, evaluated with its own config (here: 1000 classes at 64 px
    where --cfg says 3 at 32), and the zoo's Acc@1/Acc@5 and the differences are printed and written."""
    released = tmp_path / 'released.yaml'
    released.write_text(write_tiny_config(tmp_path).read_text().replace('NUM_CLASSES: 3', 'NUM_CLASSES: 1000')
                        .replace('IMG_SIZE: 32', 'IMG_SIZE: 64'))
    entry = ZooEntry('Swin-Tiny-Test', 81.2, 95.5, 'swin', 16, (1, 1), 64, str(released))
    monkeypatch.setitem(OFFICIAL_ZOO, 'swin_test_patch4_window4_64', entry)
    model_cfg = get_default_config()
    merge_yaml(model_cfg, str(released))
    torch.save({'model': randomize_(build_model(model_cfg), seed=4).state_dict()},
               tmp_path / 'swin_test_patch4_window4_64.pth')
    torch.save({'model': build_model(tiny_config(tmp_path)).state_dict()}, tmp_path / 'my_run.pth')
    data = write_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=2)
    status, rows = _validate(tmp_path, data, tmp_path)
    assert status == 0 and sorted(r['checkpoint'].split('/')[-1] for r in rows) == [
        'my_run.pth', 'swin_test_patch4_window4_64.pth']
    row = next(r for r in rows if r['checkpoint'].endswith('window4_64.pth'))
    assert (row['zoo_acc1'], row['zoo_acc5']) == ('81.2', '95.5')
    assert float(row['diff_acc1']) == pytest.approx(float(row['acc1']) - 81.2, abs=1e-3)
    log = run_log(tmp_path / 'eval')
    assert f'model: swin, image size 64 (TEST.CROP True), from {released}' in log
    assert re.search(r'official model zoo \(Swin-Tiny-Test\): Acc@1 81\.2 Acc@5 95\.5; measured - reported', log)
    assert re.search(r'zoo@1  zoo@5  diff@1  diff@5\n', log)


# ----------------------------------------------------------------------------------------------- tools.export

@pytest.fixture
def our_checkpoint(tmp_path):
    """A checkpoint of ours (random weights, 3 classes) whose saved config names its training data."""
    data = write_image_folder(tmp_path / 'data', num_classes=3, train_per_class=1, val_per_class=1)
    for old, new in zip(sorted((data / 'train').iterdir()), NAMES):  # class folders named as a dataset's
        old.rename(old.parent / new)
    cfg = tiny_config(tmp_path, 'DATA.DATA_PATH', str(data))
    model = randomize_(build_model(cfg), seed=3).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'config': cfg.dump()}, path)
    return str(path), model


def test_export_timm_and_hf_folders_load_back_with_the_same_logits(tmp_path, our_checkpoint, capsys):
    ckpt, model = our_checkpoint
    for fmt in ('timm', 'hf'):
        assert export(parse_args(['--weights', ckpt, '--format', fmt, '--output', str(tmp_path / fmt)])) <= 1e-4
    timm_folder, hf_folder = tmp_path / 'timm', tmp_path / 'hf'
    by_name = timm.create_model(TIMM_NAMES['swin'], pretrained=True, img_size=32, embed_dim=16, depths=(1, 1),
                                num_heads=(1, 2), window_size=4, num_classes=3,
                                pretrained_cfg_overlay=dict(file=str(timm_folder / 'model.safetensors'),
                                                            num_classes=3)).eval()
    hf = transformers.AutoModelForImageClassification.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        expected = model(images())
        assert (by_name(images()) - expected).abs().max() <= TOL
        assert (hf(pixel_values=images()).logits - expected).abs().max() <= TOL
    assert [hf.config.id2label[i] for i in range(3)] == NAMES  # the class folders of the run's data
    for folder in (timm_folder, hf_folder):  # and back: every tensor equal
        snap = read_snapshot(folder)
        assert snap.class_names == NAMES and snap.state.keys() == {
            k for k in model.state_dict() if 'relative_position_index' not in k and 'attn_mask' not in k}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.state.items())
    # a snapshot folder in: transformers -> timm keeps the class names, no --cfg needed
    assert export(parse_args(['--weights', str(hf_folder), '--format', 'timm', '--output',
                              str(tmp_path / 'again')])) <= 1e-4
    assert read_snapshot(tmp_path / 'again').class_names == NAMES
    assert 'warning' not in capsys.readouterr().err


def test_export_without_class_names_warns_and_names_them_generically(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    torch.save({'model': build_model(cfg).state_dict(), 'config': cfg.dump()}, tmp_path / 'c.pth')
    assert export(parse_args(['--weights', str(tmp_path / 'c.pth'), '--format', 'hf', '--output',
                              str(tmp_path / 'hf')])) <= 1e-4
    assert 'warning: no class names for the 3 classes' in capsys.readouterr().err
    assert read_snapshot(tmp_path / 'hf').class_names is None  # LABEL_0.. are transformers' placeholders
    assert export_run(['--weights', str(tmp_path / 'c.pth'), '--format', 'timm', '--output',
                       str(tmp_path / 'c.pth')]) == 2  # a folder export never replaces a file
    assert 'is a file: timm and hf exports are folders' in capsys.readouterr().err


def test_a_grayscale_export_carries_its_statistics_and_predicts_as_the_checkpoint_does(tmp_path, capsys):
    """A 1-channel 64 px model with its own DATA.MEAN / DATA.STD and TEST.CROP_PCT: the timm folder's pretrained_cfg
    holds them, and predict.py on the folder and on the checkpoint prints what resizing the short side to 64 / 0.8,
    a centre crop and those statistics give (a non-square 16-bit grayscale scan)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    cfg = tiny_config(tmp_path, 'DATA.IMG_SIZE', '64', 'MODEL.SWIN.IN_CHANS', '1', 'DATA.MEAN', '[0.3]',
                      'DATA.STD', '[0.2]', 'TEST.CROP_PCT', '0.8')
    model = randomize_(build_model(cfg), seed=4).eval()
    torch.save({'model': model.state_dict(), 'config': cfg.dump()}, tmp_path / 'g.pth')
    assert export(parse_args(['--weights', str(tmp_path / 'g.pth'), '--format', 'timm', '--output',
                              str(tmp_path / 'timm')])) <= 1e-4
    capsys.readouterr()
    pretrained_cfg = json.loads((tmp_path / 'timm' / 'config.json').read_text())['pretrained_cfg']
    assert (pretrained_cfg['input_size'], pretrained_cfg['mean'], pretrained_cfg['std'],
            pretrained_cfg['crop_pct']) == ([1, 64, 64], [0.3], [0.2], 0.8)
    pixels = np.random.default_rng(5).integers(0, 65535, (75, 90), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / 'scan.png')
    x = torch.from_numpy(pixels.astype(np.float32) / 65535)[None]
    x = TF.center_crop(TF.resize(x, 80, InterpolationMode.BICUBIC, antialias=True), 64)
    with torch.no_grad():
        probs = model(((x - 0.3) / 0.2)[None])[0].softmax(-1)
    best = probs.topk(3)
    for weights in (tmp_path / 'g.pth', tmp_path / 'timm'):
        assert predict.run([str(tmp_path / 'scan.png'), '--weights', str(weights), '--device', 'cpu']) == 0
        printed = re.findall(r'^\s+([\d.]+)%  class (\d)$', capsys.readouterr().out, flags=re.M)
        assert [int(i) for _, i in printed] == best.indices.tolist()
        assert [float(p) for p, _ in printed] == pytest.approx([100 * p for p in best.values.tolist()], abs=0.006)


def test_a_multilabel_export_says_so_and_predicts_by_sigmoid_as_its_checkpoint_does(tmp_path, capsys):
    """A multi-label checkpoint (its classes file in DATA.CLASSES_FILE): the timm and transformers folders carry the
    class names and problem_type multi_label_classification (transformers reads it), and predict.py on each prints
    the checkpoint's lines: every class at or above the threshold, by its own sigmoid."""
    (tmp_path / 'classes.txt').write_text('sky\nsea\nboat\n')
    cfg = tiny_config(tmp_path, 'DATA.LABEL_FILE', 'labels.csv', 'DATA.CLASSES_FILE', str(tmp_path / 'classes.txt'))
    torch.save({'model': randomize_(build_model(cfg), seed=6).state_dict(), 'config': cfg.dump()}, tmp_path / 'm.pth')
    photo = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    printed = {}
    for fmt in ('checkpoint', 'timm', 'hf'):
        weights = tmp_path / ('m.pth' if fmt == 'checkpoint' else fmt)
        if fmt != 'checkpoint':
            assert export(parse_args(['--weights', str(tmp_path / 'm.pth'), '--format', fmt, '--output',
                                      str(weights)])) <= 1e-4
            snap = read_snapshot(weights)
            assert snap.multilabel and snap.class_names == ['sky', 'sea', 'boat']
        capsys.readouterr()
        assert predict.run([str(photo), '--weights', str(weights), '--device', 'cpu', '--threshold', '0.01']) == 0
        printed[fmt] = re.findall(r'^\s+([\d.]+)%  (\w+)$', capsys.readouterr().out, flags=re.M)
    assert transformers.AutoConfig.from_pretrained(tmp_path / 'hf').problem_type == 'multi_label_classification'
    probs = [float(p) for p, _ in printed['checkpoint']]
    assert len(probs) == 3 and sum(probs) != pytest.approx(100, abs=1)  # sigmoids, not a softmax
    assert printed['timm'] == printed['hf'] == printed['checkpoint']
