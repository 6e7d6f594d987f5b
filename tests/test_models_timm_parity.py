"""Our models compute what the paper's models compute: official-layout state dicts, converted by timm's
own checkpoint converter, load strictly into timm's implementation and give the same logits, and a training
step gives every parameter the same gradient (ours mapped onto timm's names by the same converter); on the
reference path, and on the CPU path (``impl``: the CPU modules build_model swaps in) for two cases a family."""
from __future__ import annotations

import pytest
import torch

from test_models_cpu_swap import on_path
from tools.model_parity import grad_errors, make_pair, max_logit_diff

SMALL = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)


SWIN_CASES = {
    'w4': dict(window_size=4),                        # shifted stages 0-1, stage 2 exactly one window, stage 3 clipped
    'w8-ape': dict(window_size=8, ape=True),          # absolute position embedding; stages 1-3 clipped
    'no-qkv-bias': dict(window_size=4, qkv_bias=False, mlp_ratio=2.0),
    'w2': dict(img_size=32, window_size=2, depths=(2, 2, 4, 2)),  # shift 1; stage 3 is a 1-token window
}
SWINV2_CASES = {
    'w4': dict(window_size=4),
    # coordinates normalised by the pre-training windows
    'w8-pretrained-w4': dict(window_size=8, pretrained_window_sizes=(4, 4, 4, 2)),
    'no-qkv-bias': dict(window_size=4, qkv_bias=False),
}


def _cases(cases: dict, on_cpu_path: tuple) -> list:
    """Every case on the reference path, the ``on_cpu_path`` ones on the CPU path too."""
    return ([pytest.param(kwargs, 'reference', id=name) for name, kwargs in cases.items()] +
            [pytest.param(cases[name], 'cpu', id=f'{name}-cpu') for name in on_cpu_path])


@pytest.mark.parametrize('kwargs, impl', _cases(SWIN_CASES, ('w4', 'w2')))
def test_swin_matches_timm(kwargs, impl):
    ours, twin = make_pair('swin', **{**SMALL, **kwargs})
    on_path(ours, impl)
    assert max_logit_diff(ours, twin) < 1e-4
    _assert_same_gradients('swin', ours, twin)


def _assert_same_gradients(family: str, ours, twin) -> None:
    errors = grad_errors(family, ours, twin)
    assert len(errors) == sum(1 for _ in twin.parameters())  # every parameter of timm's twin is compared
    worst = max(errors, key=errors.get)
    # 5e-4: a per-head scalar such as V2's logit_scale sums its gradient over every token pair of every window, and
    # the two implementations sum in different orders (1.2e-4 seen in fp32 on an AMX Xeon); a real mistake, as
    # the detection test below shows, is off by 1e-2 and more.
    assert errors[worst] < 5e-4, f'{worst}: relative gradient error {errors[worst]:.2e}'


@pytest.mark.parametrize('kwargs, impl', _cases(SWINV2_CASES, ('w4', 'w8-pretrained-w4')))
def test_swinv2_matches_timm(kwargs, impl):
    ours, twin = make_pair('swinv2', **{**SMALL, **kwargs})
    on_path(ours, impl)
    assert max_logit_diff(ours, twin) < 1e-4
    _assert_same_gradients('swinv2', ours, twin)


def test_the_check_detects_a_wrong_weight():
    ours, twin = make_pair('swin', **SMALL, window_size=4)
    with torch.no_grad():
        table = ours.layers[0].blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))
    assert max_logit_diff(ours, twin) > 1e-3


def test_the_gradient_check_detects_a_wrong_gradient():
    ours, twin = make_pair('swin', **SMALL, window_size=4)
    ours.layers[0].blocks[1].attn.relative_position_bias_table.register_hook(lambda g: g * 1.01)
    errors = grad_errors('swin', ours, twin)
    assert errors['layers.0.blocks.1.attn.relative_position_bias_table'] > 5e-3
