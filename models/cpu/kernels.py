"""CPU kernels of our own for the training step (and bf16 evaluation), built on first use for the machine that
runs them. Each has a ``*_serves`` test and falls back to the standard ops, with the same results to float rounding.

* :func:`bias_softmax`: the window attention adds the relative position bias (and the shift mask) to the logits,
  then takes the softmax: two PyTorch kernels, the second of which pays a fixed cost per row that dominates on
  Swin's 49-wide rows. Here both are one pass, with PyTorch's numerics.
* :func:`layer_norm`: forward and backward in one pass each; in bf16 the weight and bias gradients are summed in
  fp32 (PyTorch's come out far less precise).
* :func:`gelu_linear`: ``fc2(gelu(h))`` in the MLP. One pass computes the GELU and its derivative, which is kept
  for backward instead of ``h``; the backward then multiplies by it inside the product that computes the gradient
  (a oneDNN post-op), so there is no separate GELU backward pass over the MLP's widest tensor.
* :func:`linear_grads`: a linear layer's weight (and bias) gradient in bf16, with the smaller operand transposed
  first by :func:`transpose` (oneDNN reads a transposed operand at about half speed).

All are in ``csrc/cpu_kernels.cpp`` (AVX-512).

The source is compiled with the system C++ compiler (``$CXX``, else ``c++``) and ``-march=native`` the first time it
is needed, into ``$SWIN_KERNEL_CACHE`` (default ``~/.cache/swin_transformer/kernels``), under a name that hashes the
source, the compiler and the CPU's flags, so a shared home directory serves nodes of different CPUs. It links the
OpenMP runtime ``libgomp.so.1``, the one PyTorch's Linux wheels load (so no second runtime starts), and runs on
``torch.get_num_threads()`` threads. Where there is no compiler, no AVX-512 or ``SWIN_CPU_KERNELS=0``, the standard
ops run instead.

Backward through backward (``create_graph=True``, gradient penalties): LayerNorm and the linear layers' gradients
then take the standard ops, which carry a graph; the softmax and the GELU fusion keep only what their first
backward needs and raise if differentiated twice, so a gradient penalty through them needs ``SWIN_CPU_KERNELS=0``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dispatch import compute_dtype, grad_needed, standard_ops_expected

__all__ = ['library', 'bias_softmax', 'bias_softmax_reference', 'bias_softmax_serves', 'gelu_linear',
           'gelu_linear_serves', 'gelu_with_derivative', 'layer_norm', 'layer_norm_serves', 'transpose', 'linear_grads']

_SOURCE = Path(__file__).with_name('csrc') / 'cpu_kernels.cpp'
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-shared', '-fPIC', '-std=c++17']
_SOFTMAX = {torch.float32: 'bias_softmax_f32', torch.bfloat16: 'bias_softmax_bf16'}
_GELU = {torch.bfloat16: 'gelu_with_derivative_bf16'}  # in fp32 the fusion measured no gain
_LAYER_NORM = {torch.float32: 'f32', torch.bfloat16: 'bf16'}


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


def _build(compiler: list, target: Path) -> None:
    """Compile to a temporary name, then rename: ranks starting together never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*compiler, *_FLAGS, str(_SOURCE), '-o', tmp], check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built if needed; None where they cannot serve (see the module docstring)."""
    if os.environ.get('SWIN_CPU_KERNELS', '1') == '0' or platform.machine().lower() not in ('x86_64', 'amd64'):
        return None
    compiler = shlex.split(os.environ.get('CXX') or 'c++')  # e.g. "ccache g++"
    if not compiler or shutil.which(compiler[0]) is None:
        if os.environ.get('CXX'):
            warnings.warn(f"CPU kernels not built: CXX={os.environ['CXX']!r} not found; the standard ops run instead")
        return None
    try:
        version = subprocess.run([*compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256('\0'.join([_SOURCE.read_text(), ' '.join(compiler), version, ' '.join(_FLAGS),
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
    for name in _SOFTMAX.values():
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    for name in _GELU.values():
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
        getattr(lib, name).restype = None
    lib.transpose_16bit.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.transpose_16bit.restype = None
    for suffix in _LAYER_NORM.values():
        forward, backward = getattr(lib, f'layer_norm_forward_{suffix}'), getattr(lib, f'layer_norm_backward_{suffix}')
        forward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        backward.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_int]
        forward.restype = backward.restype = None
    return lib


def bias_softmax_serves(logits: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`bias_softmax` runs our kernel for these tensors (else the standard ops)."""
    return (logits.device.type == 'cpu' and logits.dtype in _SOFTMAX and bias.dtype == logits.dtype
            and bias.device == logits.device and logits.numel() > 0 and logits.dim() >= 2
            and not standard_ops_expected(logits, bias) and library() is not None
            and logits.shape[-1] <= library().bias_softmax_max_row())


class _BiasSoftmax(torch.autograd.Function):
    """Forward: the fused kernel. Backward: PyTorch's softmax backward; the bias gets its sum over the batch."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        logits, bias = logits.contiguous(), bias.contiguous()
        out = torch.empty_like(logits)
        n = logits.shape[-1]
        if getattr(library(), _SOFTMAX[logits.dtype])(logits.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                                     logits.numel() // n, n, bias.numel() // n,
                                                     torch.get_num_threads()):
            raise RuntimeError(f"bias_softmax kernel refused logits {tuple(logits.shape)}, bias {tuple(bias.shape)}")
        ctx.save_for_backward(out)
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    @once_differentiable  # out carries no graph back to the logits: a second derivative would be wrong
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
    if logits.dim() < 2 or logits.shape[1:] != bias.shape[1:] or bias.shape[0] == 0 or logits.shape[0] % bias.shape[0]:
        raise ValueError(f"bias {tuple(bias.shape)} does not repeat over logits {tuple(logits.shape)}")
    if not bias_softmax_serves(logits, bias):
        return bias_softmax_reference(logits, bias)
    return _BiasSoftmax.apply(logits, bias)


def _linear_mul_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


_LINEAR_MUL = _linear_mul_available()


def gelu_linear_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gelu_linear` may take ``F.linear(F.gelu(x), weight, ...)``: a gradient is needed (evaluation
    has its own fused path), on the CPU in bf16 (autocast or not), oneDNN on, nothing compiling or watching."""
    dtype = compute_dtype(x)
    return (grad_needed(x, weight) and x.device.type == 'cpu' and dtype == torch.bfloat16
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16)
            and _LINEAR_MUL and torch.backends.mkldnn.enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and not standard_ops_expected(x, weight) and library() is not None)


def gelu_with_derivative(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact GELU of a bf16 CPU tensor and its derivative, in one pass of our kernel (no autograd)."""
    if x.dtype not in _GELU or x.device.type != 'cpu' or library() is None:
        raise ValueError(f"gelu_with_derivative takes {list(_GELU)} CPU tensors where the kernels are built, "
                         f"got {x.dtype} on {x.device}")
    x = x.contiguous()
    y, dydx = torch.empty_like(x), torch.empty_like(x)
    getattr(library(), _GELU[x.dtype])(x.data_ptr(), y.data_ptr(), dydx.data_ptr(), x.numel(), torch.get_num_threads())
    return y, dydx


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(x), weight, bias)``; keeps gelu(x) and gelu'(x) for backward, where the gradient of x is
    ``(grad @ weight) * gelu'(x)`` in one oneDNN product with a multiply post-op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        y, dydx = gelu_with_derivative(x)
        ctx.save_for_backward(y, dydx, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(y, weight, bias, 'none', [], '')

    @staticmethod
    @once_differentiable  # gelu'(x) and gelu(x) carry no graph back to x: a second derivative would be wrong
    def backward(ctx, grad: torch.Tensor):
        y, dydx, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            # (grad @ weight) * gelu'(x): a linear whose weight is weight^T, with oneDNN's binary multiply post-op
            grad_x = torch.ops.mkldnn._linear_pointwise.binary(grad, dydx.view(-1, dydx.shape[-1]), weight.t(),
                                                                None, 'mul').view(dydx.shape)
        grad_w, grad_b = linear_grads(grad, y.reshape(-1, y.shape[-1]), weight=ctx.needs_input_grad[1],
                                      bias=ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(F.gelu(x), weight, bias)`` (exact GELU; autocast's casts included) where
    :func:`gelu_linear_serves`, else those standard ops."""
    if not gelu_linear_serves(x, weight):
        return F.linear(F.gelu(x), weight, bias)
    dtype = compute_dtype(x)
    # autocast leaves custom functions alone: the casts it would make, made here (and kept by autograd)
    return _GeluLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def layer_norm_serves(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`layer_norm` runs our kernels: a non-empty CPU fp32/bf16 input normalised over its last
    dimension, fp32 weight and bias of that size, nothing compiling or watching. Anything else (a mismatched size
    included, which PyTorch then reports) goes to ``F.layer_norm``."""
    return (x.device.type == 'cpu' and x.dtype in _LAYER_NORM and x.numel() > 0
            and tuple(normalized_shape) == tuple(x.shape[-1:])
            and weight is not None and bias is not None and weight.dtype == bias.dtype == torch.float32
            and weight.shape == bias.shape == x.shape[-1:] and weight.device == bias.device == x.device
            and not standard_ops_expected(x, weight) and library() is not None)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the last dimension; forward keeps the per-row mean and 1/std, backward gives all three
    gradients in one pass (per-thread partial sums for the weight and bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        y = torch.empty_like(x)
        mean, rstd = (x.new_empty(rows, dtype=torch.float32) for _ in range(2))
        getattr(library(), f'layer_norm_forward_{_LAYER_NORM[x.dtype]}')(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows, n,
            eps, torch.get_num_threads())
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        n = x.shape[-1]
        if torch.is_grad_enabled():  # create_graph: PyTorch's backward, whose result carries a graph
            stats = x.shape[:-1] + (1,)
            return (*torch.ops.aten.native_layer_norm_backward(grad, x, [n], mean.view(stats), rstd.view(stats),
                                                               weight, bias, [True, True, True]), None)
        grad = grad.contiguous()
        threads = torch.get_num_threads()
        partial = torch.zeros(threads, 2, n, dtype=torch.float32)
        dx = torch.empty_like(x)
        getattr(library(), f'layer_norm_backward_{_LAYER_NORM[x.dtype]}')(
            grad.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.data_ptr(), dx.data_ptr(),
            partial.data_ptr(), x.numel() // n, n, threads)
        dweight, dbias = partial.sum(0)
        return dx, dweight, dbias, None


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm``: our kernels where :func:`layer_norm_serves`, else PyTorch's."""
    if not layer_norm_serves(x, normalized_shape, weight, bias):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)


def transpose(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x.t().contiguous()`` for a 2-D bf16 CPU tensor, by our tiled kernel (PyTorch's transposing copy of bf16
    is several times slower); written into the leading rows of ``out`` when given."""
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.device.type != 'cpu' or library() is None:
        raise ValueError(f"transpose takes a 2-D bf16 CPU tensor where the kernels are built, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    if out is None:
        out = x.new_empty(x.shape[1], x.shape[0])
    elif not (out.is_contiguous() and out.dtype == x.dtype and out.shape[0] >= x.shape[1]
              and out.shape[1:] == x.shape[:1]):
        raise ValueError(f"transpose: out {tuple(out.shape)} cannot hold the transpose of {tuple(x.shape)}")
    library().transpose_16bit(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return out


def linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: bool = True,
                 bias: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad.t() @ x if weight, grad.sum(0) if bias)`` (None for what is not asked) for ``(M, N)`` and
    ``(M, K)``: a linear layer's weight and bias gradients, summed over the M tokens.

    oneDNN reads the transposed operand of such a product at about half the speed of a contiguous one, so in bf16
    on the CPU the smaller operand is transposed first by :func:`transpose`. With N <= K that is ``grad``. Else it
    is ``x``, written above a row of ones: the product with ``grad`` then carries the bias gradient as its last row
    (no separate pass over ``grad``), and the weight-sized rest is transposed back."""
    if not weight:
        return None, grad.sum(0) if bias else None
    if grad.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or grad.device.type != 'cpu' \
            or torch.is_grad_enabled() or standard_ops_expected(grad, x) or library() is None:
        # (grad enabled inside a backward: create_graph, and only the standard ops carry a graph)
        return grad.t() @ x, grad.sum(0) if bias else None
    if grad.shape[1] <= x.shape[1]:
        return transpose(grad) @ x, grad.sum(0) if bias else None
    tokens, k = x.shape
    stacked = transpose(x, x.new_empty(k + int(bias), tokens))
    if bias:
        stacked[k].fill_(1.0)
    product = stacked @ grad
    return transpose(product[:k]), product[k] if bias else None
