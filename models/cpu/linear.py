"""CPU linears of the swapped Swin modules: low-precision weight caches, oneDNN linears (with the GELU fused in
evaluation).

Under autocast every ``nn.Linear`` casts its fp32 weight to bf16/fp16 on every call, and an MLP writes
its hidden activations twice (the product, then the GELU). Where no gradient is needed (evaluation,
``torch.no_grad``) the CPU modules (:mod:`models.cpu.modules`) call :func:`linear` instead:

* the weight and bias are cast once and kept (:class:`CastCache`) until the parameter changes;
* on the CPU, a linear followed by the exact GELU runs as one oneDNN primitive with the GELU as its
  post-op (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile itself emits for this pair),
  same results to float rounding.

With gradients on, :func:`linear` is :func:`dense` (+ the GELU): on the CPU in fp32/bf16, a linear
whose forward adds the bias as oneDNN writes the product (addmm first copies the bias into its output,
then accumulates the product onto it: two more passes over every linear's output), with the backward
products autograd would compute for ``F.linear``; elsewhere ``F.linear`` itself.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .dispatch import compute_dtype, grad_needed, standard_ops_expected

__all__ = ['compute_dtype', 'grad_needed', 'applies', 'CastCache', 'CastCacheMixin', 'linear', 'dense']


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the evaluation fast paths may serve a computation on ``tensors``: no gradient is needed and
    nothing expects the standard ops."""
    return not (grad_needed(*tensors) or standard_ops_expected(*tensors))


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


_ONEDNN_LINEAR = _onednn_linear_available()
# bf16 only where the CPU computes it natively (AVX512-BF16 / AMX), as torch.compile decides for this kernel
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN_LINEAR and
                                     torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def _onednn_serves(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product (``mkldnn::_linear_pointwise``) takes a linear of ``x`` computed in
    ``dtype``: a CPU tensor, oneDNN on (``torch.backends.mkldnn.flags``), fp32 or natively supported bf16."""
    return (_ONEDNN_LINEAR and torch.backends.mkldnn.enabled and x.device.type == 'cpu'
            and x.dtype in _ONEDNN_DTYPES and dtype in _ONEDNN_DTYPES)


class CastCache:
    """Values derived from parameters, kept while no gradient is needed and the parameters are unchanged.

    An entry is keyed by a name plus the storage, version counter, device and dtype of the tensors it was
    computed from, so an in-place optimizer step or a ``.to()`` makes it stale. Fused optimizers (torch's
    fused AdamW) update parameters without bumping the version counter, so the owner also calls
    :meth:`clear` at every switch between training and evaluation.
    """

    def __init__(self):
        self._entries: Dict[str, Tuple[tuple, object]] = {}

    @staticmethod
    def _key(tensors, extra) -> tuple:
        # tensors made under torch.inference_mode have no version counter; nothing outside it can change them
        return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.device, t.dtype)
                     for t in tensors if t is not None) + (extra,)

    def get(self, name: str, tensors, extra, compute):
        """``compute()``, or what it returned last time for the same ``name``, ``tensors`` and ``extra``."""
        key = self._key(tensors, extra)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.autocast(tensors[0].device.type, enabled=False):
                # the entry holds its source tensors: while it lives, no new tensor can take a source's address
                # (a dynamic-size model's shift masks come and go) and be mistaken for it
                entry = (key, compute(), tuple(tensors))
            self._entries[name] = entry
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


class CastCacheMixin:
    """For the CPU modules whose fast path keeps values derived from their weights: :meth:`adopt` gives the module its
    :class:`CastCache`, ``_cache``, which is dropped at every switch between training and evaluation (fused
    optimizers leave no trace in the version counter)."""

    def adopt(self) -> None:
        """Called by :func:`models.cpu.accelerate` once the module has become its CPU class (no ``__init__`` runs)."""
        self._cache = CastCache()

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)


def _cast_params(layer: nn.Linear, dtype: torch.dtype, cache: CastCache, name: str):
    w, b = layer.weight, layer.bias
    if w.dtype == dtype and (b is None or b.dtype == dtype):
        return w, b
    return cache.get(name, (w, b), dtype, lambda: (w.to(dtype), None if b is None else b.to(dtype)))


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with the bias added in oneDNN's epilogue; backward: grad @ W, then grad^T @ x and sum(grad)
    through :func:`~models.cpu.kernels.linear_grads`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = kernels.linear_grads(grad, x.reshape(-1, x.shape[-1]), weight=ctx.needs_input_grad[1],
                                                  bias=ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b


def dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (autocast's casts included), through :class:`_OneDnnLinear` on the
    CPU in fp32/bf16 outside compilation and dispatch modes (which expect the standard op)."""
    dtype = compute_dtype(x)
    if not _onednn_serves(x, dtype) or standard_ops_expected(x):
        return F.linear(x, weight, bias)
    # autocast casts fp32 weights; without it, a dtype mismatch is F.linear's error to raise, not ours to hide
    if weight.dtype not in (_ONEDNN_DTYPES if torch.is_autocast_enabled('cpu') else (x.dtype,)):
        return F.linear(x, weight, bias)
    # autocast leaves custom functions alone: the casts it would make, made here (and kept by autograd)
    bias = None if bias is None else bias.to(dtype)
    return _OneDnnLinear.apply(x.to(dtype).contiguous(), weight.to(dtype), bias)


def linear(x: torch.Tensor, layer: nn.Linear, cache: CastCache, name: str, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, followed by the exact GELU when ``gelu``; the fast path (weights cast once, kept in
    ``cache`` under ``name``) where no gradient is needed, :func:`dense` otherwise."""
    if not applies(layer.weight, x):
        y = dense(x, layer.weight, layer.bias)
        return F.gelu(y) if gelu else y
    dtype = compute_dtype(x)
    w, b = _cast_params(layer, dtype, cache, name)
    x = x.to(dtype)
    if _onednn_serves(x, dtype):
        # oneDNN adds the bias (and applies the GELU) as the product is written: no pass to copy the bias
        # into the output first, as addmm does
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, 'gelu', [], 'none')
        return torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')
    y = F.linear(x, w, b)  # everything already in the compute dtype: autocast casts nothing
    return F.gelu(y) if gelu else y
