"""Swin Transformer V1: official state-dict layout, shifted-window masking, window clipping, input checks,
activation checkpointing, and the shapes of every registered variant at tiny width. What computes is checked on the
reference path and on the CPU path (``impl``: the CPU modules build_model swaps in)."""
from __future__ import annotations

import pytest
import torch

import models.layers
from timm.layers import DropPath as TimmDropPath
from models import SwinTransformer, create_model, list_models
from models.windows import check_resolution, shifted_window_mask
from models.swin_transformer import SwinTransformerBlock
from test_models_cpu_swap import IMPLS, on_path
from tools.model_parity import randomize_


def _tiny(**kwargs) -> SwinTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                num_classes=5, drop_path_rate=0.0)
    return SwinTransformer(**{**args, **kwargs})


def _first_img_size(name: str) -> int:
    """Smallest square image (multiple of 32) the variant's windows tile."""
    with torch.device('meta'):
        window = create_model(name, embed_dim=16, num_heads=(1, 2, 4, 8)).layers[0].blocks[0].window_size
    for size in range(32, 513, 32):
        try:
            check_resolution((size, size), (4, 4), 4, window)
            return size
        except ValueError:
            continue
    raise AssertionError(f"no image size fits {name}")


@pytest.mark.parametrize('name', list_models())
def test_every_registered_variant_gives_logits_at_tiny_width(name):
    size = _first_img_size(name)
    # tiny width and two blocks a stage (one plain, one shifted); window, image size and the rest as registered
    model = create_model(name, img_size=size, embed_dim=16, num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2),
                         num_classes=7).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, size, size))
        if isinstance(feats, tuple):  # Swin-MoE (official): (features, auxiliary loss)
            feats, aux = feats
            assert aux.shape == () and torch.isfinite(aux)
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert pooled.shape == (1, 16 * 8) == (1, model.num_features)
    assert feats.shape == (1, (size // 32) ** 2, 128)


def test_state_dict_keys_follow_the_official_layout():
    keys = set(_tiny(ape=True).state_dict())
    block = ['norm1.weight', 'norm1.bias', 'attn.relative_position_bias_table', 'attn.qkv.weight', 'attn.qkv.bias',
             'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
             'mlp.fc2.weight', 'mlp.fc2.bias']
    expected = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight',
                'patch_embed.norm.bias', 'absolute_pos_embed', 'norm.weight', 'norm.bias', 'head.weight', 'head.bias',
                # downsample at the END of every stage but the last, without bias
                'layers.0.downsample.reduction.weight', 'layers.0.downsample.norm.weight',
                'layers.0.downsample.norm.bias'}
    expected |= {f'layers.{i}.blocks.{j}.{k}' for i in range(2) for j in range(2) for k in block}
    assert keys == expected
    sd = _tiny().state_dict()
    assert sd['layers.0.downsample.norm.weight'].shape == (64,)  # norm over 4C before the reduction
    assert sd['layers.0.downsample.reduction.weight'].shape == (32, 64)
    assert sd['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (7 * 7, 1)


def test_derived_buffers_are_left_out_of_the_state_dict_but_tolerated_when_loading():
    model = _tiny()
    buffers = dict(model.named_buffers())
    assert 'layers.0.blocks.1.attn_mask' in buffers and 'layers.0.blocks.0.attn.relative_position_index' in buffers
    assert not set(buffers) & set(model.state_dict())
    official = {**randomize_(_tiny(), seed=3).state_dict(), **buffers}  # official checkpoints carry them
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.head.weight, official['head.weight'])
    with pytest.raises(RuntimeError, match='Unexpected'):
        model.load_state_dict({**official, 'layers.0.blocks.0.attn.extra': torch.zeros(1)}, strict=True)
    missing = dict(official)
    del missing['layers.0.blocks.0.attn.relative_position_bias_table']
    with pytest.raises(RuntimeError, match='Missing'):
        model.load_state_dict(missing, strict=True)


def _changed_tokens(block, x, at):
    """Token positions (row, col) of the block's output that change when input token ``at`` changes."""
    h, w = block.input_resolution
    y = x.clone()
    y[0, at[0] * w + at[1]] += torch.randn(x.shape[-1])  # not constant: LayerNorm would remove it
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(-1)[0].view(h, w)
    return {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}


@pytest.mark.parametrize('impl', IMPLS)
def test_shifted_window_tokens_never_attend_across_the_rolled_border(impl):
    torch.manual_seed(0)
    block = on_path(SwinTransformerBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2),
                    impl).eval()
    randomize_(block)
    x = torch.randn(1, 64, 8)
    # (0, 0) rolls to the bottom-right window, which also holds tokens from rows/cols 6-7 and 2-5;
    # the mask keeps it with the tokens that were its neighbours before the roll.
    assert _changed_tokens(block, x, (0, 0)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # an interior token shares its shifted window (rows/cols 2-5) with all 16 of them
    assert _changed_tokens(block, x, (3, 3)) == {(r, c) for r in range(2, 6) for c in range(2, 6)}
    plain = on_path(SwinTransformerBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=0),
                    impl).eval()
    randomize_(plain)
    assert _changed_tokens(plain, x, (0, 0)) == {(r, c) for r in range(4) for c in range(4)}


def test_shift_mask_separates_the_nine_regions_with_the_official_value():
    mask = shifted_window_mask((8, 8), window_size=4, shift_size=2)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds a single region
    # the bottom-right window holds four 2x2 regions: each token may attend to 4 tokens
    assert ((mask[3] == 0).sum(-1) == 4).all()


def test_window_shrinks_to_a_smaller_stage_and_stops_shifting():
    model = SwinTransformer(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
                            window_size=8)
    sizes = [(blk.window_size, blk.shift_size) for layer in model.layers for blk in layer.blocks]
    # stages of 16, 8, 4 and 2 tokens a side
    assert sizes == [(8, 0), (8, 4), (8, 0), (8, 0), (4, 0), (4, 0), (2, 0), (2, 0)]
    assert model.layers[2].blocks[0].attn.relative_position_bias_table.shape == (7 * 7, 1)
    assert model.layers[1].blocks[1].attn_mask is None


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r'input image size 64x64 .* img_size 32x32'):
        _tiny()(torch.randn(1, 3, 64, 64))


def test_image_size_the_windows_cannot_tile_is_rejected_at_construction():
    with pytest.raises(ValueError, match='window_size 7'):
        SwinTransformer(img_size=192, window_size=7)  # 48 tokens a side
    with pytest.raises(ValueError, match='patch_size'):
        SwinTransformer(img_size=226, window_size=7)


@pytest.mark.parametrize('impl', IMPLS)
def test_activation_checkpointing_gives_the_same_gradients(monkeypatch, impl):
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(models.layers, 'checkpoint', counting_checkpoint)
    torch.manual_seed(0)
    plain = on_path(randomize_(_tiny(drop_rate=0.0)), impl)
    ckpt = on_path(_tiny(use_checkpoint=True), impl)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model.train()
        model(x).logsumexp(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert calls == [False] * 4  # every block of the checkpointed model, non-reentrant


def test_weight_decay_exclusions_name_the_position_parameters():
    model = _tiny(ape=True)
    assert model.no_weight_decay() == {'absolute_pos_embed'}
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table'}


def test_qk_scale_overrides_the_default_scale():
    assert _tiny().layers[0].blocks[0].attn.scale == pytest.approx(16 ** -0.5)
    assert _tiny(qk_scale=0.5).layers[0].blocks[0].attn.scale == 0.5


def test_reset_classifier_replaces_the_head():
    model = _tiny()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_non_square_images_follow_the_official_window_rule():
    model = _tiny(img_size=(32, 64), depths=(2, 2, 2), num_heads=(1, 2, 4))
    # stage 1 has 4x8 tokens: its smaller side fits the window, so one window row and no shift
    assert [(b.window_size, b.shift_size) for b in model.layers[1].blocks] == [(4, 0), (4, 0)]
    assert model(torch.randn(2, 3, 32, 64)).shape == (2, 5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_drop_path_residual_is_timms_drop_path_added_in_one_pass(dtype):
    x = torch.randn(16, 5, 8, requires_grad=True)  # the fp32 residual stream; the branch may be bf16
    y = torch.randn(16, 5, 8, dtype=dtype, requires_grad=True)
    ours, timms = models.layers.DropPath(0.3), TimmDropPath(0.3)
    results = []
    for add in (ours.residual, lambda a, b: a + timms(b)):
        torch.manual_seed(0)
        out = add(x, y)
        grads = torch.autograd.grad(out.float().square().sum(), (x, y))
        results.append((out.float(), *grads))
    # rounding only: one fused multiply-add (ours) against a rounded product, then a sum (timm's); in bf16 the
    # gradients may differ by a few units in the last place (2**-7 relative each; seen: 2 on torch 2.11)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=4 * 2 ** -7, atol=1e-2)
    for ours_t, timm_t in zip(*results):
        torch.testing.assert_close(ours_t, timm_t.to(ours_t.dtype), **tol)
    dropped = (results[0][2].float().flatten(1) == 0).all(1)
    assert 0 < dropped.sum() < 16  # some samples dropped, not all: the same draws as timm's
    ours.eval()
    assert torch.equal(ours.residual(x, y), x + y)


def test_patch_merging_concatenates_neighbours_in_the_official_order():
    merging = models.layers.PatchMerging((6, 4), dim=3)
    x = torch.randn(2, 6 * 4, 3, requires_grad=True)
    grid = x.view(2, 6, 4, 3)
    official = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
    assert torch.equal(merging.merge(x), official.view(2, -1, 12))  # released reduction weights rely on it
    grad = torch.autograd.grad(merging.merge(x).square().sum(), x)[0]
    assert torch.equal(grad, 2 * x.detach())
