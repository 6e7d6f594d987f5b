"""The reference window attention: one ``F.scaled_dot_product_attention`` call per block in training and
evaluation (bias + shift mask as a 4-D ``attn_mask``), what the official roll / partition / explicit-softmax
formulation computes (on the CPU path too), and under fp16 autocast a bias-table gradient summed in fp32, finite
where an fp16 sum over the windows would overflow."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.layers
from models import SwinTransformer, SwinTransformerV2
from models.layers import BasicLayer
from models.windows import shifted_window_mask, window_partition, window_reverse
from models.swin_transformer import SwinTransformerBlock, WindowAttention
from models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from test_models_cpu_swap import IMPLS, on_path
from tools.model_parity import randomize_


def _official_block(blk: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The official formulation: roll, partition, attention per window with bias + mask, merge, roll back."""
    h, w = blk.input_resolution
    b, _, c = x.shape
    ws, s, attn = blk.window_size, blk.shift_size, blk.attn
    y = blk.norm1(x).view(b, h, w, c)
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
    win = window_partition(y, ws).view(-1, ws * ws, c)
    bw, n, _ = win.shape
    nh = attn.num_heads
    q, k, v = attn.qkv(win).reshape(bw, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn.relative_position_bias().unsqueeze(0)
    if blk.attn_mask is not None:
        nw = blk.attn_mask.shape[0]
        logits = (logits.view(bw // nw, nw, nh, n, n) + blk.attn_mask[None, :, None]).view(bw, nh, n, n)
    win = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))
    y = window_reverse(win.view(-1, ws, ws, c), ws, h, w)
    if s:
        y = torch.roll(y, (s, s), (1, 2))
    x = x + y.reshape(b, h * w, c)
    return x + blk.mlp(blk.norm2(x))


def _stage(impl: str = 'reference') -> BasicLayer:
    torch.manual_seed(0)
    blocks = [SwinTransformerBlock(dim=16, input_resolution=(8, 12), num_heads=2, window_size=4,
                                   shift_size=s) for s in (0, 2, 0, 2)]
    return randomize_(on_path(BasicLayer(blocks), impl)).train()


def _grads(module, x, fn):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize('impl', IMPLS)
def test_a_stage_of_shifted_blocks_matches_the_official_formulation_in_outputs_and_gradients(impl):
    stage = _stage(impl)
    x = torch.randn(2, 96, 16)

    def official(t):
        for blk in stage.blocks:
            t = _official_block(blk, t)
        return t

    out, gx, grads = _grads(stage, x, stage)
    ref_out, ref_gx, ref_grads = _grads(stage, x, official)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f'{name}: {m}')
    assert ref_grads['blocks.1.attn.relative_position_bias_table'].abs().sum() > 0


def _count_sdpa(monkeypatch) -> list:
    """Record the q and attn_mask shapes of every SDPA call the models make."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.dim(), None if attn_mask is None else attn_mask.dim()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(models.layers.F, 'scaled_dot_product_attention', counting)
    return calls


SMALL = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
             num_classes=5)


@pytest.mark.parametrize('build', [lambda: SwinTransformer(**SMALL),
                                   lambda: SwinTransformerV2(**SMALL, pretrained_window_sizes=(0, 0))],
                         ids=['swin', 'swinv2'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_every_block_attends_through_one_4d_sdpa_call(monkeypatch, build, mode):
    model = getattr(build(), mode)()
    calls = _count_sdpa(monkeypatch)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    # every block, shifted ones included: 4-D q and a 4-D mask, which CUDA's fused kernels take
    assert calls == [(4, 4)] * sum(SMALL['depths'])


def _windows_and_mask(images: int, resolution: int, window: int, dim: int):
    """Tokens of ``images`` images, partitioned into shifted windows, and the shift mask of that layout."""
    mask = shifted_window_mask((resolution, resolution), window, window // 2)
    nw = mask.shape[0]
    x = torch.randn(images * nw, window * window, dim, generator=torch.Generator().manual_seed(3))
    return x, mask


def _bias_parameters(attn) -> dict:
    """The parameters the relative position bias comes from: V1's table, V2's continuous-bias MLP."""
    return {n: p for n, p in attn.named_parameters() if n.startswith(('relative_position_bias_table', 'cpb_mlp.'))}


@pytest.mark.parametrize('family', ['swin', 'swinv2'])
def test_fp16_bias_gradient_over_4096_windows_at_loss_scale_2_16_is_finite_and_matches_fp32(family):
    # 64 images x 64 shifted windows. Each window's gradient fits in fp16 (the output gradient is 0.5 x 2^16 per
    # element), but one bias entry's gradient summed over the 4096 windows is ~5e5: beyond fp16's 65504. (The
    # weight gradients of qkv and proj overflow here too, in any fp16 framework: the grad scaler skips such a
    # step; the bias must not be what overflows at a scale the linears take.)
    torch.manual_seed(0)
    attn = randomize_((WindowAttention if family == 'swin' else WindowAttentionV2)(16, (4, 4), num_heads=2))
    with torch.no_grad():
        attn.qkv.weight.mul_(4)  # sharper attention: larger bias gradients
    x, mask = _windows_and_mask(images=64, resolution=32, window=4, dim=16)
    assert x.shape[0] == 4096
    upstream = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).sign()
    scale = 2.0 ** 16

    def bias_grads(fp16: bool) -> dict:
        attn.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.float16, enabled=fp16):
            out = attn(x, mask)
        (out.float() * upstream).sum().mul(scale).backward()
        return {n: p.grad.clone() for n, p in _bias_parameters(attn).items()}

    want, got = bias_grads(False), bias_grads(True)
    assert got.keys() == want.keys() and got
    for name, g in got.items():
        assert torch.isfinite(g).all(), name
        assert (g - want[name]).norm() / want[name].norm() < 2e-2, name
    if family == 'swin':  # the scaled sum is what an fp16 reduction would have had to hold
        assert got['relative_position_bias_table'].abs().max() > 65504
