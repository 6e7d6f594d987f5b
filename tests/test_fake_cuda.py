"""The CUDA training step traced on fake ``cuda`` tensors (``FakeTensorMode``), without a GPU: tiny V1 and V2
models forward under CUDA autocast in fp16 and bf16, then our grad scaler and fused AdamW step over stand-in
gradients (no backward: autograd's engine needs a real device).

What it catches: a tensor left on the CPU (a derived buffer, a mask built on the wrong device: fake tensors refuse
ops across devices), dtype mismatches under CUDA autocast, and device-to-host synchronisations in the step
(``.item()``, ``bool()`` of a tensor: a fake tensor has no value to give). What it cannot see: kernels (which SDPA
backend runs, numerics), speed, memory, NCCL, the backward pass, anything decided by real values.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from utils.amp import GradScalerWithNorm

TINY = dict(img_size=32, patch_size=4, num_classes=3, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)


def _fake_cuda_works() -> bool:
    """Whether this torch's fake tensors stand in for CUDA without a driver (2.6 initialises CUDA on ``.to``)."""
    layer = torch.nn.Linear(2, 2)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer.to('cuda')
        return True
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _fake_cuda_works(), reason="this torch's fake tensors need a CUDA driver")
FAMILIES = {'v1': lambda: SwinTransformer(**TINY), 'v2': lambda: SwinTransformerV2(**TINY, pretrained_window_sizes=[0, 0])}


@contextlib.contextmanager
def cuda_as_if_present(model: torch.nn.Module):
    """torch.autocast('cuda') and GradScaler switch themselves off without a driver: tell them there is one.
    ``backward()`` puts stand-in gradients on the model's parameters instead of running autograd's engine."""
    def stand_in_backward(loss, *args, **kwargs):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    with mock.patch('torch.cuda.is_available', lambda: True), \
            mock.patch('torch.cuda.is_bf16_supported', lambda *a, **k: True), \
            mock.patch('torch.cuda.is_current_stream_capturing', lambda: False), \
            mock.patch.object(torch.Tensor, 'backward', stand_in_backward):
        yield


def train_step_on_fake_cuda(model: torch.nn.Module, amp_dtype: torch.dtype) -> dict:
    """One training step and one evaluation forward of ``model`` (on fake cuda) as engine.py runs them; returns
    the devices and dtypes seen."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # what build_optimizer picks on CUDA
    images, targets = torch.randn(2, 3, 32, 32, device='cuda'), torch.tensor([0, 2], device='cuda')
    with cuda_as_if_present(model):
        scaler = GradScalerWithNorm(enabled=amp_dtype == torch.float16, device_type='cuda')
        assert scaler.enabled == (amp_dtype == torch.float16)
        model.train()
        with torch.autocast('cuda', dtype=amp_dtype):
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, targets)
        norm = scaler(loss, optimizer, clip_grad=5.0, parameters=model.parameters())
        model.eval()
        with torch.no_grad(), torch.autocast('cuda', dtype=amp_dtype):
            eval_logits = model(images)
    return {'logits': (logits.device.type, logits.dtype), 'eval_logits': (eval_logits.device.type, eval_logits.dtype),
            'norm': norm.device.type, 'skipped': scaler.last_skipped.device.type,
            'weights': {p.device.type for p in model.parameters()}}


@pytest.mark.parametrize('amp_dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('family', FAMILIES)
def test_the_training_step_runs_on_fake_cuda_without_a_host_sync(family, amp_dtype):
    model = FAMILIES[family]()
    with FakeTensorMode(allow_non_fake_inputs=True):
        seen = train_step_on_fake_cuda(model.to('cuda'), amp_dtype)
    assert seen['logits'] == seen['eval_logits'] == ('cuda', amp_dtype)
    assert seen['norm'] == seen['skipped'] == 'cuda' and seen['weights'] == {'cuda'}


@pytest.mark.parametrize('family', FAMILIES)
def test_a_derived_buffer_left_on_the_cpu_is_caught(family):
    """The check has teeth: a shifted block's attention mask that stays on the CPU while the model moves fails."""
    model = FAMILIES[family]()
    shifted = model.layers[0].blocks[1]
    assert shifted.shift_size > 0
    cpu_mask = shifted.attn_mask.clone()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to('cuda')
        shifted.attn_mask = cpu_mask  # as a mask rebuilt without the device would be
        with pytest.raises(RuntimeError, match='device'):
            train_step_on_fake_cuda(model, torch.bfloat16)


def test_a_host_sync_in_the_step_is_caught():
    """Reading a value on the host inside the step (what a plain, non-fused optimizer does with found_inf) fails."""
    model = FAMILIES['v1']()
    with FakeTensorMode(allow_non_fake_inputs=True), \
            mock.patch('torch.optim.AdamW', lambda params, **kw: torch.optim.SGD(params, lr=1e-3)):
        with pytest.raises(Exception, match='local_scalar_dense'):
            train_step_on_fake_cuda(model.to('cuda'), torch.bfloat16)
