"""Check that our Swin models compute what the paper's models compute, using timm as the reference.

Our state dict is in the official layout; timm's ``checkpoint_filter_fn`` converts official
checkpoints to its own layout. So: randomise every parameter of our model, convert its state dict
with timm's converter, load it strictly into timm's twin, and compare the logits in eval mode. The
gradients of a training step are compared the same way: ours, keyed by our parameter names, go
through the converter too and must equal the twin's, parameter by parameter.

    .venv/bin/python -m tools.model_parity          # full-size Swin-T, S, B and SwinV2-T
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, Tuple

import torch
from torch import nn

from models import SwinTransformer, SwinTransformerV2, count_params

__all__ = ['randomize_', 'make_pair', 'max_logit_diff', 'grad_errors', 'PAPER_MODELS']

# name -> (family, constructor arguments); the full-size models the paper reports.
PAPER_MODELS: Dict[str, Tuple[str, dict]] = {
    'swin_tiny_patch4_window7_224': ('swin', dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'swin_small_patch4_window7_224': ('swin', dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
    'swin_base_patch4_window7_224': ('swin', dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))),
    'swinv2_tiny_patch4_window8_256': ('swinv2', dict(img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 6, 2),
                                               num_heads=(3, 6, 12, 24))),
}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (biases, bias tables and norms included), in place.

    Scales are chosen so each kind of parameter visibly changes the logits without blowing them up.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen) * std + mean

    for name, p in model.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        if 'norm' in name and leaf == 'weight':
            value = normal(p, 0.1, 1.0)
        elif leaf == 'logit_scale':
            value = normal(p, 0.3, math.log(10))
        elif leaf == 'relative_position_bias_table' or name.endswith('cpb_mlp.0.weight'):
            value = normal(p, 0.5)
        elif p.dim() == 1 or leaf in ('q_bias', 'v_bias', 'absolute_pos_embed'):
            value = normal(p, 0.1)
        else:
            value = normal(p, 0.05)
        p.copy_(value.to(p.dtype))
    return model


class _AddPosEmbed(nn.Module):
    """Adds our absolute position embedding to timm's NHWC patch tokens (timm's Swin has no ``ape``)."""

    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor, grid: Tuple[int, int]):
        super().__init__()
        self.inner = patch_embed
        self.register_buffer('pos', pos_embed.reshape(1, grid[0], grid[1], -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.pos


def make_pair(family: str, seed: int = 0, **kwargs) -> Tuple[nn.Module, nn.Module]:
    """Build our model (randomised, eval) and timm's twin holding the same weights (eval).

    ``family`` is 'swin' or 'swinv2'; ``kwargs`` are our constructor arguments (qk_scale is not
    supported: timm has no such argument). Loading into timm is strict: a missing or unexpected key
    raises.
    """
    kwargs = {'drop_path_rate': 0.0, **kwargs}
    if not kwargs.get('patch_norm', True) or kwargs.get('qk_scale') is not None:
        raise ValueError("timm's twin always normalises patches and has no qk_scale")
    twin_args = {k: v for k, v in kwargs.items() if k not in ('ape', 'patch_norm', 'qk_scale')}
    if family == 'swin':
        ours, twin = SwinTransformer(**kwargs), _timm_module(family).SwinTransformer(**twin_args)
    elif family == 'swinv2':
        ours, twin = SwinTransformerV2(**kwargs), _timm_module(family).SwinTransformerV2(**twin_args)
    else:
        raise ValueError(f"no timm twin for family {family!r}")
    module = _timm_module(family)
    randomize_(ours, seed)
    state = module.checkpoint_filter_fn({'model': ours.state_dict()}, twin)
    pos = state.pop('absolute_pos_embed', None)
    twin.load_state_dict(state, strict=True)
    if pos is not None:
        twin.patch_embed = _AddPosEmbed(twin.patch_embed, pos, ours.patches_resolution)
    return ours.eval(), twin.eval()


@torch.no_grad()
def max_logit_diff(ours: nn.Module, twin: nn.Module, batch: int = 2, seed: int = 1) -> float:
    """Largest absolute difference between the two models' logits on random images."""
    h, w = ours.patch_embed.img_size
    x = torch.randn(batch, ours.patch_embed.in_chans, h, w, generator=torch.Generator().manual_seed(seed))
    return (ours(x) - twin(x)).abs().max().item()


def _timm_module(family: str):
    import timm.models.swin_transformer as timm_v1
    import timm.models.swin_transformer_v2 as timm_v2
    return {'swin': timm_v1, 'swinv2': timm_v2}[family]


def _training_grads(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every parameter's gradient of one training-mode step whose loss weighs each logit differently."""
    model.train().zero_grad(set_to_none=True)
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.eval().zero_grad(set_to_none=True)
    return grads


def grad_errors(family: str, ours: nn.Module, twin: nn.Module, batch: int = 2, seed: int = 1) -> Dict[str, float]:
    """Relative error ``|g_ours - g_timm| / |g_timm|`` per timm parameter name, after one training-mode step of
    each model on the same images (dropout and stochastic depth off). Our gradients are mapped onto timm's names
    and layouts by timm's own converter, as a checkpoint of ours would be; a parameter either side lacks raises."""
    h, w = ours.patch_embed.img_size
    x = torch.randn(batch, ours.patch_embed.in_chans, h, w, generator=torch.Generator().manual_seed(seed))
    theirs = {name.replace('patch_embed.inner.', 'patch_embed.'): g for name, g in _training_grads(twin, x).items()}
    wrapped = twin.patch_embed
    if isinstance(wrapped, _AddPosEmbed):  # timm has no absolute embedding: the converter sees the plain twin
        twin.patch_embed = wrapped.inner
    try:
        mine = _timm_module(family).checkpoint_filter_fn({'model': _training_grads(ours, x)}, twin)
    finally:
        twin.patch_embed = wrapped
    mine.pop('absolute_pos_embed', None)  # a buffer of our wrapper around timm's twin: no gradient there
    if mine.keys() != theirs.keys():
        raise KeyError(f"gradients differ in names: {sorted(mine.keys() ^ theirs.keys())}")
    return {name: ((mine[name] - g).norm() / g.norm().clamp_min(1e-30)).item() for name, g in theirs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='*', default=list(PAPER_MODELS), choices=list(PAPER_MODELS))
    parser.add_argument('--tol', type=float, default=1e-4, help='largest allowed max abs logit difference')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failed = 0
    for name in args.models:
        family, kwargs = PAPER_MODELS[name]
        start = time.time()
        ours, twin = make_pair(family, **kwargs)
        diff = max_logit_diff(ours, twin, batch=1)
        ok = diff < args.tol
        failed += not ok
        print(f"{name:32s} params {count_params(ours) / 1e6:6.2f}M  max |logit diff| vs timm {diff:.2e}  "
              f"{'OK' if ok else 'FAIL'}  ({time.time() - start:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
