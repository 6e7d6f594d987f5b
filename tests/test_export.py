"""tools.export: ONNX (through onnxruntime), TorchScript and safetensors exports that compute the eager model's logits."""
from __future__ import annotations

import csv

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from cli import run_main, write_tiny_config
from config import get_default_config
from models import build_model
from tools.export import parse_args, export, run
from tools.model_parity import randomize_

pytestmark = pytest.mark.usefixtures('one_torch_thread')

FAMILIES = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}


def tiny_config(family: str, img_size=32, classes: int = 5):
    cfg = get_default_config()
    cfg.MODEL.TYPE, cfg.MODEL.NUM_CLASSES, cfg.DATA.IMG_SIZE = family, classes, img_size
    section = cfg.MODEL[FAMILIES[family]]
    section.EMBED_DIM, section.DEPTHS, section.NUM_HEADS, section.WINDOW_SIZE = 16, [2, 2], [1, 2], 4
    if family == 'swinv2':
        section.PRETRAINED_WINDOW_SIZES = [0, 0]
    cfg.freeze()
    return cfg


def random_checkpoint(tmp_path, family: str, **kw) -> tuple[str, torch.nn.Module]:
    """A checkpoint of random weights (every parameter visibly changes the logits) with its config."""
    cfg = tiny_config(family, **kw)
    model = randomize_(build_model(cfg.clone()), seed=3).eval()
    path = tmp_path / f'{family}.pth'
    torch.save({'model': model.state_dict(), 'config': cfg.dump()}, path)
    return str(path), model


def images(batch: int, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('family', FAMILIES)
def test_onnx_export_runs_in_onnxruntime_at_batch_1_and_3_within_tolerance(tmp_path, family):
    ckpt, model = random_checkpoint(tmp_path, family)
    out = tmp_path / 'model.onnx'
    assert run(['--weights', ckpt, '--format', 'onnx', '--output', str(out), '--dynamic-batch']) == 0
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for batch in (1, 3):
        x = images(batch, seed=10 + batch)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        assert got.shape == (batch, 5)
        assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
        assert np.abs(expected).max() > 0.1  # random weights: logits that a wrong graph could not match by chance


def test_onnx_graph_is_made_of_standard_operators(tmp_path):
    ckpt, _ = random_checkpoint(tmp_path, 'swin')
    out = tmp_path / 'model.onnx'
    assert run(['--weights', ckpt, '--format', 'onnx', '--output', str(out), '--dynamic-batch']) == 0
    graph = onnx.load(str(out)).graph
    assert {node.domain for node in graph.node} <= {'', 'ai.onnx'}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'


def test_non_square_onnx_export_takes_the_img_size_flag(tmp_path):
    ckpt, model = random_checkpoint(tmp_path, 'swin')
    out = tmp_path / 'wide.onnx'
    assert run(['--weights', ckpt, '--format', 'onnx', '--output', str(out), '--img-size', '32,64']) == 0
    x = images(1, size=(32, 64))
    got = ort.InferenceSession(str(out), providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
    wide = build_model(tiny_config('swin', img_size=[32, 64]))
    wide.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert np.abs(got - wide.eval()(x).numpy()).max() < 1e-4 * max(1.0, float(np.abs(got).max()))


@pytest.mark.parametrize('family', FAMILIES)
def test_torchscript_export_loads_and_runs_any_batch(tmp_path, family):
    ckpt, model = random_checkpoint(tmp_path, family)
    out = tmp_path / 'model.pt'
    assert run(['--weights', ckpt, '--format', 'torchscript', '--output', str(out), '--dynamic-batch']) == 0
    scripted = torch.jit.load(str(out))
    assert 'PythonOp' not in str(scripted.inlined_graph)  # no Python callback inside: loadable from C++
    with torch.no_grad():
        for batch in (2, 5):
            x = images(batch, seed=batch)
            assert torch.allclose(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_safetensors_export_holds_the_official_keys_and_the_config(tmp_path):
    ckpt, model = random_checkpoint(tmp_path, 'swin')
    out = tmp_path / 'model.safetensors'
    assert run(['--weights', ckpt, '--format', 'safetensors', '--output', str(out)]) == 0
    with safe_open(str(out), framework='pt') as f:
        keys, config = set(f.keys()), f.metadata()['config']
        assert torch.equal(f.get_tensor('layers.0.blocks.0.attn.qkv.weight'),
                           model.state_dict()['layers.0.blocks.0.attn.qkv.weight'])
    assert 'layers.0.blocks.0.attn.relative_position_bias_table' in keys and 'head.weight' in keys
    assert not any('relative_position_index' in k or 'attn_mask' in k for k in keys)
    assert 'EMBED_DIM: 16' in config


def test_a_failed_check_is_one_line_and_leaves_the_earlier_file(tmp_path, capsys):
    ckpt, _ = random_checkpoint(tmp_path, 'swin')
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'an earlier export')
    assert run(['--weights', ckpt, '--format', 'onnx', '--output', str(out), '--tolerance', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'differs from the eager model' in err and 'Traceback' not in err
    assert out.read_bytes() == b'an earlier export' and sorted(p.name for p in tmp_path.iterdir()) == [
        'model.onnx', 'swin.pth']


@pytest.mark.parametrize('argv, culprit', [(['--weights', 'missing.pth'], 'missing.pth'),
                                           (['--img-size', '32x'], '--img-size'),
                                           (['--output', '/no/such/folder/m.onnx'], '/no/such/folder')])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, argv, culprit):
    ckpt, _ = random_checkpoint(tmp_path, 'swin')
    args = {'--weights': ckpt, '--format': 'onnx', '--output': str(tmp_path / 'm.onnx')}
    args.update(dict(zip(argv[0::2], argv[1::2])))
    assert run([item for pair in args.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err


def test_safetensors_export_evaluates_like_the_pth_and_fine_tunes(tmp_path, image_folder):
    cfg = write_tiny_config(tmp_path)
    common = ['--cfg', str(cfg), '--data-path', str(image_folder)]
    trained = run_main([*common, '--output', str(tmp_path / 'out'), '--opts', 'TRAIN.EPOCHS', '1'], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    pth = tmp_path / 'out' / 'tiny_test' / 'default' / 'ckpt_epoch_0.pth'
    st = tmp_path / 'tiny.safetensors'
    assert export(parse_args(['--weights', str(pth), '--format', 'safetensors', '--output', str(st)])) == 0

    (tmp_path / 'both').mkdir()
    for path in (pth, st):
        (tmp_path / 'both' / path.name).write_bytes(path.read_bytes())
    evaluated = run_main([*common, '--output', str(tmp_path / 'eval'), '--checkpoints', str(tmp_path / 'both'),
                          '--results-file', str(tmp_path / 'both.csv')], cwd=tmp_path, script='validate.py')
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(tmp_path / 'both.csv', newline='') as f:
        rows = {r['checkpoint'].rsplit('.', 1)[-1]: (r['acc1'], r['acc5'], r['loss']) for r in csv.DictReader(f)}
    assert rows.keys() == {'pth', 'safetensors'} and rows['pth'] == rows['safetensors']
    tuned = run_main([*common, '--output', str(tmp_path / 'ft'), '--pretrained', str(st),
                      '--opts', 'TRAIN.EPOCHS', '1', 'MODEL.NUM_CLASSES', '4'], cwd=tmp_path)
    log = tuned.stdout + tuned.stderr
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert f"=> loaded successfully '{st}'" in log and 're-initialised' in log
    predicted = run_main([str(image_folder / 'val' / 'class_0'), '--weights', str(st)], cwd=tmp_path,
                         script='predict.py')
    assert predicted.returncode == 0 and predicted.stdout.count('%') == 4 * 3, predicted.stderr[-2000:]


def test_a_broken_safetensors_file_is_a_user_error_naming_it(tmp_path):
    from utils.fileio import load_file_safe
    from utils.errors import UserError
    broken = tmp_path / 'broken.safetensors'
    broken.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    with pytest.raises(UserError, match='broken.safetensors: not a readable safetensors file'):
        load_file_safe(broken)
