"""CPU versions of the reference modules, swapped in by :func:`models.cpu.accelerate`.

Each subclasses the module it replaces, keeps its parameters, buffers and state-dict keys, and computes the
same function to float rounding. Each falls back to the reference ``forward`` where it cannot serve: tensors
off the CPU, or something that expects the standard ops (torch.compile, tracing, the meta device, a dispatch
mode, functorch; see :func:`models.cpu.dispatch.standard_ops_expected`).

Each says ``impl=cpu`` in the printed model (the reference modules it replaces say ``impl=reference``; a plain
``nn.LayerNorm`` says nothing): where a module says ``impl=cpu``, the forward here runs, not the reference one, so
an edit to the reference forward changes nothing there.

* :class:`LayerNorm`: our one-pass forward and backward kernels (:func:`models.cpu.kernels.layer_norm`).
* :class:`Mlp`: ``fc1`` + GELU as one oneDNN primitive in evaluation, the GELU kernel fused with ``fc2``'s
  backward in bf16 training, oneDNN linears that add their bias in the epilogue (:mod:`models.cpu.linear`).
* :class:`WindowAttention` (Swin V1): in evaluation SDPA on strided views of the qkv output with the bias + mask
  computed once and cached, or in bf16 two batched products around our ``softmax(logits + bias)`` kernel; in
  training explicit products around that kernel, the query scale folded into the weights, and a head split whose
  backward writes the three gradients in one pass.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import layers, swin_transformer
from . import kernels, linear
from .dispatch import compute_dtype, standard_ops_expected
from .linear import CastCacheMixin

__all__ = ['LayerNorm', 'Mlp', 'WindowAttention', 'SWAPS']

# Evaluation repeats a shifted block's bias + mask over up to this many bytes' worth of images (see
# WindowAttention._fused_attention): a batch of 8 at 224 px fits in one call in fp32 and bf16.
_BIAS_BYTES = 16 << 20


def _reference_expected(x: torch.Tensor) -> bool:
    """Whether the reference forward must run: the tensor is off the CPU, or the standard ops are expected."""
    return x.device.type != 'cpu' or standard_ops_expected(x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` through our kernels where they serve: in bf16 the weight and bias gradients are summed in
    fp32, and forward and backward each take one pass."""

    impl = 'cpu'

    def adopt(self) -> None:
        """Nothing to add to an ``nn.LayerNorm`` turned into this class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, impl={self.impl}'


class Mlp(CastCacheMixin, layers.Mlp):
    """The reference MLP with oneDNN linears; where no gradient is needed the weights' low-precision copies are
    cached and, with the exact GELU, ``fc1`` and the activation run as one fused kernel."""

    impl = 'cpu'

    def adopt(self) -> None:
        super().adopt()
        self._fused_gelu = type(self.act) is nn.GELU and self.act.approximate == 'none'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _reference_expected(x):
            return super().forward(x)
        if self._fused_gelu and (self.drop.p == 0.0 or not self.training) and \
                kernels.gelu_linear_serves(x, self.fc2.weight):  # a bf16 training step on an AVX-512 CPU
            x = linear.dense(x, self.fc1.weight, self.fc1.bias)
            return self.drop(kernels.gelu_linear(x, self.fc2.weight, self.fc2.bias))
        if self._fused_gelu:
            x = linear.linear(x, self.fc1, self._cache, 'fc1', gelu=True)
        else:
            x = self.act(linear.linear(x, self.fc1, self._cache, 'fc1'))
        x = self.drop(x)
        return self.drop(linear.linear(x, self.fc2, self._cache, 'fc2'))


class _SplitHeads(torch.autograd.Function):
    """The qkv output ``(B, L, 3C)`` (tokens in window order) -> q, k, v as ``(B*nW, nH, N, d)`` views of one
    contiguous copy (products of strided views would each copy their operand). Backward writes the three
    gradients straight back in the ``(B, L, 3C)`` layout, one pass: autograd's would stack them, then copy
    them out of the permuted layout."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, windows: int, heads: int):
        b, l, c3 = qkv.shape
        ctx.in_shape = qkv.shape
        split = qkv.view(b * windows, l // windows, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).contiguous()
        return split[0], split[1], split[2]

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        given = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        grads = [torch.zeros_like(given) if g is None else g for g in (grad_q, grad_k, grad_v)]
        return torch.stack([g.transpose(1, 2) for g in grads], dim=2).view(ctx.in_shape), None, None


class WindowAttention(CastCacheMixin, swin_transformer.WindowAttention):
    """Swin V1 window attention on the CPU (see the module docstring). Its cache holds what evaluation derives from
    the weights (see :meth:`attention_bias`)."""

    impl = 'cpu'

    def attention_bias(self, mask: Optional[torch.Tensor] = None,
                       window_size: Optional[Union[int, Tuple[int, int]]] = None,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The reference's bias + mask for ``window_size`` windows (default: the built ones) in ``dtype`` (default:
        the table's). Where no gradient can reach the table (evaluation, ``torch.no_grad``) the sum is computed
        once and reused until the table, the mask or the window changes."""
        table, reference = self.relative_position_bias_table, super().attention_bias
        dtype = dtype or table.dtype
        if not linear.applies(table):
            return reference(mask, window_size).to(dtype)
        return self._cache.get('bias', (table, mask), (dtype, window_size),
                               lambda: reference(mask, window_size).contiguous().to(dtype))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """x: ``(B * nW, N, C)``, the tokens of each ``window_size`` window (default: the built one); mask:
        ``(nW, N, N)`` additive, or None."""
        if _reference_expected(x):
            return super().forward(x, mask, window_size)
        bw, n, c = x.shape
        nw = 1 if mask is None else mask.shape[0]
        bias = self.attention_bias(mask, window_size, compute_dtype(x))
        y = self._forward_windows(x.reshape(bw // nw, nw * n, c), nw, bias)
        return y.view(bw, n, c)

    def _forward_windows(self, x: torch.Tensor, num_windows: int, attn_bias: torch.Tensor) -> torch.Tensor:
        """x: ``(B, nW * N, C)``, the tokens of each image window after window; attn_bias: from
        :meth:`attention_bias`. Returns the same layout."""
        if self.training or not linear.applies(self.qkv.weight, x):  # training mode: dropout applies
            return self._forward_windows_autograd(x, num_windows, attn_bias)
        b, l, c = x.shape
        n, nh, d = l // num_windows, self.num_heads, c // self.num_heads
        # q, k, v as strided (B*nW, nH, N, d) views of the qkv output: no copy in; the fused kernel
        # writes its output as (B*nW, N, nH, d), which is already the (B, L, C) the projection takes
        qkv = linear.linear(x, self.qkv, self._cache, 'qkv').view(b * num_windows, n, 3, nh, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        y = self._fused_attention(q, k, v, attn_bias)
        return linear.linear(y.transpose(1, 2).reshape(b, l, c), self.proj, self._cache, 'proj')

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attn_bias: torch.Tensor) -> torch.Tensor:
        """SDPA over ``(B*nW, nH, N, d)``. A per-window bias (shifted blocks) must match the leading dim, so it
        is repeated for a group of images (cached, at most ``_BIAS_BYTES``) and the batch runs group by group.
        In bf16 on a CPU our ``softmax(logits + bias)`` kernel serves, the products and that kernel beat SDPA's."""
        # attn_bias has the logits' dtype, device and row length: what decides whether the kernel serves
        if q.dtype == torch.bfloat16 and kernels.bias_softmax_serves(attn_bias, attn_bias):
            return self._explicit_attention(q, k, v, attn_bias)
        if attn_bias.shape[0] == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        nw, rows = attn_bias.shape[0], q.shape[0]
        images = max(1, min(rows // nw, _BIAS_BYTES // (attn_bias.numel() * attn_bias.element_size())))
        bias = self._cache.get('bias_repeated', (attn_bias,), images, lambda: attn_bias.repeat(images, 1, 1, 1))
        step = images * nw
        out = [F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step],
                                              attn_mask=bias[:min(step, rows - i)], scale=self.scale)
               for i in range(0, rows, step)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            attn_bias: torch.Tensor) -> torch.Tensor:
        """softmax(scale q k^T + bias) v as two batched products around :func:`~models.cpu.kernels.bias_softmax`;
        q, k, v are strided ``(B*nW, nH, N, d)`` views, gathered into one contiguous copy first."""
        bw, nh, n, d = q.shape
        q, k, v = (t.flatten(0, 1) for t in torch.stack((q, k, v)))
        logits = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0, alpha=self.scale)
        probs = kernels.bias_softmax(logits.view(bw, nh, n, n), attn_bias)
        return torch.bmm(probs.view(-1, n, n), v).view(bw, nh, n, d)

    def _forward_windows_autograd(self, x: torch.Tensor, num_windows: int, attn_bias: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        n, nh = l // num_windows, self.num_heads
        folded = compute_dtype(x) != self.qkv.weight.dtype
        # under autocast the query scale is folded into the (small) weights: no pass over the queries, forward
        # or backward, and no extra memory, as the weights' cast copy is kept for backward anyway; in fp32 the
        # scaled copy would be an extra tensor kept, so there the scale is the product's alpha instead
        qkv = linear.dense(x, *(self._scaled_qkv_params() if folded else (self.qkv.weight, self.qkv.bias)))
        q, k, v = _SplitHeads.apply(qkv, num_windows, nh)
        if folded:
            attn = q @ k.transpose(-2, -1)  # B*nW, nH, N, N
        else:
            attn = torch.baddbmm(q.new_empty(()), q.flatten(0, 1), k.flatten(0, 1).transpose(-2, -1),
                                 beta=0, alpha=self.scale).view(-1, nh, n, n)
        # the sum stays in the logits' dtype: under autocast the softmax and the product with v then run
        # in bf16 without casts of (B*nW, nH, N, N) tensors (the softmax accumulates in fp32); the add and the
        # softmax are one pass where our kernel serves
        attn = kernels.bias_softmax(attn, attn_bias.to(attn.dtype))
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        x = (attn @ v).transpose(1, 2).reshape(b, l, c)
        return self.proj_drop(linear.dense(x, self.proj.weight, self.proj.bias))

    def _scaled_qkv_params(self):
        """``qkv``'s weight and bias with the query rows multiplied by ``scale`` (rounding aside, the same logits).

        One multiply by a per-row factor (``scale`` for query rows, 1 for the rest), whose backward is one
        multiply too: slicing and concatenating would zero-fill and copy whole weight gradients in backward.
        """
        w, bias = self.qkv.weight, self.qkv.bias
        rows = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        rows[:self.dim] = self.scale
        return w * rows[:, None], None if bias is None else bias * rows


# reference class -> its CPU version (exact types: a subclass of a reference module may compute something else)
SWAPS = {nn.LayerNorm: LayerNorm, layers.Mlp: Mlp, swin_transformer.WindowAttention: WindowAttention}
