"""Parameters and FLOPs (multiply-adds, measured by PyTorch's counter) equal the paper's table."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import SwinTransformer, count_flops, count_params, create_model

# (variant, image size, params in millions, GFLOPs as multiply-adds), from the papers' tables
PAPER = [
    ('swin_tiny_patch4_window7_224', 224, 28.3, 4.5),
    ('swin_small_patch4_window7_224', 224, 49.6, 8.7),
    ('swin_base_patch4_window7_224', 224, 87.8, 15.4),
    ('swin_base_patch4_window12_384', 384, 88.0, 47.0),
    ('swin_large_patch4_window7_224', 224, 197.0, 34.5),
    ('swin_large_patch4_window12_384', 384, 197.0, 103.9),
    ('swinv2_tiny_patch4_window8_256', 256, 28.3, 5.9),
    ('swinv2_small_patch4_window8_256', 256, 49.7, 11.5),
    ('swinv2_base_patch4_window8_256', 256, 87.9, 20.3),
    ('swin_mlp_tiny_c24_patch4_window8_256', 256, 20.0, 4.0),
    ('swin_mlp_base_patch4_window7_224', 224, 61.0, 10.4),
]


@pytest.mark.parametrize('name, img_size, mparams, gflops', PAPER)
def test_params_and_flops_match_the_paper(name, img_size, mparams, gflops):
    with torch.device('meta'):
        model = create_model(name)
    assert count_params(model) / 1e6 == pytest.approx(mparams, rel=0.02)
    assert count_flops(model, img_size) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_count_flops_is_half_the_counters_flops_on_the_math_attention_path():
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert count_flops(model, 32) == counter.get_total_flops() // 2


def test_count_flops_leaves_the_model_as_it_was():
    model = SwinTransformer(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    count_flops(model, (32, 32))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == 'cpu' for p in model.parameters())


@pytest.mark.parametrize('name', ['swin_tiny_patch4_window7_224', 'swinv2_tiny_patch4_window16_256',
                                  'swin_mlp_tiny_c24_patch4_window8_256'])
def test_the_official_formula_agrees_with_the_counter(name):
    with torch.device('meta'):
        model = create_model(name)
    size = model.patch_embed.img_size
    assert model.flops() == pytest.approx(count_flops(model, size), rel=0.01)
