"""Our CPU kernel ``softmax(logits + bias)`` gives PyTorch's results and gradients, serves the training step, is
built once per machine into its cache, and steps aside (standard ops) where it cannot serve."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import SwinTransformer
from models.cpu import accelerate
from models.cpu import kernels as cpu_kernels
from models.cpu.kernels import bias_softmax, bias_softmax_reference, bias_softmax_serves

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None,
                                  reason='no C++ compiler or no AVX-512 here: the standard ops serve')


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() re-decided under this test's environment (and a private cache), then restored."""
    monkeypatch.setenv('SWIN_KERNEL_CACHE', str(tmp_path / 'cache'))
    cpu_kernels.library.cache_clear()
    yield tmp_path / 'cache'
    cpu_kernels.library.cache_clear()


def _inputs(images: int, windows: int, heads: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(images * windows, heads, n, n, generator=g) * 4).to(dtype)
    bias = (torch.randn(windows, heads, n, n, generator=g) * 2).to(dtype)
    return logits, bias


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('images,windows,heads,n', [(3, 4, 2, 49), (2, 1, 3, 64), (5, 2, 1, 7), (2, 3, 2, 16),
                                                    (4, 1, 1, 1), (2, 2, 1, 144)])
def test_bias_softmax_matches_the_standard_ops(dtype, images, windows, heads, n):
    logits, bias = _inputs(images, windows, heads, n, dtype)
    assert bias_softmax_serves(logits, bias)
    got, want = bias_softmax(logits, bias), bias_softmax_reference(logits, bias)
    assert got.dtype == dtype and got.shape == want.shape
    # bf16: the same sum rounded the same way, then fp32 softmax: equal after rounding (1 ulp where exp differs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2 ** -9)


@needs_kernel
def test_bias_softmax_gradients_match_the_standard_ops():
    logits, bias = _inputs(3, 4, 2, 49, torch.float32)
    grad = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (bias_softmax, bias_softmax_reference):
        x, b = logits.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(x, b).backward(grad)
        results.append((x.grad, b.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_bias_softmax_propagates_nan_and_infinities_as_pytorch_does(dtype):
    logits, bias = _inputs(2, 1, 1, 20, dtype)
    logits[0, 0, 1, 3] = float('nan')       # one NaN: the whole row NaN
    logits[0, 0, 2, :] = float('-inf')      # all masked: NaN
    logits[1, 0, 3, :5] = float('-inf')     # some masked: zero weight there
    logits[1, 0, 4, 7] = float('inf')       # +inf: NaN
    torch.testing.assert_close(bias_softmax(logits, bias), bias_softmax_reference(logits, bias),
                               rtol=0, atol=2 ** -9, equal_nan=True)


def test_bias_softmax_rejects_a_bias_that_does_not_repeat_over_the_logits():
    logits, bias = _inputs(2, 3, 1, 4, torch.float32)
    with pytest.raises(ValueError, match='does not repeat'):
        bias_softmax(logits[:5], bias)


@needs_kernel
def test_standard_ops_serve_where_the_kernel_should_not():
    logits, bias = _inputs(2, 1, 1, 7, torch.float32)
    assert not bias_softmax_serves(logits.double(), bias.double())          # a dtype the kernel has no version of
    assert not bias_softmax_serves(logits, bias.bfloat16())                  # mixed dtypes: PyTorch's promotion rules
    assert not bias_softmax_serves(logits.to('meta'), bias.to('meta'))       # no values to read
    assert not bias_softmax_serves(logits[:0], bias)                          # nothing to read
    with FlopCounterMode(display=False):                               # a dispatch mode watching the ops
        assert not bias_softmax_serves(logits, bias)
    wide, wide_bias = _inputs(1, 1, 1, cpu_kernels.library().bias_softmax_max_row() + 1, torch.float32)
    assert not bias_softmax_serves(wide, wide_bias)
    torch.testing.assert_close(bias_softmax(wide, wide_bias), bias_softmax_reference(wide, wide_bias))


def _tiny_swin() -> SwinTransformer:
    torch.manual_seed(0)
    return accelerate(SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                      window_size=4, num_classes=5, drop_path_rate=0.0)).train()


def _loss_and_grads(model: SwinTransformer, dtype=None):
    model.zero_grad(set_to_none=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@needs_kernel
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_training_step_runs_the_kernel_and_matches_the_standard_ops(monkeypatch, dtype):
    model = _tiny_swin()
    calls = []
    apply = cpu_kernels._BiasSoftmax.apply
    monkeypatch.setattr(cpu_kernels._BiasSoftmax, 'apply', lambda *a: calls.append(1) or apply(*a))
    loss, grads = _loss_and_grads(model, dtype)
    assert len(calls) == 4  # every block of the 2 + 2
    monkeypatch.setattr(cpu_kernels, 'bias_softmax_serves', lambda *a: False)
    ref_loss, ref_grads = _loss_and_grads(model, dtype)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=lambda m, name=name: f'{name}: {m}')


@needs_kernel
def test_library_is_built_once_into_the_cache_and_reused(fresh_library):
    assert cpu_kernels.library() is not None
    built = list(fresh_library.glob('cpu_kernels-*.so'))
    assert len(built) == 1 and not list(fresh_library.glob('*.tmp*'))
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None
    assert [p.stat().st_mtime_ns for p in fresh_library.glob('cpu_kernels-*.so')] == [stamp]


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv('SWIN_CPU_KERNELS', '0')
    assert cpu_kernels.library() is None
    logits, bias = _inputs(2, 1, 1, 7, torch.float32)
    assert not bias_softmax_serves(logits, bias)


def test_a_failing_compiler_leaves_the_standard_ops_with_one_warning(fresh_library, monkeypatch):
    monkeypatch.setenv('CXX', 'false')  # found on PATH, exits 1 without writing anything
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert cpu_kernels.library() is None
    assert len(caught) == 1 and 'standard ops' in str(caught[0].message)
    assert not list(fresh_library.glob('*'))  # nothing half-written left behind
    loss, _ = _loss_and_grads(_tiny_swin())
    assert torch.isfinite(loss)


@needs_kernel
def test_gelu_and_its_derivative_match_pytorch_in_bf16():
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(3)) * 3
    x[0, :6] = torch.tensor([float('nan'), float('inf'), -float('inf'), 0.0, -12.0, 30.0])
    x = x.bfloat16()
    y, dydx = cpu_kernels.gelu_with_derivative(x)
    assert y.dtype == dydx.dtype == torch.bfloat16
    # PyTorch's own bf16 kernels, NaN where they give NaN (they do for both infinities), and within one bf16 step of
    # the exact values elsewhere
    torch.testing.assert_close(y, F.gelu(x), rtol=2 ** -7, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(dydx, torch.ops.aten.gelu_backward(torch.ones_like(x), x), rtol=2 ** -7, atol=1e-6,
                               equal_nan=True)
    x64 = x[1:].double()
    torch.testing.assert_close(y[1:].double(), F.gelu(x64), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(dydx[1:].double(), torch.ops.aten.gelu_backward(torch.ones_like(x64), x64),
                               rtol=2 ** -7, atol=1e-6)
    with pytest.raises(ValueError, match='bfloat16'):
        cpu_kernels.gelu_with_derivative(x.float())


@needs_kernel
@pytest.mark.parametrize('autocast', [True, False])
def test_gelu_linear_matches_the_standard_ops_forward_and_backward(autocast):
    g = torch.Generator().manual_seed(4)
    x32 = torch.randn(2, 30, 48, generator=g)
    w32, b32 = torch.randn(24, 48, generator=g) * 0.2, torch.randn(24, generator=g)
    grad = torch.randn(2, 30, 24, generator=g).bfloat16()
    results = []
    for fn in (cpu_kernels.gelu_linear, lambda x, w, b: F.linear(F.gelu(x), w, b)):
        if autocast:  # fp32 parameters, bf16 compute
            x, w, b = (t.clone().requires_grad_() for t in (x32.bfloat16(), w32, b32))
        else:         # everything in bf16
            x, w, b = (t.bfloat16().requires_grad_() for t in (x32, w32, b32))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            assert cpu_kernels.gelu_linear_serves(x, w)
            y = fn(x, w, b)
        y.backward(grad)
        results.append([t.float() for t in (y, x.grad, w.grad, b.grad)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def _count_calls(monkeypatch, function) -> list:
    calls = []
    apply = function.apply
    monkeypatch.setattr(function, 'apply', lambda *a: calls.append(1) or apply(*a))
    return calls


@needs_kernel
def test_the_mlp_takes_gelu_linear_only_in_a_bf16_step_without_dropout_between(monkeypatch):
    from models.layers import Mlp
    calls = _count_calls(monkeypatch, cpu_kernels._GeluLinear)
    x = torch.randn(2, 10, 16, requires_grad=True)
    mlp = accelerate(Mlp(16, 32))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mlp(x).sum().backward()
    assert len(calls) == 1 and mlp.fc1.weight.grad is not None and x.grad is not None
    mlp(x).sum().backward()  # fp32: the standard ops
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        mlp(x)                # evaluation: the oneDNN linear + GELU fast path
    with torch.autocast('cpu', dtype=torch.bfloat16):
        accelerate(Mlp(16, 32, drop=0.5)).train()(x).sum().backward()  # dropout sits between the GELU and fc2
    assert len(calls) == 1


@needs_kernel
def test_bf16_evaluation_runs_our_softmax_instead_of_sdpa_and_matches_fp32(monkeypatch):
    model = _tiny_swin().eval()
    calls = _count_calls(monkeypatch, cpu_kernels._BiasSoftmax)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
        assert not calls  # fp32 evaluation: SDPA
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = model(x)
    assert len(calls) == 4
    torch.testing.assert_close(got.float(), want, rtol=0, atol=5e-2 * want.abs().max().item())


def _layer_norm_inputs(shape, dtype, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    return x, torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(shape, generator=g).to(dtype)


def _layer_norm_results(fn, x, w, b, grad, dtype=None):
    x, w, b = (t.to(dtype or t.dtype).clone().requires_grad_() for t in (x, w, b))
    y = fn(x, [x.shape[-1]], w, b, 1e-5)
    y.backward(grad.to(dtype or grad.dtype))
    return [t.double() for t in (y.detach(), x.grad, w.grad, b.grad)]


@needs_kernel
@pytest.mark.parametrize('shape', [(3, 50, 96), (37, 20), (4, 768), (2, 5, 7)])
def test_layer_norm_matches_pytorch_in_fp32(shape):
    x, w, b, grad = _layer_norm_inputs(shape, torch.float32)
    assert cpu_kernels.layer_norm_serves(x, [shape[-1]], w, b)
    for got, want in zip(_layer_norm_results(cpu_kernels.layer_norm, x, w, b, grad),
                         _layer_norm_results(F.layer_norm, x, w, b, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_layer_norm_in_bf16_sums_the_weight_gradients_in_fp32():
    x, w, b, grad = _layer_norm_inputs((4000, 96), torch.bfloat16)
    exact = _layer_norm_results(F.layer_norm, x, w, b, grad, torch.float64)
    y, dx, dw, db = _layer_norm_results(cpu_kernels.layer_norm, x, w, b, grad)
    for got, want in ((y, exact[0]), (dx, exact[1])):  # bf16 outputs: within bf16 rounding
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    for got, want in ((dw, exact[2]), (db, exact[3])):  # fp32 sums over 4000 rows: close to exact
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_layer_norm_leaves_other_cases_to_pytorch():
    x, w, b, _ = _layer_norm_inputs((3, 8), torch.float32)
    assert not cpu_kernels.layer_norm_serves(x.double(), [8], w.double(), b.double())
    assert not cpu_kernels.layer_norm_serves(x, [8], None, None)             # no affine parameters
    assert not cpu_kernels.layer_norm_serves(x.view(3, 2, 4), [2, 4], w.view(2, 4), b.view(2, 4))  # 2-D shape
    assert not cpu_kernels.layer_norm_serves(x, [8], w.bfloat16(), b.bfloat16())
    assert not cpu_kernels.layer_norm_serves(x[:0], [8], w, b)                 # nothing to normalise
    torch.testing.assert_close(cpu_kernels.layer_norm(x, [8], None, None), F.layer_norm(x, [8]))
    with pytest.raises(RuntimeError):  # a weight of the wrong size: PyTorch's own error, not a read past its end
        cpu_kernels.layer_norm(x, [8], w[:5], b[:5])
    with pytest.raises(RuntimeError):
        cpu_kernels.layer_norm(x, [5], w[:5], b[:5])


def test_the_cpu_swap_puts_our_layer_norm_in_every_norm_and_keeps_the_official_keys():
    from models.cpu.modules import LayerNorm
    model = _tiny_swin()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is LayerNorm for m in norms)
    assert 'layers.0.blocks.0.norm1.weight' in model.state_dict() and 'norm.bias' in model.state_dict()


@needs_kernel
@pytest.mark.parametrize('shape', [(16, 16), (48, 160), (37, 21), (1, 5), (25, 3)])
def test_transpose_matches_torch(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    assert torch.equal(cpu_kernels.transpose(x), x.t().contiguous())
    with pytest.raises(ValueError, match='2-D bf16'):
        cpu_kernels.transpose(x.float())


@needs_kernel
@pytest.mark.parametrize('n,k', [(24, 40), (40, 24), (32, 32)])  # the grad transposed, x transposed, a tie
@pytest.mark.parametrize('bias', [True, False])
def test_linear_grads_are_the_products_of_the_gradient(n, k, bias, monkeypatch):
    g = torch.Generator().manual_seed(8)
    grad, x = torch.randn(200, n, generator=g).bfloat16(), torch.randn(200, k, generator=g).bfloat16()
    transposed = []
    transpose = cpu_kernels.transpose
    monkeypatch.setattr(cpu_kernels, 'transpose', lambda t, *a: transposed.append(tuple(t.shape)) or transpose(t, *a))
    with torch.no_grad():  # as inside a backward pass (with grad mode on, it is a create_graph backward)
        grad_w, grad_b = cpu_kernels.linear_grads(grad, x, bias=bias)
    assert grad_w.shape == (n, k) and grad_w.is_contiguous() and grad_w.dtype == torch.bfloat16
    assert transposed[0] == ((200, n) if n <= k else (200, k))
    want = grad.double().t() @ x.double()
    torch.testing.assert_close(grad_w.double(), want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    if bias:
        torch.testing.assert_close(grad_b.double(), grad.double().sum(0), rtol=2 ** -7, atol=2 ** -7 * n)
    else:
        assert grad_b is None
    fp32_w, fp32_b = cpu_kernels.linear_grads(grad.float(), x.float(), bias=bias)  # fp32: the standard ops as is
    assert torch.equal(fp32_w, grad.float().t() @ x.float())
    assert cpu_kernels.linear_grads(grad, x, weight=False, bias=bias)[0] is None  # a frozen weight: no product


@needs_kernel
def test_transpose_rejects_an_out_too_small():
    with pytest.raises(ValueError, match='cannot hold'):
        cpu_kernels.transpose(torch.randn(6, 4).bfloat16(), torch.empty(3, 6, dtype=torch.bfloat16))


@needs_kernel
def test_bf16_training_step_takes_weight_gradients_through_the_transposes(monkeypatch):
    calls = []
    linear_grads = cpu_kernels.linear_grads
    monkeypatch.setattr(cpu_kernels, 'linear_grads', lambda *a, **k: calls.append(1) or linear_grads(*a, **k))
    _loss_and_grads(_tiny_swin(), torch.bfloat16)
    assert len(calls) == 4 * 4  # qkv, proj, fc1 and fc2 in each of the 4 blocks


@needs_kernel
def test_a_build_without_avx512_bf16_rounds_as_pytorch_does(fresh_library, monkeypatch):
    """CPUs with AVX-512 but not its bf16 extension (Skylake-X, Ice Lake) take the integer rounding path."""
    monkeypatch.setattr(cpu_kernels, '_FLAGS', cpu_kernels._FLAGS + ['-mno-avx512bf16'])
    assert cpu_kernels.library() is not None
    logits, bias = _inputs(3, 4, 2, 49, torch.bfloat16)
    logits[0, 0, 1, 3] = float('nan')
    torch.testing.assert_close(bias_softmax(logits, bias), bias_softmax_reference(logits, bias), rtol=0, atol=2 ** -9,
                               equal_nan=True)
    x = (torch.randn(40, 96, generator=torch.Generator().manual_seed(9)) * 3).bfloat16()
    y, dydx = cpu_kernels.gelu_with_derivative(x)
    torch.testing.assert_close(y, F.gelu(x), rtol=2 ** -7, atol=1e-6)
    w, b = torch.randn(96), torch.randn(96)
    torch.testing.assert_close(cpu_kernels.layer_norm(x, [96], w, b), F.layer_norm(x, [96], w, b), rtol=2 ** -7,
                               atol=2 ** -6)



@needs_kernel
def test_bias_softmax_rejects_what_its_kernel_cannot_take():
    with pytest.raises(ValueError, match='does not repeat'):  # 1-D: no rows to repeat a bias over
        bias_softmax(torch.randn(6), torch.randn(3))
    with pytest.raises(ValueError, match='does not repeat'):
        bias_softmax(torch.randn(2, 3), torch.randn(0, 3))
    assert not bias_softmax_serves(torch.randn(6), torch.randn(6))


@needs_kernel
def test_layer_norm_supports_a_second_derivative():
    x, w, b, _ = _layer_norm_inputs((6, 40), torch.float32)
    results = []
    for fn in (cpu_kernels.layer_norm, F.layer_norm):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, [40], ww, b, 1e-5)
        gx, = torch.autograd.grad((y * torch.arange(40.0)).sum(), xx, create_graph=True)
        (gx ** 2).sum().backward()  # a gradient penalty
        results.append((gx.detach(), xx.grad, ww.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_a_second_derivative_through_the_fused_softmax_or_gelu_raises_instead_of_being_wrong():
    logits, bias = _inputs(2, 1, 1, 7, torch.float32)
    x = logits.requires_grad_()
    scale = torch.arange(7.0, requires_grad=True)  # downstream weights: the incoming gradient has a graph
    gx, = torch.autograd.grad((bias_softmax(x, bias) * scale).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        (gx ** 2).sum().backward()
    h = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = cpu_kernels.gelu_linear(h, w)
    gh, = torch.autograd.grad((out.float() * torch.ones(8, requires_grad=True)).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        gh.float().pow(2).sum().backward()


@needs_kernel
@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')  # raised inside torch.func itself
def test_functorch_and_forward_mode_take_the_standard_ops():
    import torch.autograd.forward_ad as fwAD
    x, w, b, _ = _layer_norm_inputs((5, 24), torch.float32)
    per_row = torch.func.vmap(lambda r: cpu_kernels.layer_norm(r, [24], w, b))(x)
    torch.testing.assert_close(per_row, F.layer_norm(x, [24], w, b))
    grad = torch.func.grad(lambda r: cpu_kernels.layer_norm(r, [24], w, b).pow(2).sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda r: F.layer_norm(r, [24], w, b).pow(2).sum())(x))
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = cpu_kernels.layer_norm(fwAD.make_dual(x, tangent), [24], w, b)
        jvp = fwAD.unpack_dual(out).tangent
    with fwAD.dual_level():
        want = fwAD.unpack_dual(F.layer_norm(fwAD.make_dual(x, tangent), [24], w, b)).tangent
    torch.testing.assert_close(jvp, want)


@needs_kernel
def test_a_compiler_given_with_arguments_builds(fresh_library, monkeypatch):
    monkeypatch.setenv('CXX', 'env c++')  # like "ccache g++": a command and its argument
    assert cpu_kernels.library() is not None
