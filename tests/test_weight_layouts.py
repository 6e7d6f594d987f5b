"""utils.weight_layouts: timm, transformers, mmdet/detection and SimMIM weights read into our models (same logits),
written back as folders timm and transformers load (same logits), round trips exact, mix-ups named in one line.

Every model is tiny (64 px, 3 stages of 2 blocks, window 4: shifted windows and two patch mergings) with random
weights; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip('timm')
from timm.models._hub import has_hf_hub, save_config_for_hf, save_for_hf  # noqa: E402
transformers = pytest.importorskip('transformers')

from config import get_default_config  # noqa: E402
from models import SwinMLP, SwinTransformer, SwinTransformerV2  # noqa: E402
from tools.model_parity import randomize_  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.weight_layouts import (OFFICIAL_ZOO, Layout, check_fits, detect_layout, from_official,  # noqa: E402
                                  hf_config, infer_model_args, model_opts, parse_timm_name, read_snapshot,
                                  timm_name, to_official, write_hf_folder, write_timm_folder, zoo_entry, zoo_line)

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TOL = 1e-5
IMG, CLASSES = 64, 5
ARGS = dict(img_size=IMG, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4,
            num_classes=CLASSES)
V2_EXTRA = dict(pretrained_window_sizes=[0, 0, 0])
TIMM_NAMES = {'swin': 'swin_tiny_patch4_window7_224', 'swinv2': 'swinv2_tiny_window8_256'}
OURS = {'swin': SwinTransformer, 'swinv2': SwinTransformerV2, 'swin_mlp': SwinMLP}
NAMES = ['cat', 'dog', 'fox', 'owl', 'yak']
# transformers 5 renames V1's linears in memory (q_proj, o_proj, mlp.fc1) and writes the 4.x names to files
HF_V1_IN_MEMORY = 'hf5' if int(transformers.__version__.split('.')[0]) >= 5 else 'hf'


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def ours(model_type: str, seed: int = 0, **kw) -> torch.nn.Module:
    extra = V2_EXTRA if model_type == 'swinv2' else {}
    return randomize_(OURS[model_type](**{**ARGS, **extra, **kw}), seed=seed).eval()


def build(model_type: str, args: dict, state: dict, **kw) -> torch.nn.Module:
    """Our model from read arguments, loaded strictly (derived buffers aside) with the converted weights."""
    model = OURS[model_type](**{**args, **kw}).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all('relative_position_index' in k or 'coords' in k or 'attn_mask' in k
                                  for k in missing), (missing, unexpected)
    return model


def timm_model(model_type: str, **kw) -> torch.nn.Module:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in {**ARGS, **kw}.items()}
    return randomize_(timm.create_model(TIMM_NAMES[model_type], pretrained=False, **args), seed=1).eval()


def hf_model(model_type: str, kind: str = 'classifier', **kw) -> torch.nn.Module:
    conf_cls = transformers.SwinConfig if model_type == 'swin' else transformers.Swinv2Config
    config = conf_cls(image_size=IMG, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4],
                      window_size=4, num_labels=CLASSES, id2label=dict(enumerate(NAMES)),
                      label2id={n: i for i, n in enumerate(NAMES)}, **kw)
    prefix = 'Swin' if model_type == 'swin' else 'Swinv2'
    cls = {'classifier': f'{prefix}ForImageClassification', 'model': f'{prefix}Model',
           'backbone': f'{prefix}Backbone'}[kind]
    return randomize_(getattr(transformers, cls)(config), seed=2).eval()


def timm_reads_local_dirs() -> bool:
    try:
        from timm.models._factory import parse_model_name
        return parse_model_name('local-dir:/folder')[0] == 'local-dir'
    except Exception:  # older timm: an assertion on the source, or no such function
        return False


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- recognition

def test_detect_layout_names_layout_and_family():
    v1, v2, mlp = (ours(t).state_dict() for t in ('swin', 'swinv2', 'swin_mlp'))
    mm = {**from_official(v1, 'mmdet'), 'neck.fpn.weight': torch.zeros(1), 'neck.lateral.weight': torch.zeros(1)}
    detection = {**from_official(v1, 'detection'), 'roi_head.fc.weight': torch.zeros(1)}
    cases = [
        ('official', 'swin', v1), ('official', 'swinv2', v2), ('official', 'swin_mlp', mlp),
        ('official', 'swin', {'module.' + k: v for k, v in v1.items()}),
        ('timm', 'swin', timm_model('swin').state_dict()), ('timm', 'swinv2', timm_model('swinv2').state_dict()),
        (HF_V1_IN_MEMORY, 'swin', hf_model('swin').state_dict()),
        ('hf', 'swinv2', hf_model('swinv2').state_dict()),
        ('hf', 'swin', from_official(v1, 'hf', 'swin')), ('mmdet', 'swin', mm), ('detection', 'swin', detection),
        ('simmim', 'swinv2', {**from_official(v2, 'simmim'), 'encoder.mask_token': torch.zeros(1, 1, 16),
                              'decoder.0.weight': torch.zeros(1)}),
    ]
    for name, family, state in cases:
        layout = detect_layout(state)
        assert (layout.name, layout.family) == (name, family), (name, family, layout)
    assert detect_layout(mm).dropped == ('neck.* (2 tensors)',)
    assert to_official(cases[-1][2])[0].keys() == v2.keys()  # SimMIM: decoder and mask token left out
    assert detect_layout(detection).describe() == ("official detection/segmentation layout (Swin V1), prefix "
                                                   "'backbone.', left out: roi_head.fc.weight")


def save_timm_folder(model: torch.nn.Module, folder, class_names: list) -> None:
    """A timm snapshot folder written by timm: ``save_for_hf`` (model.safetensors and config.json). Older timm
    (1.0.14) refuses to run it when it cannot import the installed huggingface_hub, which writing a local folder
    does not use: there its own two steps (the weights file, ``save_config_for_hf``) write the same folder. A timm
    that records no model_args describes the named architecture's defaults, not this tiny model: the test skips."""
    folder = Path(folder)
    if has_hf_hub():
        save_for_hf(model, folder, safe_serialization=True, model_config=dict(label_names=class_names))
    else:
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(folder / 'model.safetensors'))
        save_config_for_hf(model, folder / 'config.json', model_config=dict(label_names=class_names))
    if 'model_args' not in json.loads((folder / 'config.json').read_text()):
        pytest.skip(f'timm {timm.__version__} records no model_args: its folder describes the named defaults')


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
@pytest.mark.parametrize('fmt', ['pth', 'safetensors', 'folder'])
def test_timm_weights_give_timm_logits(tmp_path, model_type, fmt):
    twin = timm_model(model_type)
    path = tmp_path / f'weights.{fmt}'
    if fmt == 'pth':
        torch.save({'state_dict': twin.state_dict()}, path)
    elif fmt == 'safetensors':
        from safetensors.torch import save_file
        save_file(twin.state_dict(), path)
    else:
        save_timm_folder(twin, path, NAMES)
    snap = read_snapshot(path)
    assert (snap.layout.name, snap.model_type) == ('timm', model_type)
    extra = {} if fmt == 'folder' else dict(img_size=IMG, window_size=4, **(V2_EXTRA if model_type == 'swinv2' else {}))
    model = build(model_type, snap.model_args, snap.state, **extra)
    with torch.no_grad():
        assert max_diff(model(images()), twin(images())) <= TOL
    if fmt == 'folder':
        assert snap.class_names == NAMES and snap.config_kind == 'timm'
        assert snap.describe().endswith(f"timm layout ({'Swin V1' if model_type == 'swin' else 'Swin V2'}), converted "
                                        "to the official layout; model from its timm config.json; 5 class names")
        assert snap.preprocessing['interpolation'] == 'bicubic' and snap.preprocessing['crop_pct'] == 0.9
        assert snap.model_args['img_size'] == IMG and snap.model_args['num_classes'] == CLASSES


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
@pytest.mark.parametrize('fmt', ['folder', 'bin', 'safetensors'])
def test_transformers_weights_give_transformers_logits(tmp_path, model_type, fmt):
    twin = hf_model(model_type)
    if fmt == 'folder':
        twin.save_pretrained(tmp_path)  # the names transformers writes to files
        path = tmp_path
    elif fmt == 'bin':  # in-memory names (transformers 5's q_proj/o_proj/mlp.fc1 for V1)
        path = tmp_path / 'pytorch_model.bin'
        torch.save(twin.state_dict(), path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / 'model.safetensors'
        save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, path)
    snap = read_snapshot(path)
    assert snap.layout.name in ('hf', 'hf5') and snap.model_type == model_type
    extra = {} if fmt == 'folder' else dict(img_size=IMG, window_size=4, **(V2_EXTRA if model_type == 'swinv2' else {}))
    model = build(model_type, snap.model_args, snap.state, **extra)
    with torch.no_grad():
        assert max_diff(model(images()), twin(pixel_values=images()).logits) <= TOL
    if fmt == 'folder':
        assert snap.class_names == NAMES and snap.config_kind == 'hf'
        assert snap.model_args['pretrained_window_sizes' if model_type == 'swinv2' else 'window_size'] in ([0] * 3, 4)


def test_transformers_v2_pretrained_window_sizes_are_carried(tmp_path):
    twin = hf_model('swinv2', pretrained_window_sizes=[3, 3, 2, 0])
    twin.save_pretrained(tmp_path)
    snap = read_snapshot(tmp_path)
    assert snap.model_args['pretrained_window_sizes'] == [3, 3, 2]
    model = build('swinv2', snap.model_args, snap.state)
    with torch.no_grad():
        assert max_diff(model(images()), twin(pixel_values=images()).logits) <= TOL


# -------------------------------------------------------------------------------------------------- backbones

@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_timm_weights_as_a_backbone(model_type):
    twin = timm_model(model_type)  # timm's backbone outputs: each stage's output, NCHW, no norm
    state, _ = to_official(twin.state_dict())
    extra = V2_EXTRA if model_type == 'swinv2' else {}
    backbone = build(model_type, {**ARGS, **extra}, state, features_only=True)
    with torch.no_grad():
        theirs = twin.forward_intermediates(images(), intermediates_only=True, output_fmt='NCHW')
        mine = backbone(images())
    assert len(mine) == len(theirs) == 3 and all(max_diff(a, b) <= TOL for a, b in zip(mine, theirs))


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_transformers_backbone_and_headless_model(tmp_path, model_type):
    # Swin[v2]Backbone: each stage's output before its merging; V1 through per-output norms (hidden_states_norms.
    # stageN -> our normN-1). V1's backbone always shifts windows, so it is fed 128 px (every stage larger than the
    # window, where that is the rule of every Swin); V2's decides from the size it was built for (64 px).
    twin = hf_model(model_type, 'backbone', out_features=['stage1', 'stage2', 'stage3'])
    twin.save_pretrained(tmp_path / 'backbone')
    snap = read_snapshot(tmp_path / 'backbone')
    assert snap.model_args['num_classes'] == 0 and snap.class_names is None
    backbone = build(model_type, snap.model_args, snap.state, features_only=True, out_norm=model_type == 'swin')
    size = 2 * IMG if model_type == 'swin' else IMG
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, mine = twin(pixel_values=x).feature_maps, backbone(x)
    assert len(mine) == 3 and all(max_diff(a, b) <= TOL for a, b in zip(mine, theirs))
    # Swin[v2]Model: no classifier; its pooled output is our headless model's output
    twin = hf_model(model_type, 'model')
    twin.save_pretrained(tmp_path / 'model')
    snap = read_snapshot(tmp_path / 'model')
    model = build(model_type, snap.model_args, snap.state)
    with torch.no_grad():
        assert max_diff(model(images()), twin(pixel_values=images()).pooler_output) <= TOL


def test_mmdet_patch_merging_order_matches_unfold():
    """mm* merges 2x2 patches with nn.Unfold (channel-major); converted weights must compute the same."""
    model = ours('swin')
    mm = from_official(model.state_dict(), 'mmdet')
    reduction = mm['backbone.stages.0.downsample.reduction.weight']
    norm_w, norm_b = mm['backbone.stages.0.downsample.norm.weight'], mm['backbone.stages.0.downsample.norm.bias']
    x = torch.randn(2, 16 * 16, 16)
    grid = x.transpose(1, 2).reshape(2, 16, 16, 16)
    unfolded = torch.nn.functional.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)  # (B, L/4, 4C)
    theirs = torch.nn.functional.layer_norm(unfolded, (64,), norm_w, norm_b) @ reduction.T
    with torch.no_grad():
        mine = model.layers[0].downsample(x, (16, 16)) if _takes_size(model) else model.layers[0].downsample(x)
    assert max_diff(mine, theirs) <= TOL
    state, layout = to_official({**mm, 'backbone.stages.0.blocks.0.attn.w_msa.relative_position_index': torch.zeros(1)})
    assert layout.name == 'mmdet' and 'layers.0.downsample.reduction.weight' in state


def _takes_size(model: torch.nn.Module) -> bool:
    import inspect
    return 'size' in inspect.signature(model.layers[0].downsample.forward).parameters


# ------------------------------------------------------------------------------------------------- exporting

@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_timm_export_loads_in_timm(tmp_path, model_type):
    model = ours(model_type)
    args = {**ARGS, **(V2_EXTRA if model_type == 'swinv2' else {})}
    pre = dict(crop_pct=0.875, interpolation='bicubic')
    write_timm_folder(tmp_path, model.state_dict(), model_type, args, NAMES, pre)
    if not timm_reads_local_dirs():
        pytest.skip(f"timm {timm.__version__} has no 'local-dir:' models")
    by_folder = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    # timm drops a classifier whose class count differs from the named cfg's (1000): the overlay says 5
    by_file = timm.create_model(TIMM_NAMES[model_type], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'),
                                                            num_classes=CLASSES),
                                **{k: tuple(v) if isinstance(v, list) else v for k, v in ARGS.items()}).eval()
    with torch.no_grad():
        expected = model(images())
        assert max_diff(by_folder(images()), expected) <= TOL
        assert max_diff(by_file(images()), expected) <= TOL
    assert by_folder.pretrained_cfg['label_names'] == NAMES and by_folder.pretrained_cfg['crop_pct'] == 0.875
    snap = read_snapshot(tmp_path)  # and back: every tensor equal
    assert snap.class_names == NAMES and snap.state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.state.items())


@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_transformers_export_loads_in_transformers(tmp_path, model_type):
    model = ours(model_type)
    args = {**ARGS, **(V2_EXTRA if model_type == 'swinv2' else {})}
    write_hf_folder(tmp_path, model.state_dict(), model_type, args, NAMES)
    twin = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(twin(pixel_values=images()).logits, model(images())) <= TOL
    assert [twin.config.id2label[i] for i in range(CLASSES)] == NAMES
    processor = json.loads((tmp_path / 'preprocessor_config.json').read_text())
    assert processor['size'] == {'height': IMG, 'width': IMG} and processor['resample'] == 3
    snap = read_snapshot(tmp_path)
    assert snap.class_names == NAMES and snap.state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.state.items())


ROUND_TRIPS = [(layout, t) for layout in ('timm', 'hf', 'detection', 'simmim', 'official') for t in ('swin', 'swinv2')]


@pytest.mark.parametrize('layout,model_type', ROUND_TRIPS + [('mmdet', 'swin')])  # mm* have no Swin V2
def test_round_trips_leave_every_tensor_equal(layout, model_type):
    state = ours(model_type).state_dict()
    back, found = to_official(from_official(state, layout, model_type))
    assert found.name == layout and found.family == model_type
    backbone_only = layout in ('mmdet', 'detection')  # their files hold no classifier
    kept = {k: v for k, v in state.items() if not (backbone_only and k.startswith(('head.', 'norm.')))}
    assert back.keys() == kept.keys() and all(torch.equal(back[k], v) for k, v in kept.items())


def test_foreign_round_trips_leave_every_tensor_equal():
    for model_type in ('swin', 'swinv2'):
        theirs = timm_model(model_type).state_dict()
        back = from_official(to_official(theirs)[0], 'timm')
        assert back.keys() == theirs.keys() and all(torch.equal(back[k], v) for k, v in theirs.items())
        theirs = from_official(ours(model_type).state_dict(), 'hf', model_type)  # transformers' file names
        back = from_official(to_official(theirs)[0], 'hf', model_type)
        assert back.keys() == theirs.keys() and all(torch.equal(back[k], v) for k, v in theirs.items())


# --------------------------------------------------------------------------------------------------- mix-ups

def test_v2_weights_into_a_v1_model_is_one_line():
    state, layout = to_official(timm_model('swinv2').state_dict())
    with pytest.raises(UserError) as e:
        check_fits(state, ours('swin').state_dict(), layout, source='w.safetensors')
    text = str(e.value)
    assert '\n' not in text and 'w.safetensors' in text and 'timm layout (Swin V2)' in text
    assert 'the weights are Swin V2, the model is Swin V1' in text and 'unexpected layers.' in text


def test_22k_head_into_a_1k_model_is_one_line():
    state = ours('swin', num_classes=21841).state_dict()
    with pytest.raises(UserError, match=r'shape head\.weight .*21841-class head for a 5-class model'):
        check_fits(state, ours('swin').state_dict(), Layout('official', 'swin'))


def test_unknown_layouts_name_first_keys_and_closest_guess():
    with pytest.raises(UserError) as e:
        to_official({'conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)}, source='resnet.pth')
    assert 'resnet.pth' in str(e.value) and 'conv1.weight, fc.weight' in str(e.value) and '\n' not in str(e.value)
    cr = timm.create_model('swinv2_cr_tiny_224', pretrained=False, img_size=64, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2), window_size=4, num_classes=5)
    with pytest.raises(UserError, match='swinv2_cr'):
        to_official(cr.state_dict())
    with pytest.raises(UserError, match='closest: mmdet'):
        to_official({'backbone.stages.0.blocks.0.foo.weight': torch.zeros(1), 'w_msa.x': torch.zeros(1)})


def test_config_that_contradicts_the_weights_is_one_line(tmp_path):
    hf_model('swin').save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    hf_model('swinv2').save_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps(config))  # V1 config, V2 weights
    with pytest.raises(UserError, match='config.json describes Swin V1, the weights are Swin V2'):
        read_snapshot(tmp_path)


# ------------------------------------------------------------------------------------- names, configs, the zoo

def test_timm_names_parse_to_model_arguments():
    assert parse_timm_name('swin_base_patch4_window12_384.ms_in22k_ft_in1k') == ('swin', dict(
        embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], patch_size=4, window_size=12, img_size=384))
    kind, args = parse_timm_name('swinv2_large_window12to24_192to384')
    assert kind == 'swinv2' and args['window_size'] == 24 and args['img_size'] == 384
    assert args['pretrained_window_sizes'] == [12, 12, 12, 6]  # what timm and the official config use
    assert parse_timm_name('swinv2_tiny_window8_256')[1]['pretrained_window_sizes'] == [0, 0, 0, 0]
    with pytest.raises(UserError, match='swin_s3_tiny_224'):
        parse_timm_name('swin_s3_tiny_224')
    # and back: the registered timm name of full-size arguments (exports of released models load by name)
    assert timm_name('swin', parse_timm_name('swin_base_patch4_window12_384')[1]) == 'swin_base_patch4_window12_384'
    assert timm_name('swinv2', parse_timm_name('swinv2_base_window12to16_192to256')[1]) == \
        'swinv2_base_window12to16_192to256'
    assert timm_name('swin', ARGS) == 'swin_tiny_patch4_window7_224'  # no registered twin: model_args say the rest


def test_model_opts_build_the_same_model():
    state = ours('swinv2').state_dict()
    args = {**infer_model_args(state, 'swinv2'), 'img_size': IMG, 'window_size': 4, **V2_EXTRA}
    cfg = get_default_config()
    cfg.merge_from_list(model_opts('swinv2', args))
    assert cfg.MODEL.TYPE == 'swinv2' and cfg.DATA.IMG_SIZE == IMG and cfg.MODEL.NUM_CLASSES == CLASSES
    assert list(cfg.MODEL.SWINV2.DEPTHS) == ARGS['depths'] and cfg.MODEL.SWINV2.EMBED_DIM == 16
    assert list(cfg.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES) == [0, 0, 0]


def test_infer_model_args_from_official_buffers():
    model = ours('swin', ape=True)
    args = infer_model_args(model.state_dict(), 'swin')
    assert {k: args[k] for k in ('embed_dim', 'depths', 'num_heads', 'window_size', 'img_size', 'ape')} == dict(
        embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4, img_size=IMG, ape=True)
    cfg = hf_config('swin', {**ARGS, 'ape': True}, NAMES)  # transformers has absolute embeddings too
    assert cfg['use_absolute_embeddings'] and cfg['id2label']['4'] == 'yak'
    with pytest.raises(UserError, match='APE True cannot export to timm'):
        write_timm_folder('unused', model.state_dict(), 'swin', {**ARGS, 'ape': True})


def test_official_zoo_recognises_released_checkpoints_by_name_and_keys():
    assert (OFFICIAL_ZOO['swin_tiny_patch4_window7_224'].acc1, OFFICIAL_ZOO['swin_tiny_patch4_window7_224'].acc5) \
        == (81.2, 95.5)
    assert len(OFFICIAL_ZOO) == 25 and all(e.config == '' or os.path.isfile(e.config) for e in OFFICIAL_ZOO.values())
    with torch.device('meta'):  # full-size shapes without the memory
        tiny = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)).state_dict()
        v2 = SwinTransformerV2(img_size=256, window_size=8).state_dict()
    entry = zoo_entry('/data/swin_tiny_patch4_window7_224.pth', {'model': tiny}['model'])
    assert entry is OFFICIAL_ZOO['swin_tiny_patch4_window7_224']
    assert zoo_entry('swin_tiny_patch4_window7_224.pth', v2) is None  # V2 keys under a V1 release's name
    assert zoo_entry('swinv2_tiny_patch4_window8_256.pth', v2).acc1 == 81.8
    assert zoo_entry('my_run.pth', tiny) is None
    assert zoo_line(entry, 81.176, 95.518) == ('official model zoo (Swin-T 1K): Acc@1 81.2 Acc@5 95.5; '
                                               'measured - reported: Acc@1 -0.02 Acc@5 +0.02')
