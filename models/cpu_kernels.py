"""CPU kernels of our own, built on first use for the machine that runs them: a fused ``softmax(logits + bias)``.

The window attention's training step adds the relative position bias (and the shift mask) to the logits, then takes
the softmax: two PyTorch kernels, the second of which pays a fixed cost per row that dominates on Swin's 49-wide
rows. :func:`bias_softmax` does both in one pass (``csrc/cpu_kernels.cpp``, AVX-512), with PyTorch's numerics.

The source is compiled with the system C++ compiler (``$CXX``, else ``c++``) and ``-march=native`` the first time it
is needed, into ``$SWIN_KERNEL_CACHE`` (default ``~/.cache/swin_transformer/kernels``), under a name that hashes the
source, the compiler and the CPU's flags, so a shared home directory serves nodes of different CPUs. It links the
OpenMP runtime PyTorch already loaded and runs on ``torch.get_num_threads()`` threads. Where there is no compiler,
no AVX-512 or ``SWIN_CPU_KERNELS=0``, the standard ops run instead, with the same results to float rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from .fast_path import _standard_ops_expected

__all__ = ['library', 'bias_softmax', 'bias_softmax_reference', 'kernel_serves']

_SOURCE = Path(__file__).with_name('csrc') / 'cpu_kernels.cpp'
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-shared', '-fPIC', '-std=c++17']
_DTYPES = {torch.float32: 'bias_softmax_f32', torch.bfloat16: 'bias_softmax_bf16'}


def _cpu_flags() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get('SWIN_KERNEL_CACHE') or Path.home() / '.cache' / 'swin_transformer' / 'kernels')


def _build(compiler: str, target: Path) -> None:
    """Compile to a temporary name, then rename: ranks starting together never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), '-o', tmp], check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built if needed; None where they cannot serve (see the module docstring)."""
    if os.environ.get('SWIN_CPU_KERNELS', '1') == '0' or platform.machine().lower() not in ('x86_64', 'amd64'):
        return None
    compiler = shutil.which(os.environ.get('CXX', 'c++'))
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256('\0'.join([_SOURCE.read_text(), compiler, version, ' '.join(_FLAGS),
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f'cpu_kernels-{key}.so'
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"CPU kernels not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "the standard ops run instead")
        return None
    if not lib.kernels_available():
        return None
    lib.bias_softmax_max_row.restype = ctypes.c_int64
    for name in _DTYPES.values():
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = None
    return lib


def kernel_serves(logits: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`bias_softmax` runs our kernel for these tensors (else the standard ops)."""
    return (logits.device.type == 'cpu' and logits.dtype in _DTYPES and bias.dtype == logits.dtype
            and bias.device == logits.device and not _standard_ops_expected(logits, bias) and library() is not None
            and logits.shape[-1] <= library().bias_softmax_max_row())


class _BiasSoftmax(torch.autograd.Function):
    """Forward: the fused kernel. Backward: PyTorch's softmax backward; the bias gets its sum over the batch."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        logits, bias = logits.contiguous(), bias.contiguous()
        out = torch.empty_like(logits)
        n = logits.shape[-1]
        getattr(library(), _DTYPES[logits.dtype])(logits.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                                  logits.numel() // n, n, bias.numel() // n, torch.get_num_threads())
        ctx.save_for_backward(out)
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, = ctx.saved_tensors
        grad_logits = torch._softmax_backward_data(grad, out, -1, out.dtype)
        grad_bias = grad_logits.view(-1, *ctx.bias_shape).sum(0) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_bias


def bias_softmax_reference(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The standard ops :func:`bias_softmax` stands for."""
    return torch.add(logits.view(-1, *bias.shape), bias).view(logits.shape).softmax(dim=-1)


def bias_softmax(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(logits + bias, dim=-1)``: logits ``(B * W, *S)``, bias ``(W, *S)``, the same bias for every group of
    W leading rows (the attention's windows of one image). Our kernel where it serves, else the standard ops."""
    if logits.shape[1:] != bias.shape[1:] or logits.shape[0] % bias.shape[0]:
        raise ValueError(f"bias {tuple(bias.shape)} does not repeat over logits {tuple(logits.shape)}")
    if not kernel_serves(logits, bias):
        return bias_softmax_reference(logits, bias)
    return _BiasSoftmax.apply(logits, bias)
