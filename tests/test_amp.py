"""resolve_amp and GradScalerWithNorm: dtype choice, backward/clip/step, accumulation, non-finite reporting."""
from __future__ import annotations

import logging

import pytest
import torch

from config import get_default_config
from utils import amp
from utils.amp import GradScalerWithNorm, resolve_amp
from utils.errors import UserError


def _cfg(enable=True, dtype='auto'):
    cfg = get_default_config()
    cfg.AMP_ENABLE, cfg.AMP_DTYPE = enable, dtype
    cfg.freeze()
    return cfg


def test_resolve_amp_picks_a_dtype_per_device(monkeypatch):
    monkeypatch.setattr(amp, 'cpu_bf16_support', lambda: (True, 'amx_bf16'))
    assert resolve_amp(_cfg(enable=False), 'cuda') == (False, None)
    assert resolve_amp(_cfg(), torch.device('cpu')) == (True, torch.bfloat16)
    assert resolve_amp(_cfg(dtype='bfloat16'), 'cpu') == (True, torch.bfloat16)
    assert resolve_amp(_cfg(dtype='float16'), 'cuda:0') == (True, torch.float16)


@pytest.mark.parametrize('native', [True, False])
def test_auto_is_bfloat16_only_on_a_cpu_that_computes_it(monkeypatch, caplog, native):
    """On a CPU that emulates bfloat16 (AVX2, AVX-512 without BF16) autocast is several times slower than
    float32: 'auto' trains in float32 there, and says why in one line; an explicit bfloat16 still forces it."""
    monkeypatch.setattr(amp, 'cpu_bf16_support', lambda: (native, 'the stub says so'))
    amp._say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger='utils.amp'):
        choice = resolve_amp(_cfg(), 'cpu')
        assert resolve_amp(_cfg(), 'cpu') == choice  # asked again: the same answer, not said again
    assert choice == ((True, torch.bfloat16) if native else (False, None))
    assert caplog.messages == [f"AMP_DTYPE auto: {'bfloat16' if native else 'float32'} "
                               f"(this CPU {'computes it natively' if native else 'emulates bfloat16'}: the stub says so"
                               + ('' if native else '; AMP_DTYPE bfloat16 forces it') + ')']
    assert resolve_amp(_cfg(dtype='bfloat16'), 'cpu') == (True, torch.bfloat16)


@pytest.mark.parametrize('native', [True, False])
def test_auto_is_bfloat16_on_a_gpu_that_has_it_else_float16(monkeypatch, native):
    monkeypatch.setattr(amp, 'cuda_bf16_native', lambda: native)
    assert resolve_amp(_cfg(), 'cuda') == (True, torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize('flags, native', [('fpu avx2 fma', False), ('fpu avx2 avx512f avx512bw', False),
                                           ('fpu avx512f avx512_bf16', True), ('fpu amx_bf16 amx_tile', True)])
def test_the_cpu_check_reads_the_bf16_flags(monkeypatch, flags, native):
    monkeypatch.setattr(amp, '_cpu_flags', lambda: set(flags.split()))
    amp.cpu_bf16_support.cache_clear()
    try:
        assert amp.cpu_bf16_support()[0] is native
    finally:
        amp.cpu_bf16_support.cache_clear()


def test_the_cpu_check_times_a_product_where_no_flags_are_readable(monkeypatch):
    monkeypatch.setattr(amp, '_cpu_flags', lambda: None)
    monkeypatch.setattr(amp, '_matmul_seconds', lambda dtype: {torch.bfloat16: 4e-3, torch.float32: 1e-3}[dtype])
    amp.cpu_bf16_support.cache_clear()
    try:
        native, why = amp.cpu_bf16_support()
    finally:
        amp.cpu_bf16_support.cache_clear()
    assert not native and '4.00 ms in bfloat16, 1.00 ms in float32' in why


@pytest.mark.parametrize('dtype, needle', [('float16', 'float16'), ('fp8', 'fp8')])
def test_resolve_amp_rejects_what_cannot_run(dtype, needle):
    with pytest.raises(UserError, match=needle):
        resolve_amp(_cfg(dtype=dtype), 'cpu')


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    return model, opt, x, y


def test_step_returns_the_norm_before_clipping_and_clips_to_the_limit():
    model, opt, x, y = _setup()
    before = model.weight.detach().clone()
    loss = ((model(x) - y) ** 2).sum() * 10
    loss.backward(retain_graph=True)
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    opt.zero_grad()
    scaler = GradScalerWithNorm(enabled=False)
    norm = scaler(loss, opt, clip_grad=0.5, parameters=model.parameters())  # a generator, as the engine passes
    assert norm == pytest.approx(expected.item(), rel=1e-5) and norm > 0.5
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert clipped == pytest.approx(0.5, rel=1e-4)
    assert not torch.equal(model.weight, before) and not scaler.last_step_skipped and scaler.last_grad_finite


def test_accumulated_micro_batches_step_once_like_the_full_batch():
    model, opt, x, y = _setup()
    scaler = GradScalerWithNorm(enabled=False)
    for half in (slice(0, 4), slice(4, 8)):
        loss = ((model(x[half]) - y[half]) ** 2).mean() / 2
        norm = scaler(loss, opt, update_grad=half.start == 4)
    assert norm is not None
    ref, ref_opt, _, _ = _setup()
    ref_norm = GradScalerWithNorm(enabled=False)(((ref(x) - y) ** 2).mean(), ref_opt)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-5)
    assert torch.allclose(model.weight, ref.weight, atol=1e-6)


def test_update_grad_false_only_accumulates():
    model, opt, x, y = _setup()
    before = model.weight.detach().clone()
    assert GradScalerWithNorm(enabled=False)(((model(x) - y) ** 2).mean(), opt, update_grad=False) is None
    assert torch.equal(model.weight, before) and model.weight.grad is not None


def test_non_finite_gradients_are_reported():
    model, opt, x, y = _setup()
    scaler = GradScalerWithNorm(enabled=False)
    scaler((model(x) * float('inf')).sum(), opt)
    assert not scaler.last_grad_finite


def test_state_dict_without_loss_scaling_is_empty_and_loading_it_is_a_no_op():
    scaler = GradScalerWithNorm(enabled=False)
    assert scaler.state_dict() == {} and scaler.get_scale() == 1.0
    assert scaler.load_state_dict({'scale': 1024.0, '_growth_tracker': 0}) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason='float16 loss scaling needs CUDA')
def test_float16_scaler_skips_a_step_with_inf_gradients_and_round_trips():
    model = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScalerWithNorm(enabled=True)
    before = model.weight.detach().clone()
    with torch.autocast('cuda', dtype=torch.float16):
        loss = (model(torch.randn(8, 4, device='cuda')) * float('inf')).sum()
    scaler(loss, opt, clip_grad=5.0)
    assert scaler.last_step_skipped and torch.equal(model.weight, before)
    assert scaler.get_scale() == 2.0 ** 15  # halved from 2**16
    fresh = GradScalerWithNorm(enabled=True)
    assert fresh.load_state_dict(scaler.state_dict()) and fresh.get_scale() == 2.0 ** 15


def test_without_loss_scaling_a_step_with_nan_gradients_is_not_applied():
    model, opt, x, y = _setup()
    before = model.weight.detach().clone()
    scaler = GradScalerWithNorm(enabled=False)
    loss = ((model(x) - y) ** 2).mean() * float('nan')
    norm = scaler(loss, opt)
    assert not torch.isfinite(norm) and scaler.last_step_skipped
    assert torch.equal(model.weight, before)
