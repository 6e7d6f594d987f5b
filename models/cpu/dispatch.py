"""What decides which implementation of an op runs: the compute dtype, whether a gradient is needed, and whether
something (a compiler, the meta device, a dispatch mode) expects the standard PyTorch ops.

Shared by :mod:`models.cpu.linear` (oneDNN linears) and :mod:`models.cpu.kernels` (our own kernels).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ['compute_dtype', 'grad_needed', 'standard_ops_expected']

_AUTOCAST_DEVICES = ('cpu', 'cuda', 'xpu', 'mps')


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: the autocast dtype where autocast is on, else ``x``'s."""
    if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grad_needed(*tensors: torch.Tensor) -> bool:
    """Whether a result computed now from ``tensors`` must carry a gradient back to them."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def standard_ops_expected(*tensors: torch.Tensor) -> bool:
    """The standard ops only: something is being compiled (a compiled graph fuses by itself) or traced, the
    tensors hold no values (the meta device), a dispatch mode (FlopCounterMode, FakeTensorMode) is watching, or a
    functorch transform (vmap, grad, jvp) or forward-mode AD is active (our kernels define neither)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or any(t.is_meta for t in tensors)
            or _get_current_dispatch_mode() is not None or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0)
