"""Swin as a backbone: any input size (padding as the official detection backbone), multi-scale features,
per-output norms, frozen stages, and classification checkpoints loading into backbones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import SwinMLP, SwinTransformer, SwinTransformerV2, create_model
from models.swin_transformer_v2 import PatchMerging as PatchMergingV2

FAMILIES = [SwinTransformer, SwinTransformerV2, SwinMLP]
ODD_SIZES = [(97, 161), (230, 310), (31, 9)]


def _tiny(cls, **kwargs):
    args = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                num_classes=5, drop_path_rate=0.0)
    return cls(**{**args, **kwargs})


# ------------------------------------------------------------------ an independent statement of the padding rules
def _windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(win, ws, b, h, w):
    c = win.shape[-1]
    return win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _shift_mask(hp, wp, ws, s):
    """The official detection backbone's mask: regions labelled on the padded map, -100 across regions."""
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = _windows(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _attention_mix(blk, x, h, w):
    """(B, H, W, C) -> the window attention of a zero-padded, cyclically shifted map, cropped back."""
    b, _, _, c = x.shape
    ws, s = blk.window_size, blk.shift_size
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
    y = blk.attn(_windows(x, ws), _shift_mask(hp, wp, ws, s) if s else None)
    y = _unwindows(y, ws, b, hp, wp)
    if s:
        y = torch.roll(y, (s, s), (1, 2))
    return y[:, :h, :w, :]


def _spatial_mix(blk, x, h, w):
    """Swin-MLP: pad right/bottom to window multiples, then the shift's (ws - s, s) zero padding on each side."""
    b, _, _, c = x.shape
    ws, s, nh = blk.window_size, blk.shift_size, blk.num_heads
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if s:
        x = F.pad(x, (0, 0, ws - s, s, ws - s, s))
    hp, wp = x.shape[1], x.shape[2]
    win = _windows(x, ws).view(-1, ws * ws, nh, c // nh).transpose(1, 2).reshape(-1, nh * ws * ws, c // nh)
    win = blk.spatial_mlp(win).view(-1, nh, ws * ws, c // nh).transpose(1, 2).reshape(-1, ws * ws, c)
    y = _unwindows(win, ws, b, hp, wp)
    top = ws - s if s else 0
    return y[:, top:top + h, top:top + w, :]


def _block(model, blk, x, h, w):
    b, _, c = x.shape
    if isinstance(model, SwinTransformerV2):  # res-post-norm: attention on x, norm after
        x = x + blk.norm1(_attention_mix(blk, x.view(b, h, w, c), h, w).reshape(b, h * w, c))
        return x + blk.norm2(blk.mlp(x))
    mix = _spatial_mix if isinstance(model, SwinMLP) else _attention_mix
    x = x + mix(blk, blk.norm1(x).view(b, h, w, c), h, w).reshape(b, h * w, c)
    return x + blk.mlp(blk.norm2(x))


def _merge(down, x, h, w):
    b, _, c = x.shape
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    if isinstance(down, PatchMergingV2):
        return down.norm(down.reduction(x)), (h + 1) // 2, (w + 1) // 2
    return down.reduction(down.norm(x)), (h + 1) // 2, (w + 1) // 2


def _reference_stages(model, img):
    """Stage outputs (before merging) as NCHW, and the logits, by the rules written out above."""
    p = model.patch_embed.patch_size[0]
    h, w = img.shape[-2:]
    x = model.patch_embed.proj(F.pad(img, (0, (p - w % p) % p, 0, (p - h % p) % p)))
    b, c, h, w = x.shape
    x = model.patch_embed.norm(x.flatten(2).transpose(1, 2))
    outs = []
    for layer in model.layers:
        for blk in layer.blocks:
            x = _block(model, blk, x, h, w)
        outs.append(x.view(b, h, w, -1).permute(0, 3, 1, 2))
        if layer.downsample is not None:
            x, h, w = _merge(layer.downsample, x, h, w)
    return outs, model.head(model.norm(x).mean(1))


# ------------------------------------------------------------------ any input size
@pytest.mark.parametrize('cls', FAMILIES)
def test_dynamic_model_equals_the_fixed_one_bit_for_bit_at_the_built_size(cls):
    torch.manual_seed(0)
    fixed = _tiny(cls)
    dynamic = _tiny(cls, dynamic_img_size=True)
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_f, out_d = fixed(x), dynamic(x)
    assert torch.equal(out_f, out_d)
    grads_f = torch.autograd.grad(out_f.square().sum(), list(fixed.parameters()))
    grads_d = torch.autograd.grad(out_d.square().sum(), list(dynamic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads_f, grads_d))


@pytest.mark.parametrize('size', ODD_SIZES)
@pytest.mark.parametrize('cls', FAMILIES)
def test_sizes_that_tile_nothing_run_forward_and_backward(cls, size):
    model = _tiny(cls, dynamic_img_size=True)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('size', [(97, 161), (230, 310), (64, 64), (40, 72)])
@pytest.mark.parametrize('cls', FAMILIES)
def test_outputs_follow_the_detection_backbones_padding_rules(cls, size):
    torch.manual_seed(0)
    model = _tiny(cls, dynamic_img_size=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised V2 post-norms and zero biases
            p.add_(torch.randn_like(p) * 0.05)
        img = torch.randn(2, 3, *size)
        stages, logits = _reference_stages(model, img)
        ours = model.forward_intermediates(img)
        assert [o.shape for o in ours] == [s.shape for s in stages]
        for o, s in zip(ours, stages):
            torch.testing.assert_close(o, s, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(img), logits, rtol=1e-4, atol=1e-4)


def test_a_window_larger_than_the_map_pads_it_and_the_shift_mask_follows_the_size():
    model = _tiny(SwinTransformer, img_size=128, dynamic_img_size=True).eval()  # stage 1: 32x32, window 4, shifted
    blk = model.layers[0].blocks[1]
    assert blk.shift_size == 2
    small = blk.shift_mask((5, 7))  # padded to 8x8: 4 windows
    assert small.shape == (4, 16, 16)
    assert blk.shift_mask((5, 7)) is small  # built once per size
    assert blk.shift_mask((32, 32)) is blk.attn_mask
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 28)).shape == (1, 5)


def test_a_fixed_size_model_still_names_the_size_it_takes():
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        _tiny(SwinTransformer)(torch.randn(1, 3, 64, 96))


def test_absolute_position_embedding_is_resized_for_other_sizes():
    model = _tiny(SwinTransformer, ape=True, dynamic_img_size=True).eval()
    assert model.position_embedding((16, 16)) is model.absolute_pos_embed
    assert model.position_embedding((10, 21)).shape == (1, 210, 16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 40, 84))).all()


# ------------------------------------------------------------------ multi-scale features
@pytest.mark.parametrize('cls', FAMILIES)
def test_features_only_gives_nchw_maps_at_strides_4_to_32(cls):
    model = _tiny(cls, features_only=True)
    maps = model(torch.randn(2, 3, 97, 161))
    assert [m.shape for m in maps] == [(2, 16, 25, 41), (2, 32, 13, 21), (2, 64, 7, 11), (2, 128, 4, 6)]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == ['layers.0', 'layers.1', 'layers.2', 'layers.3']
    assert all(m.is_contiguous() for m in maps)


def test_features_are_the_stage_outputs_before_merging():
    torch.manual_seed(0)
    full = _tiny(SwinTransformer, dynamic_img_size=True).eval()
    feats = _tiny(SwinTransformer, features_only=True, out_indices=(1, -1)).eval()
    feats.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = feats(x)
        tokens, size = full.embed(x)
        tokens = full.layers[0](tokens, size)
        after_stage1 = full.layers[1].forward_blocks(tokens, (8, 8))
        last = full.forward_features(x)  # normalised by the classifier's norm
    assert feats.out_indices == (1, 3)
    assert torch.equal(maps[0], after_stage1.view(1, 8, 8, 32).permute(0, 3, 1, 2))
    assert torch.allclose(full.norm(maps[1].flatten(2).transpose(1, 2)), last, atol=1e-6)


def test_features_only_leaves_out_the_classifier_and_the_stages_after_the_last_output():
    model = _tiny(SwinTransformer, features_only=True, out_indices=(0, 1))
    keys = set(model.state_dict())
    assert not any(k.startswith(('head.', 'norm.', 'layers.2.', 'layers.3.', 'layers.1.downsample.')) for k in keys)
    assert len(model.layers) == 2 and model.feature_info.channels() == [16, 32]
    model(torch.randn(1, 3, 50, 50))[1].sum().backward()  # every parameter kept is used (DDP needs no unused ones)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('cls', FAMILIES)
def test_classification_checkpoints_load_into_a_backbone_with_output_norms(cls):
    torch.manual_seed(0)
    classifier = _tiny(cls)
    backbone = _tiny(cls, features_only=True, out_indices=(0, 2), out_norm=True)
    assert {'norm0.weight', 'norm0.bias', 'norm2.weight', 'norm2.bias'} <= set(backbone.state_dict())
    backbone.load_state_dict(classifier.state_dict())  # strict: classifier keys ignored, new norms kept
    assert torch.equal(backbone.patch_embed.proj.weight, classifier.patch_embed.proj.weight)
    assert torch.equal(backbone.norm0.weight, torch.ones(16)) and torch.equal(backbone.norm2.bias, torch.zeros(64))
    with torch.no_grad():
        raw = _tiny(cls, features_only=True, out_indices=(0, 2))
        raw.load_state_dict(classifier.state_dict())
        x = torch.randn(1, 3, 64, 64)
        expect = F.layer_norm(raw(x)[1].permute(0, 2, 3, 1), (64,)).permute(0, 3, 1, 2)
        assert torch.allclose(backbone(x)[1], expect, atol=1e-5)
    # a backbone checkpoint (with its trained norms) round-trips
    with torch.no_grad():
        backbone.norm2.weight.fill_(3.0)
    again = _tiny(cls, features_only=True, out_indices=(0, 2), out_norm=True)
    again.load_state_dict(backbone.state_dict())
    assert torch.equal(again.norm2.weight, torch.full((64,), 3.0))


def test_a_wrong_checkpoint_still_fails_the_strict_load():
    backbone = _tiny(SwinTransformer, features_only=True)
    state = _tiny(SwinTransformer).state_dict()
    del state['layers.0.blocks.0.attn.qkv.weight']
    with pytest.raises(RuntimeError, match='layers.0.blocks.0.attn.qkv.weight'):
        backbone.load_state_dict(state)


def test_registered_variants_build_as_backbones():
    model = create_model('swin_tiny_patch4_window7_224', features_only=True, out_indices=(1, 2, 3), out_norm=True,
                         embed_dim=16, num_heads=(1, 2, 4, 8))
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 120, 90))
    assert [m.shape[1:] for m in maps] == [(32, 15, 12), (64, 8, 6), (128, 4, 3)]
    assert model.feature_info.reduction() == [8, 16, 32]


@pytest.mark.parametrize('bad', [dict(out_indices=(4,)), dict(out_indices=()), dict(frozen_stages=5)])
def test_bad_backbone_arguments_are_named(bad):
    with pytest.raises(ValueError, match='out_indices|frozen_stages'):
        _tiny(SwinTransformer, features_only=True, **bad)


# ------------------------------------------------------------------ frozen stages
def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    model = _tiny(SwinTransformer, features_only=True, out_norm=True, frozen_stages=2, drop_path_rate=0.2)
    model.train()
    frozen = [model.patch_embed, model.layers[0], model.layers[1], model.norm0, model.norm1]
    assert all(not m.training for f in frozen for m in f.modules())
    assert model.layers[2].training and model.norm2.training
    sum(m.sum() for m in model(torch.randn(2, 3, 64, 64))).backward()
    for name, p in model.named_parameters():
        frozen_name = name.startswith(('patch_embed.', 'layers.0.', 'layers.1.', 'norm0.', 'norm1.'))
        assert (p.grad is None) == frozen_name, name
        assert p.requires_grad != frozen_name, name


def test_frozen_stage_zero_freezes_the_patch_embedding_only():
    model = _tiny(SwinTransformer, frozen_stages=0, ape=True)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not model.absolute_pos_embed.requires_grad
    assert all(p.requires_grad for p in model.layers.parameters())
