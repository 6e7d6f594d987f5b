"""Swin as a backbone: any input size (the official window rule decided on the map that arrives, padding as the
official detection backbone, on the reference and the CPU path), multi-scale features, per-output norms, frozen
stages, and classification checkpoints loading into backbones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import SwinMLP, SwinTransformer, SwinTransformerV2, create_model
from models.windows import derived_on
from models.swin_mlp import SwinMLPBlock
from models.swin_transformer import WindowAttention
from models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from test_models_cpu_swap import on_path

FAMILIES = [SwinTransformer, SwinTransformerV2, SwinMLP]
ODD_SIZES = [(97, 161), (230, 310), (31, 9)]


def _tiny(cls, **kwargs):
    args = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                num_classes=5, drop_path_rate=0.0)
    return cls(**{**args, **kwargs})


# ------------------------------------------------------------------ an independent statement of the official rules
def _windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(win, ws, b, h, w):
    c = win.shape[-1]
    return win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _held_window(blk):
    """The largest window a block has parameters for: V1's (2t-1)^2-row bias table, Swin-MLP's t^2 positions per
    head; V2's position MLP takes any window (None)."""
    if isinstance(blk, SwinMLPBlock):
        return math.isqrt(blk.spatial_mlp.out_channels // blk.num_heads)
    table = getattr(blk.attn, 'relative_position_bias_table', None)
    return None if table is None else (math.isqrt(table.shape[0]) + 1) // 2


def _window_and_shift(blk, j, h, w, window):
    """The official rule, decided on the h x w map that arrives at block ``j`` of a stage of a model configured with
    ``window``: a map no larger than the window gets one window of its size and no shift; otherwise the window,
    shifted by half of it in every second block. A block with parameters for a smaller window uses that one as its
    window; Swin-MLP never shrinks its window below it (the map is padded to it)."""
    held = _held_window(blk)
    ws = window if held is None else min(window, held)
    if min(h, w) <= ws:
        return (ws if isinstance(blk, SwinMLPBlock) else min(h, w)), 0
    return ws, ws // 2 if j % 2 else 0


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


def _position_bias(attn, ws):
    """(nH, N, N) for a ws x ws window, from each token pair's offset (dy, dx): V1 reads it in its table (one row per
    offset of its own window, official order); V2 evaluates 16 sigmoid(cpb_mlp) at the offset divided by the
    pretrained window - 1 (else this window's), scaled to 8 and log-spaced."""
    pos = torch.cartesian_prod(torch.arange(ws), torch.arange(ws))
    d = pos[:, None, :] - pos[None, :, :]
    if isinstance(attn, WindowAttentionV2):
        ref = attn.pretrained_window_size[0] or ws
        c = d.float() / max(ref - 1, 1) * 8
        return 16 * torch.sigmoid(attn.cpb_mlp(torch.sign(c) * torch.log2(c.abs() + 1) / 3)).permute(2, 0, 1)
    t = (math.isqrt(attn.relative_position_bias_table.shape[0]) + 1) // 2
    grid = attn.relative_position_bias_table.view(2 * t - 1, 2 * t - 1, -1)
    return grid[d[..., 0] + t - 1, d[..., 1] + t - 1].permute(2, 0, 1)


def _attend(attn, win, ws, mask):
    """Window attention written out: V1 scaled dot products, V2 cosine similarities times the per-head temperature
    (at most 100); plus the position bias and the shift mask; softmax; values; projection."""
    bw, n, c = win.shape
    nh = attn.num_heads
    v2 = isinstance(attn, WindowAttentionV2)
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias]) if v2 else attn.qkv.bias
    q, k, v = F.linear(win, attn.qkv.weight, bias).view(bw, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    if v2:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * attn.logit_scale.clamp(max=math.log(100)).exp()
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = logits + _position_bias(attn, ws)
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, nh, n, n) + mask[None, :, None]).view(bw, nh, n, n)
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


def _attention_mix(blk, x, h, w, ws, s):
    """(B, H, W, C) -> the window attention of a zero-padded, cyclically shifted map, cropped back."""
    b, _, _, c = x.shape
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    if s:
        x = torch.roll(x, (-s, -s), (1, 2))
    y = _unwindows(_attend(blk.attn, _windows(x, ws), ws, _shift_mask(hp, wp, ws, s) if s else None), ws, b, hp, wp)
    if s:
        y = torch.roll(y, (s, s), (1, 2))
    return y[:, :h, :w, :]


def _spatial_mix(blk, x, h, w, ws, s):
    """Swin-MLP: pad right/bottom to window multiples, then the shift's (ws - s, s) zero padding on each side."""
    b, _, _, c = x.shape
    nh = blk.num_heads
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


def _block(model, blk, j, x, h, w, window):
    b, _, c = x.shape
    ws, s = _window_and_shift(blk, j, h, w, window)
    if isinstance(model, SwinTransformerV2):  # res-post-norm: attention on x, norm after
        x = x + blk.norm1(_attention_mix(blk, x.view(b, h, w, c), h, w, ws, s).reshape(b, h * w, c))
        return x + blk.norm2(blk.mlp(x))
    mix = _spatial_mix if isinstance(model, SwinMLP) else _attention_mix
    x = x + mix(blk, blk.norm1(x).view(b, h, w, c), h, w, ws, s).reshape(b, h * w, c)
    return x + blk.mlp(blk.norm2(x))


def _merge(down, x, h, w):
    b, _, c = x.shape
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    if isinstance(down, PatchMergingV2):
        return down.norm(down.reduction(x)), (h + 1) // 2, (w + 1) // 2
    return down.reduction(down.norm(x)), (h + 1) // 2, (w + 1) // 2


def _reference_stages(model, img, window=4):
    """Stage outputs (before merging) as NCHW, and the logits, by the rules written out above, for a model configured
    with ``window``."""
    p = model.patch_embed.patch_size[0]
    h, w = img.shape[-2:]
    x = model.patch_embed.proj(F.pad(img, (0, (p - w % p) % p, 0, (p - h % p) % p)))
    b, c, h, w = x.shape
    x = model.patch_embed.norm(x.flatten(2).transpose(1, 2))
    outs = []
    for layer in model.layers:
        for j, blk in enumerate(layer.blocks):
            x = _block(model, blk, j, x, h, w, window)
        outs.append(x.view(b, h, w, -1).permute(0, 3, 1, 2))
        if layer.downsample is not None:
            x, h, w = _merge(layer.downsample, x, h, w)
    return outs, model.head(model.norm(x).mean(1))


def _randomized(model):
    """``model`` in eval mode with weights moved away from the zero-initialised V2 post-norms and zero biases."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ------------------------------------------------------------------ any input size
# stage 4: 2x2, smaller than the window 4; 4x4, the window's size
@pytest.mark.parametrize('img_size, impl', [(64, 'reference'), (128, 'reference'), (64, 'cpu')])
@pytest.mark.parametrize('cls', FAMILIES)
def test_dynamic_model_equals_the_fixed_one_bit_for_bit_at_the_built_size(cls, img_size, impl):
    torch.manual_seed(0)
    fixed = on_path(_tiny(cls, img_size=img_size), impl)
    dynamic = on_path(_tiny(cls, img_size=img_size, dynamic_img_size=True), impl)
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, img_size, img_size)
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


# built at 128, stage 4 is 4x4, the window's size (as swin_tiny's 7x7 at 224): at 230x310 it is 8x10 and shifts; at
# 40x72 stages 3 and 4 (3x5, 2x3) shrink their windows; built at 64, stage 4 is 2x2 and V1 and Swin-MLP hold window 2
RULE_CASES = [(128, (230, 310)), (128, (97, 161)), (128, (40, 72)), (128, (128, 128)), (64, (230, 310)), (64, (64, 64))]


# every case on the reference path; the CPU path (its evaluation fast path: cached bias + mask per window) on the
# three that shift a larger map, shrink windows, and hold a shrunk window
@pytest.mark.parametrize('img_size, size, impl', [(*case, 'reference') for case in RULE_CASES] +
                         [(*case, 'cpu') for case in RULE_CASES[::2]])
@pytest.mark.parametrize('cls', FAMILIES)
def test_each_stage_follows_the_official_window_rule_at_the_size_that_arrives(cls, img_size, size, impl):
    model = _randomized(on_path(_tiny(cls, img_size=img_size, dynamic_img_size=True), impl))
    with torch.no_grad():
        img = torch.randn(1, 3, *size)
        stages, logits = _reference_stages(model, img)
        ours = model.forward_intermediates(img)
        assert [o.shape for o in ours] == [s.shape for s in stages]
        for o, s in zip(ours, stages):
            torch.testing.assert_close(o, s, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(img), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_a_last_stage_larger_than_the_window_shifts_though_the_built_one_did_not(cls):
    built_small = _randomized(_tiny(cls, img_size=128, features_only=True))  # stage 4: 4x4, one window, no shift
    built_large = _tiny(cls, img_size=256, features_only=True).eval()  # stage 4: 8x8, shifted at the built size
    built_large.load_state_dict(built_small.state_dict())
    blk = built_small.layers[3].blocks[1]
    assert (blk.window_size, blk.shift_size) == (4, 0)
    assert blk.window_at((8, 10)) == (4, 2) and blk.shift_mask((8, 10), torch.device('cpu')).shape == (6, 16, 16)
    with torch.no_grad():
        img = torch.randn(1, 3, 230, 310)  # stage 4: 8x10
        for a, b in zip(built_small(img), built_large(img)):  # the same weights: the same maps at any size
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_v1_window_shrunk_at_run_time_reads_its_offsets_in_the_built_table():
    attn = WindowAttention(dim=8, window_size=(4, 4), num_heads=2)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    top_left = torch.tensor([0, 1, 4, 5])  # the tokens of a 2x2 window inside the 4x4 one: the same offsets
    assert torch.equal(attn.relative_position_bias(2), attn.relative_position_bias()[:, top_left][:, :, top_left])
    with pytest.raises(ValueError, match='does not hold'):
        attn.relative_position_bias(5)


def test_a_v2_window_decided_at_run_time_has_the_coordinates_of_a_model_built_with_it():
    torch.manual_seed(0)
    built = WindowAttentionV2(dim=8, window_size=(4, 4), num_heads=2)
    for window, pretrained in ((2, 0), (6, 0), (6, 4)):
        other = WindowAttentionV2(dim=8, window_size=(window, window), num_heads=2,
                                  pretrained_window_size=(pretrained, pretrained))
        other.load_state_dict(built.state_dict())  # the position MLP does not depend on the window
        built.pretrained_window_size = (pretrained, pretrained)
        with torch.no_grad():
            assert torch.equal(built.relative_position_bias(window), other.relative_position_bias())


@pytest.mark.parametrize('cls', FAMILIES)
def test_a_block_built_with_a_shrunk_window_keeps_it_as_its_largest(cls):
    blocks = _tiny(cls, img_size=64, dynamic_img_size=True).layers[3].blocks  # stage 4: 2x2 at the built size
    assert [(b.window_size, b.shift_size) for b in blocks] == [(2, 0), (2, 0)]
    if cls is SwinMLP:  # the spatial MLP mixes 2x2 windows: larger maps shift by 1, smaller ones are padded to it
        assert [b.shift_at((8, 10)) for b in blocks] == [0, 1] and blocks[1].shift_at((1, 3)) == 0
    elif cls is SwinTransformer:  # the bias table holds the offsets of a 2x2 window: no more
        assert [b.window_at((8, 10)) for b in blocks] == [(2, 0), (2, 1)]
    else:  # the position MLP takes any window: the configured one
        assert [b.window_at((8, 10)) for b in blocks] == [(4, 0), (4, 2)]


def test_a_size_first_met_under_inference_mode_still_trains():
    derived_on.cache_clear()  # the masks and indices of this size are built under inference mode
    model = _tiny(SwinTransformer, dynamic_img_size=True)
    x = torch.randn(1, 3, 44, 92)  # stage 3: 3x6, a window shrunk at run time; stage 1: shifted and padded
    with torch.inference_mode():
        expect = model(x)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expect)
    assert model.layers[2].blocks[0].attn.relative_position_bias_table.grad is not None


def test_the_shift_mask_follows_the_padded_size_and_is_built_once_per_size():
    model = _tiny(SwinTransformer, img_size=128, dynamic_img_size=True).eval()  # stage 1: 32x32, window 4, shifted
    blk = model.layers[0].blocks[1]
    assert blk.shift_size == 2
    small = blk.shift_mask((5, 7), torch.device('cpu'))  # padded to 8x8: 4 windows
    assert small.shape == (4, 16, 16)
    assert blk.shift_mask((5, 7), torch.device('cpu')) is small  # built once per size
    assert blk.shift_mask((32, 32), torch.device('cpu')) is blk.attn_mask
    assert blk.shift_mask((4, 9), torch.device('cpu')) is None  # no larger than the window: one row, no shift
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
