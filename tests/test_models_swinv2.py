"""Swin Transformer V2: official key layout, continuous position bias across window sizes,
scaled cosine attention, res-post-norm; what computes on the reference and the CPU path (``impl``)."""
from __future__ import annotations

import math

import pytest
import torch

from models import SwinTransformerV2
from models.swin_transformer_v2 import SwinTransformerBlock, relative_coords_table
from test_models_cpu_swap import IMPLS, on_path
from tools.model_parity import randomize_


def _tiny(**kwargs) -> SwinTransformerV2:
    args = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                num_classes=5, drop_path_rate=0.0, pretrained_window_sizes=(0, 0))
    return SwinTransformerV2(**{**args, **kwargs})


def test_state_dict_keys_follow_the_official_layout():
    sd = _tiny().state_dict()
    attn = {k.split('attn.', 1)[1] for k in sd if k.startswith('layers.0.blocks.0.attn.')}
    assert attn == {'logit_scale', 'q_bias', 'v_bias', 'qkv.weight', 'proj.weight', 'proj.bias',
                    'cpb_mlp.0.weight', 'cpb_mlp.0.bias', 'cpb_mlp.2.weight'}
    assert sd['layers.0.blocks.0.attn.logit_scale'].shape == (1, 1, 1)
    assert sd['layers.1.blocks.0.attn.cpb_mlp.2.weight'].shape == (2, 512)
    # V2 patch merging normalises the 2C outputs of the reduction
    assert sd['layers.0.downsample.norm.weight'].shape == (32,)
    assert sd['layers.0.downsample.reduction.weight'].shape == (32, 64)
    assert not any('relative_position' in k or 'attn_mask' in k for k in sd)


def test_official_checkpoint_with_derived_buffers_loads_strictly():
    model = _tiny()
    buffers = dict(model.named_buffers())
    assert 'layers.0.blocks.0.attn.relative_coords_table' in buffers
    official = {**randomize_(_tiny(), seed=2).state_dict(), **buffers}
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.layers[0].blocks[1].attn.q_bias, official['layers.0.blocks.1.attn.q_bias'])


def test_coordinates_are_normalised_by_the_pretrained_window():
    # the default normalises by the window itself: the largest offset maps to log2(9) / log2(8)
    table = relative_coords_table((8, 8))
    assert table.shape == (1, 15, 15, 2)
    assert table.max().item() == pytest.approx(math.log2(9) / 3)
    assert torch.equal(relative_coords_table((8, 8), (8, 8)), table)
    # fine-tuned from window 4: offsets seen in pre-training keep their coordinates, larger ones extend them
    wide = relative_coords_table((8, 8), (4, 4))
    assert torch.allclose(wide[:, 4:11, 4:11], relative_coords_table((4, 4)))
    assert wide.max() > table.max()


def test_a_model_for_a_larger_window_reuses_the_position_mlp():
    small = randomize_(_tiny(img_size=32, window_size=4))
    large = _tiny(img_size=64, window_size=8, pretrained_window_sizes=(4, 4))
    large.load_state_dict(small.state_dict(), strict=True)  # cpb_mlp weights do not depend on the window
    a, b = small.layers[0].blocks[0].attn, large.layers[0].blocks[0].attn
    with torch.no_grad():
        bias_small = a.cpb_mlp(a.relative_coords_table)
        bias_large = b.cpb_mlp(b.relative_coords_table)
    assert bias_large.shape == (1, 15, 15, 1)
    assert torch.allclose(bias_large[:, 4:11, 4:11], bias_small, atol=1e-6)


def test_blocks_start_as_the_identity_because_post_norms_are_zeroed():
    block = _tiny().layers[0].blocks[1]  # a shifted block of a freshly built model
    assert block.shift_size == 2
    x = torch.randn(2, 256, 16)
    assert torch.equal(block(x), x)
    assert (block.norm1.weight == 0).all() and (block.norm2.weight == 0).all()


@pytest.mark.parametrize('impl', IMPLS)
def test_attention_temperature_is_capped_at_100(impl):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, input_resolution=(4, 4), num_heads=2, window_size=4)
    block = randomize_(on_path(block, impl)).eval()
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        block.attn.logit_scale.fill_(math.log(100))
        capped = block(x)
        block.attn.logit_scale.fill_(10.0)
        beyond = block(x)
        block.attn.logit_scale.fill_(math.log(50))
        lower = block(x)
    assert torch.allclose(capped, beyond)
    assert not torch.allclose(capped, lower)


def test_weight_decay_exclusions_cover_the_position_mlp_and_temperature():
    assert _tiny().no_weight_decay_keywords() == {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}


def test_pretrained_window_sizes_need_one_entry_per_stage():
    with pytest.raises(ValueError, match='one entry per stage'):
        _tiny(pretrained_window_sizes=(0, 0, 0, 0))


@pytest.mark.parametrize('impl', IMPLS)
def test_activation_checkpointing_gives_the_same_gradients(impl):
    torch.manual_seed(0)
    plain = on_path(randomize_(_tiny()), impl)
    ckpt = on_path(_tiny(use_checkpoint=True), impl)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model(x).logsumexp(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
