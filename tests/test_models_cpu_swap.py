"""The CPU swap (models/cpu): ``accelerate`` turns the reference modules into their CPU versions with the same
keys and the same function (logits and every gradient, V1, V2 and Swin-MLP), and the printed model says which
implementation each module runs; ``build_model`` applies it on a CPU only, and not when turned off. Swin V1's
evaluation fast path (fused linear + GELU, SDPA on strided views, cached low-precision weights) computes what its
autograd path computes, takes the fused kernels, and follows weight changes.

:data:`IMPLS` and :func:`on_path` let the other model tests run a check over both paths."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import models.cpu.modules as cpu_modules
import models.swin_transformer as swin_reference
from config import get_config
from models import SwinMLP, SwinTransformer, SwinTransformerV2, build_model, cpu
from models.cpu import accelerate
from models.cpu.linear import CastCache, applies, dense
from models.layers import Mlp
from tools.model_parity import randomize_

# The two paths a model can run: the reference modules as built, and the CPU versions build_model swaps in on a CPU.
IMPLS = ['reference', 'cpu']


def on_path(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """``model`` as it runs on ``impl``: as built ('reference'), or with the CPU versions swapped in ('cpu'; the test
    is skipped where this machine has no CPU path)."""
    if impl == 'cpu':
        if not cpu.enabled():
            pytest.skip('no CPU path here (SWIN_CPU_KERNELS=0, or PyTorch without oneDNN)')
        accelerate(model)
    return model


KWARGS = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
              num_classes=5)


def _model(**overrides) -> SwinTransformer:
    torch.manual_seed(0)
    return accelerate(randomize_(SwinTransformer(**{**KWARGS, **overrides}))).eval()


def _fresh_copy(model: SwinTransformer) -> SwinTransformer:
    """A swapped model built anew with ``model``'s weights: nothing cached yet."""
    fresh = accelerate(SwinTransformer(**KWARGS)).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


FAMILIES = {  # no stochastic depth: the two models of a pair must compute the same function in training mode
    'swin': lambda: SwinTransformer(**KWARGS, drop_path_rate=0.0),
    'swinv2': lambda: SwinTransformerV2(**KWARGS, drop_path_rate=0.0, pretrained_window_sizes=(0, 0)),
    'swin_mlp': lambda: SwinMLP(**KWARGS, drop_path_rate=0.0),
}


def _reference_and_swapped(family: str):
    torch.manual_seed(0)
    reference = randomize_(FAMILIES[family]()).train()
    swapped = FAMILIES[family]().train()
    swapped.load_state_dict(reference.state_dict())
    return reference, accelerate(swapped)


def _logits_and_grads(model, x: torch.Tensor, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    (logits.float() * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_the_swap_keeps_the_state_dict_keys_and_changes_module_types(family):
    reference, swapped = _reference_and_swapped(family)
    assert list(swapped.state_dict()) == list(reference.state_dict())
    swapped_types = {type(m) for m in swapped.modules()}
    assert set(cpu_modules.SWAPS.values()) & swapped_types  # something was swapped
    assert not set(cpu_modules.SWAPS) & swapped_types       # and nothing was left behind


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_the_printed_model_says_which_implementation_each_module_runs(family):
    reference, swapped = _reference_and_swapped(family)
    ours = [m for m in reference.modules() if type(m) in cpu_modules.SWAPS and type(m) is not torch.nn.LayerNorm]
    assert ours and all('impl=reference' in m.extra_repr() for m in ours)  # our modules that have a CPU version
    assert 'impl=cpu' not in repr(reference)
    swapped_modules = [m for m in swapped.modules() if type(m) in cpu_modules.SWAPS.values()]
    assert swapped_modules and all('impl=cpu' in m.extra_repr() for m in swapped_modules)
    assert 'impl=cpu' in repr(swapped) and 'impl=reference' not in repr(swapped)


def test_where_the_printout_says_impl_cpu_the_reference_forward_does_not_run(monkeypatch):
    """What the printout warns of: an edit to the reference WindowAttention.forward changes nothing in a model whose
    attention says impl=cpu."""
    calls = []
    reference_forward = swin_reference.WindowAttention.forward

    def counted(self, *args, **kwargs):
        calls.append(type(self).impl)
        return reference_forward(self, *args, **kwargs)
    monkeypatch.setattr(swin_reference.WindowAttention, 'forward', counted)
    reference, swapped = _reference_and_swapped('swin')
    x = torch.randn(2, 3, 32, 32)
    reference(x).sum().backward()
    swapped(x).sum().backward()
    with torch.no_grad():
        swapped.eval()(x)
    assert calls == ['reference'] * sum(KWARGS['depths'])


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_the_swapped_model_gives_the_reference_logits_and_gradients(family):
    """fp32: the same numbers as the reference model, to rounding."""
    reference, swapped = _reference_and_swapped(family)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _logits_and_grads(reference, x)
    got_logits, got_grads = _logits_and_grads(swapped, x)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5 * want_logits.abs().max())
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert _relative_error(got_grads[name], want) < 1e-4, name


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_the_swapped_model_in_bf16_is_as_close_to_fp32_as_the_reference_in_bf16(family):
    """bf16: the two paths round at different places (and the CPU's bf16 kernels differ: AMX, AVX512-BF16,
    emulation), so each is measured against fp32; the swapped one may not be much further from it than the
    reference is (twice its error, or 2e-2 where the reference is closer than 1e-2)."""
    reference, swapped = _reference_and_swapped(family)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exact_logits, exact_grads = _logits_and_grads(reference, x)
    ref_logits, ref_grads = _logits_and_grads(reference, x, torch.bfloat16)
    got_logits, got_grads = _logits_and_grads(swapped, x, torch.bfloat16)
    assert got_grads.keys() == exact_grads.keys()
    pairs = [('logits', got_logits, ref_logits, exact_logits)]
    pairs += [(name, got_grads[name], ref_grads[name], want) for name, want in exact_grads.items()]
    for name, got, ref, exact in pairs:
        allowed = max(2 * _relative_error(ref, exact), 2e-2)
        assert _relative_error(got, exact) < allowed, f'{name}: {_relative_error(got, exact):.2e} > {allowed:.2e}'


def test_the_swapped_modules_run_the_reference_forward_on_the_meta_device():
    torch.manual_seed(0)
    model = accelerate(SwinTransformer(**KWARGS)).to('meta')
    out = model(torch.empty(2, 3, 32, 32, device='meta'))
    assert out.shape == (2, 5) and out.is_meta


def _cfg(**opts):
    cfg = get_config(None)
    cfg.defrost()
    cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES = 32, 5
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS = 16, [2, 2], [1, 2]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    for key, value in opts.items():
        setattr(cfg, key, value)
    cfg.freeze()
    return cfg


def _attention_type(model) -> type:
    return type(model.layers[0].blocks[0].attn)


def test_build_model_swaps_for_a_cpu_only(monkeypatch):
    assert _attention_type(build_model(_cfg())) is cpu_modules.WindowAttention
    assert _attention_type(build_model(_cfg(), device='cuda:0')) is swin_reference.WindowAttention
    assert _attention_type(build_model(_cfg(CPU_KERNELS=False))) is swin_reference.WindowAttention
    monkeypatch.setenv('SWIN_CPU_KERNELS', '0')
    assert _attention_type(build_model(_cfg())) is swin_reference.WindowAttention


def _ops(fn) -> set:
    return set(_op_counts(fn))


def _op_counts(fn) -> dict:
    with profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def _reference(model: SwinTransformer, x: torch.Tensor) -> torch.Tensor:
    """The autograd path: eval mode, but the input needs a gradient, so no fast path applies."""
    return model(x.clone().requires_grad_(True)).detach()


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_evaluation_matches_the_autograd_path(dtype):
    model = _model()
    x = torch.randn(3, 3, 32, 32)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        ref = _reference(model, x)
        with torch.no_grad():
            out = model(x)
    tol = 1e-5 if dtype is None else 0.1
    assert out.dtype == ref.dtype and torch.allclose(out.float(), ref.float(), atol=tol), (out - ref).abs().max()


def test_evaluation_runs_fused_kernels_instead_of_separate_gelu_and_softmax():
    model = _model()
    with torch.no_grad():
        ops = _ops(lambda: model(torch.randn(2, 3, 32, 32)))
    assert 'mkldnn::_linear_pointwise' in ops and 'aten::gelu' not in ops
    assert 'aten::scaled_dot_product_attention' in ops and 'aten::_softmax' not in ops
    ops = _ops(lambda: model(torch.randn(2, 3, 32, 32, requires_grad=True)))  # gradients: the separate ops
    assert 'aten::gelu' in ops and ('aten::_softmax' in ops or '_BiasSoftmax' in ops)  # models/cpu/kernels.py


def test_shifted_windows_split_the_batch_when_the_repeated_bias_would_be_large(monkeypatch):
    model = _model()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)
        blk = model.layers[0].blocks[1]
        one_image = blk.attn_mask.numel() * blk.attn.num_heads * 4  # bytes of one image's fp32 bias + mask
        monkeypatch.setattr(cpu_modules, '_BIAS_BYTES', 2 * one_image)  # 2 images per call: 3 calls for 5 images
        model.eval()  # drops the caches
        split = model(x)
    assert torch.allclose(whole, split, atol=1e-6)
    assert torch.allclose(split, _reference(model, x), atol=1e-5)


def test_cached_bf16_weights_follow_an_in_place_update():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        before = model(x)
        for name, p in model.named_parameters():
            if name.endswith(('mlp.fc1.weight', 'mlp.fc2.weight', 'attn.qkv.weight', 'attn.proj.weight')):
                p.mul_(-1.5)  # in place, as an optimizer does
        after = model(x)
        expected = _fresh_copy(model)(x)
    assert not torch.allclose(before.float(), after.float(), atol=0.1)
    assert torch.equal(after, expected)


def test_mlp_with_another_activation_keeps_it():
    torch.manual_seed(0)
    mlp = accelerate(Mlp(8, 32, act_layer=torch.nn.ReLU)).eval()
    assert type(mlp) is cpu_modules.Mlp
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = mlp(x)
    assert torch.allclose(out, mlp.fc2(torch.relu(mlp.fc1(x))), atol=1e-6)


def test_fast_path_stays_off_when_gradients_or_meta_tensors_are_involved():
    w = torch.nn.Parameter(torch.randn(2))
    assert not applies(w, torch.randn(2))
    with torch.no_grad():
        assert applies(w, torch.randn(2))
        assert not applies(w, torch.empty(2, device='meta'))


def test_cast_cache_recomputes_after_an_in_place_change_and_after_clear():
    t = torch.ones(3)
    cache, calls = CastCache(), []

    def compute():
        calls.append(1)
        return t.to(torch.bfloat16)
    cache.get('t', (t,), torch.bfloat16, compute)
    cache.get('t', (t,), torch.bfloat16, compute)
    t.add_(1)
    assert cache.get('t', (t,), torch.bfloat16, compute)[0] == 2
    cache.clear()
    cache.get('t', (t,), torch.bfloat16, compute)
    assert len(calls) == 3


def test_evaluation_under_inference_mode_then_no_grad_gives_the_same_logits():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model(x).clone()
        model(x)  # served from what the first pass cached
    with torch.no_grad():
        assert torch.allclose(model(x), first, atol=1e-6)


def test_cached_bf16_weights_are_dropped_after_a_fused_adamw_step():
    # torch's fused AdamW updates parameters without bumping their version counters
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.eval()(x)  # fills the caches
    torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    fresh = _fresh_copy(model)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(model.eval()(x), fresh(x))


def test_evaluation_adds_the_bias_inside_every_block_linear():
    """qkv, proj, fc1 and fc2 of every block go through oneDNN's linear, which adds the bias as it writes
    the product; only the patch-merging reductions (no bias) and the head stay with addmm / mm."""
    model = _model()
    with torch.no_grad():
        counts = _op_counts(lambda: model(torch.randn(2, 3, 32, 32)))
    blocks = sum(KWARGS['depths'])
    assert counts.get('mkldnn::_linear_pointwise') == 4 * blocks
    assert counts.get('aten::addmm', 0) <= 1  # the head


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
@pytest.mark.parametrize('bias', [True, False])
def test_training_linear_matches_f_linear_forward_and_backward(dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    w, b = torch.randn(24, 16), torch.randn(24) if bias else None
    results = []
    for fn in (dense, F.linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = fn(*leaves) if bias else fn(*leaves, None)
        y.float().square().sum().backward()
        results.append((y, *(leaf.grad for leaf in leaves)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=1e-2, atol=1e-2)
    for ours, ref in zip(*results):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, **tol)


def test_training_step_adds_biases_inside_onednn_linears():
    model = _model().train()
    counts = _op_counts(lambda: model(torch.randn(2, 3, 32, 32)).sum().backward())
    assert counts.get('mkldnn::_linear_pointwise') == 4 * sum(KWARGS['depths'])  # qkv, proj, fc1, fc2
    assert counts.get('aten::addmm', 0) <= 1  # the head


def _graph_nodes(tensor: torch.Tensor) -> set:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_training_graph_has_no_in_place_ops_on_views(dtype):
    """An in-place op on a view (scaling the queries, adding the bias to the logits) makes autograd clone the
    whole gradient of the base tensor in backward (CopySlices): the attention uses out-of-place ops instead."""
    model = _model().train()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(torch.randn(2, 3, 32, 32))
    assert 'CopySlices' not in _graph_nodes(out)


def test_head_split_returns_the_gradient_autograd_would_with_an_output_unused():
    qkv = torch.randn(2, 8, 3 * 6, requires_grad=True)  # 2 windows of 4 tokens, 3 heads of width 2
    weight_q, weight_v = torch.randn(4, 3, 4, 2), torch.randn(4, 3, 4, 2)

    def loss(q, k, v):  # k unused: its gradient reaches backward as None
        return (q * weight_q).sum() + (v * weight_v).sum()

    ours = cpu_modules._SplitHeads.apply(qkv, 2, 3)
    reference = qkv.view(4, 4, 3, 3, 2).permute(2, 0, 3, 1, 4).unbind(0)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    grad, expected = (torch.autograd.grad(loss(*outs), qkv)[0] for outs in (ours, reference))
    assert torch.equal(grad, expected)


@pytest.mark.filterwarnings('ignore:TF32 acceleration')  # torch's note when oneDNN flags are set on a CPU build
def test_training_linear_leaves_to_f_linear_what_onednn_should_not_take():
    x, w = torch.randn(2, 4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    assert type(dense(x, w).grad_fn).__name__ == '_OneDnnLinearBackward'
    with torch.backends.mkldnn.flags(enabled=False):  # the user turned oneDNN off
        assert type(dense(x, w).grad_fn).__name__ != '_OneDnnLinearBackward'
    with pytest.raises(RuntimeError, match='dtype'):  # no autocast: a mismatch stays an error, as in F.linear
        dense(x.bfloat16(), w)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast leaves fp64 alone: so do we
        assert dense(x.double(), w.double()).dtype == torch.float64


def test_evaluation_bias_cache_follows_the_weights():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.layers[0].blocks[1].attn.relative_position_bias_table.add_(torch.randn(49, 1))  # in place, as AdamW does
        after = model(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, _fresh_copy(model)(x), atol=1e-6)


def test_eval_mode_with_gradients_still_reaches_the_bias_table():
    model = _model()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # fills the cache
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_evaluation_after_a_fused_adamw_step_sees_the_new_bias_table():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()(x)  # fills the evaluation cache
    F.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), _fresh_copy(model)(x), atol=1e-5)


def test_evaluation_bias_cache_follows_the_window_decided_for_each_size():
    model = _model(dynamic_img_size=True)  # stage 2 is 4x4 at the built 32x32: one window of 4, no shift
    with torch.no_grad():
        # 48x48: stage 2 is 6x6, shifted by 2; 20x28: it is 3x4, one window of 3 (no mask, like the built size)
        for size in ((32, 32), (20, 28), (48, 48), (32, 32), (20, 28)):
            x = torch.randn(2, 3, *size)
            assert torch.allclose(model(x), _reference(model, x), atol=1e-5), size


def test_the_cpu_modules_switch_off_on_a_torch_they_were_not_built_for(monkeypatch, caplog):
    """Outside models.cpu.BUILT_FOR (or without the private functions they call) the reference model runs, and
    one log line says why."""
    import models.cpu as cpu
    monkeypatch.setattr(torch, '__version__', '2.99.0')
    with caplog.at_level(logging.WARNING, logger='models.cpu'):
        model = accelerate(FAMILIES['swin']())
    assert not set(cpu_modules.SWAPS.values()) & {type(m) for m in model.modules()}
    assert [r.getMessage() for r in caplog.records] == [
        'CPU modules off (the reference model runs): built for torch 2.6 to 2.14, this torch is 2.99.0']
    assert cpu.torch_supported('2.6.0+cu124') and cpu.torch_supported('2.14.1')
