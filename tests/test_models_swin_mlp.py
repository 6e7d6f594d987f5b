"""Swin-MLP: official key layout, the zero-padded shifted windows, shapes; what computes on the reference and the
CPU path (``impl``)."""
from __future__ import annotations

import pytest
import torch

from models import SwinMLP
from models.swin_mlp import SwinMLPBlock
from test_models_cpu_swap import IMPLS, on_path
from tools.model_parity import randomize_


def _changed_tokens(block, x, at):
    h, w = block.input_resolution
    y = x.clone()
    y[0, at[0] * w + at[1]] += torch.randn(x.shape[-1])
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(-1)[0].view(h, w)
    return {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}


def test_state_dict_keys_follow_the_official_layout():
    model = SwinMLP(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3)
    sd = model.state_dict()
    block = {k.split('blocks.0.', 1)[1] for k in sd if k.startswith('layers.0.blocks.0.')}
    assert block == {'norm1.weight', 'norm1.bias', 'spatial_mlp.weight', 'spatial_mlp.bias', 'norm2.weight',
                     'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'}
    # one N x N position mixer per head, N = 4 * 4 window positions
    assert sd['layers.0.blocks.0.spatial_mlp.weight'].shape == (2 * 16, 16, 1)
    assert 'layers.0.downsample.reduction.weight' in sd and 'layers.1.downsample.reduction.weight' not in sd
    assert set(dict(model.named_buffers())) == set()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize('impl', IMPLS)
def test_shifted_windows_are_zero_padded_not_rolled(impl):
    torch.manual_seed(0)
    block = SwinMLPBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2)
    block = randomize_(on_path(block, impl)).eval()
    assert (block.window_size, block.shift_size) == (4, 2)
    x = torch.randn(1, 64, 8)
    # the map is padded by 2 on the top/left: the first window covers only rows/cols 0-1, no wrap-around
    assert _changed_tokens(block, x, (0, 0)) == {(r, c) for r in range(2) for c in range(2)}
    assert _changed_tokens(block, x, (7, 7)) == {(r, c) for r in range(6, 8) for c in range(6, 8)}
    assert _changed_tokens(block, x, (3, 3)) == {(r, c) for r in range(2, 6) for c in range(2, 6)}


@pytest.mark.parametrize('impl', IMPLS)
def test_unshifted_windows_mix_only_within_their_window(impl):
    torch.manual_seed(0)
    block = randomize_(on_path(SwinMLPBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4), impl)).eval()
    assert _changed_tokens(block, torch.randn(1, 64, 8), (5, 1)) == {(r, c) for r in range(4, 8) for c in range(4)}


def test_window_shrinks_to_a_smaller_stage():
    model = SwinMLP(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=8)
    assert [(b.window_size, b.shift_size) for b in model.layers[2].blocks] == [(4, 0), (4, 0)]
    assert model.layers[2].blocks[0].spatial_mlp.weight.shape == (4 * 16, 16, 1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize('impl', IMPLS)
def test_activation_checkpointing_gives_the_same_gradients(impl):
    torch.manual_seed(0)
    args = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3,
                drop_path_rate=0.0)
    plain = on_path(randomize_(SwinMLP(**args)), impl)
    ckpt = on_path(SwinMLP(**args, use_checkpoint=True), impl)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model(x).logsumexp(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
