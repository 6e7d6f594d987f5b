"""The window-order fast path of Swin V1 computes what the official roll-and-partition path computes:
same outputs and same gradients (input, weights, bias tables) in training mode with shifted windows,
and the evaluation cache of bias + mask follows weight changes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import SwinTransformer
from models.layers import (BasicLayer, WindowOrder, window_order_index, window_partition, window_reverse)
from models.swin_transformer import SwinTransformerBlock
from tools.model_parity import randomize_


def _reference_block(blk: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
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


def _stage(**kwargs) -> BasicLayer:
    torch.manual_seed(0)
    blocks = [SwinTransformerBlock(dim=16, input_resolution=(8, 12), num_heads=2, window_size=4,
                                   shift_size=s, **kwargs) for s in (0, 2, 0, 2)]
    return randomize_(BasicLayer(blocks)).train()


def _grads(module, x, fn):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def test_window_order_stage_matches_roll_and_partition_in_outputs_and_gradients():
    stage = _stage()
    assert stage.order is not None and sum(stage.order.steps) == 5  # enter, 3 shift changes, leave
    x = torch.randn(2, 96, 16)

    def reference(t):
        for blk in stage.blocks:
            t = _reference_block(blk, t)
        return t

    out, gx, grads = _grads(stage, x, stage)
    ref_out, ref_gx, ref_grads = _grads(stage, x, reference)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(gx, ref_gx, atol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5), name
    assert ref_grads['blocks.1.attn.relative_position_bias_table'].abs().sum() > 0


def test_a_block_called_alone_takes_and_returns_row_major_tokens():
    stage = _stage()
    x = torch.randn(2, 96, 16)
    with torch.no_grad():
        for blk in stage.blocks:
            assert torch.allclose(blk(x), _reference_block(blk, x), atol=1e-5)


def test_window_order_index_is_the_order_of_the_rolled_partition():
    h, w, ws, s = 8, 12, 4, 2
    grid = torch.arange(h * w).view(1, h, w, 1)
    rolled = window_partition(torch.roll(grid, (-s, -s), (1, 2)), ws).reshape(-1)
    assert torch.equal(window_order_index((h, w), ws, s), rolled)
    order = WindowOrder([window_order_index((h, w), ws, 0), window_order_index((h, w), ws, s)])
    x = torch.randn(3, h * w, 5)
    assert torch.equal(order.enter(x, 0), x[:, window_order_index((h, w), ws, 0)])
    assert torch.equal(order.enter(order.enter(x, 0), 1), x[:, rolled])
    assert torch.equal(order.leave(order.enter(order.enter(x, 0), 1)), x)


def test_evaluation_bias_cache_follows_the_weights():
    model = randomize_(SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                       window_size=4, num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.layers[0].blocks[1].attn.relative_position_bias_table.add_(torch.randn(49, 1))  # in place, as AdamW does
        after = model(x)
        fresh = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                window_size=4, num_classes=5).eval()
        fresh.load_state_dict(model.state_dict())
        assert not torch.allclose(before, after)
        assert torch.allclose(after, fresh(x), atol=1e-6)


def test_eval_mode_with_gradients_still_reaches_the_bias_table():
    model = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                            window_size=4, num_classes=5).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # fills the cache
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_evaluation_after_a_fused_adamw_step_sees_the_new_bias_table():
    # torch's fused AdamW updates parameters without bumping their version counters.
    kwargs = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                  num_classes=5)
    model = randomize_(SwinTransformer(**kwargs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)  # fills the evaluation cache
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    fresh = SwinTransformer(**kwargs).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), fresh(x), atol=1e-5)


def test_bf16_training_with_the_query_scale_folded_into_the_weights_matches_the_reference():
    stage = _stage()
    x = torch.randn(2, 96, 16)

    def reference(t):
        for blk in stage.blocks:
            t = _reference_block(blk, t)
        return t

    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, gx, grads = _grads(stage, x, stage)
        ref_out, ref_gx, ref_grads = _grads(stage, x, reference)
    assert torch.allclose(out.float(), ref_out.float(), atol=0.1)
    for name in ('blocks.1.attn.qkv.weight', 'blocks.1.attn.qkv.bias', 'blocks.1.attn.relative_position_bias_table'):
        g, ref = grads[name], ref_grads[name]
        assert (g - ref).norm() / ref.norm() < 0.05, name
