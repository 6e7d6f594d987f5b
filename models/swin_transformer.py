"""Swin Transformer (V1): hierarchical vision transformer with shifted windows.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
Parameter and buffer names follow the official release, so its checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, fast_path
from .fast_path import CastCache, CastCacheMixin, compute_dtype
from .layers import (BasicLayer, DerivedBuffersMixin, DropPath, HierarchicalClassifierMixin, LayerNorm, Mlp,
                     PatchMerging, clip_window, drop_path_rates, init_weights, relative_position_index,
                     shifted_window_mask, to_2tuple, trunc_normal_, window_order_index)
from .registry import register_model

__all__ = ['WindowAttention', 'SwinTransformerBlock', 'SwinTransformer']

# Evaluation repeats a shifted block's bias + mask over up to this many bytes' worth of images (see
# WindowAttention._fused_attention): a batch of 8 at 224 px fits in one call in fp32 and bf16.
_BIAS_BYTES = 16 << 20


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


class WindowAttention(CastCacheMixin, DerivedBuffersMixin, nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias.

    The bias comes from ``relative_position_bias_table`` ((2Wh-1)*(2Ww-1) offsets x heads), looked up
    through the derived buffer ``relative_position_index``.
    """

    _derived_buffers = ('relative_position_index',)

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._cache = CastCache()  # what evaluation derives from the weights (see attention_bias)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(nH, N, N)`` bias added to the attention logits of every window."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()

    def attention_bias(self, mask: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``(nW or 1, nH, N, N)``: the relative position bias plus the shift ``mask`` (``(nW, N, N)``), in
        ``dtype`` (default: the table's).

        Where no gradient can reach the table (evaluation, ``torch.no_grad``) the sum is computed once and
        reused until the table changes (see :class:`~models.fast_path.CastCache`); otherwise it is rebuilt
        so that the table gets its gradient.
        """
        table = self.relative_position_bias_table
        dtype = dtype or table.dtype
        if not fast_path.applies(table):
            return self._attention_bias(mask).to(dtype)
        return self._cache.get('bias', (table, mask), dtype, lambda: self._attention_bias(mask).to(dtype))

    def _attention_bias(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bias = self.relative_position_bias().unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1)

    def forward_windows(self, x: torch.Tensor, num_windows: int, attn_bias: torch.Tensor) -> torch.Tensor:
        """x: ``(B, nW * N, C)``, the tokens of each image window after window; attn_bias: from
        :meth:`attention_bias`. Returns the same layout."""
        if self.training or not fast_path.applies(self.qkv.weight, x):  # training mode: dropout applies
            return self._forward_windows_autograd(x, num_windows, attn_bias)
        b, l, c = x.shape
        n, nh, d = l // num_windows, self.num_heads, c // self.num_heads
        # q, k, v as strided (B*nW, nH, N, d) views of the qkv output: no copy in; the fused kernel
        # writes its output as (B*nW, N, nH, d), which is already the (B, L, C) the projection takes
        qkv = fast_path.linear(x, self.qkv, self._cache, 'qkv').view(b * num_windows, n, 3, nh, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        y = self._fused_attention(q, k, v, attn_bias)
        return fast_path.linear(y.transpose(1, 2).reshape(b, l, c), self.proj, self._cache, 'proj')

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attn_bias: torch.Tensor) -> torch.Tensor:
        """SDPA over ``(B*nW, nH, N, d)``. A per-window bias (shifted blocks) must match the leading dim, so it
        is repeated for a group of images (cached, at most ``_BIAS_BYTES``) and the batch runs group by group.
        In bf16 on a CPU our ``softmax(logits + bias)`` kernel serves, the products and that kernel beat SDPA's."""
        # attn_bias has the logits' dtype, device and row length: what decides whether the kernel serves
        if q.dtype == torch.bfloat16 and cpu_kernels.bias_softmax_serves(attn_bias, attn_bias):
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
        """softmax(scale q k^T + bias) v as two batched products around :func:`~models.cpu_kernels.bias_softmax`;
        q, k, v are strided ``(B*nW, nH, N, d)`` views, gathered into one contiguous copy first."""
        bw, nh, n, d = q.shape
        q, k, v = (t.flatten(0, 1) for t in torch.stack((q, k, v)))
        logits = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0, alpha=self.scale)
        probs = cpu_kernels.bias_softmax(logits.view(bw, nh, n, n), attn_bias)
        return torch.bmm(probs.view(-1, n, n), v).view(bw, nh, n, d)

    def _forward_windows_autograd(self, x: torch.Tensor, num_windows: int, attn_bias: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        n, nh = l // num_windows, self.num_heads
        folded = compute_dtype(x) != self.qkv.weight.dtype
        # under autocast the query scale is folded into the (small) weights: no pass over the queries, forward
        # or backward, and no extra memory, as the weights' cast copy is kept for backward anyway; in fp32 the
        # scaled copy would be an extra tensor kept, so there the scale is the product's alpha instead
        qkv = fast_path.dense(x, *(self._scaled_qkv_params() if folded else (self.qkv.weight, self.qkv.bias)))
        q, k, v = _SplitHeads.apply(qkv, num_windows, nh)
        if folded:
            attn = q @ k.transpose(-2, -1)  # B*nW, nH, N, N
        else:
            attn = torch.baddbmm(q.new_empty(()), q.flatten(0, 1), k.flatten(0, 1).transpose(-2, -1),
                                 beta=0, alpha=self.scale).view(-1, nh, n, n)
        # the sum stays in the logits' dtype: under autocast the softmax and the product with v then run
        # in bf16/fp16 without casts of (B*nW, nH, N, N) tensors (the softmax accumulates in fp32); on the CPU
        # the add and the softmax are one pass (models/cpu_kernels.py)
        attn = cpu_kernels.bias_softmax(attn, attn_bias.to(attn.dtype))
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        x = (attn @ v).transpose(1, 2).reshape(b, l, c)
        return self.proj_drop(fast_path.dense(x, self.proj.weight, self.proj.bias))

    def _scaled_qkv_params(self):
        """``qkv``'s weight and bias with the query rows multiplied by ``scale`` (rounding aside, the same logits).

        One multiply by a per-row factor (``scale`` for query rows, 1 for the rest), whose backward is one
        multiply too: slicing and concatenating would zero-fill and copy whole weight gradients in backward.
        """
        w, bias = self.qkv.weight, self.qkv.bias
        rows = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        rows[:self.dim] = self.scale
        return w * rows[:, None], None if bias is None else bias * rows

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B * nW, N, C)``; mask: ``(nW, N, N)`` additive, or None."""
        bw, n, c = x.shape
        nw = 1 if mask is None else mask.shape[0]
        y = self.forward_windows(x.reshape(bw // nw, nw * n, c), nw, self.attention_bias(mask, compute_dtype(x)))
        return y.view(bw, n, c)

    def flops(self, n: int) -> int:
        """Multiply-adds for one window of ``n`` tokens (official formula)."""
        return (n * self.dim * 3 * self.dim + 2 * self.num_heads * n * (self.dim // self.num_heads) * n
                + n * self.dim * self.dim)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'


class SwinTransformerBlock(DerivedBuffersMixin, nn.Module):
    """Pre-norm block: (shifted) window attention, then an MLP, each in a residual branch.

    Where the stage is no larger than ``window_size`` the window shrinks to the stage and the shift is
    dropped (official rule). ``attn_mask`` (shifted blocks only) is derived, not saved.
    """

    _derived_buffers = ('attn_mask',)

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.window_size, self.shift_size = clip_window(self.input_resolution, window_size, shift_size)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size {self.shift_size} must be in [0, window_size {self.window_size})")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        mask = (shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)
                if self.shift_size > 0 else None)
        self.register_buffer('attn_mask', mask, persistent=False)
        self.num_windows = self.input_resolution[0] * self.input_resolution[1] // self.window_size ** 2

    def window_order(self) -> torch.Tensor:
        """Row-major index of each token in the order this block's windows see them (CPU)."""
        return window_order_index(self.input_resolution, self.window_size, self.shift_size, device='cpu')

    def forward_windowed(self, x: torch.Tensor) -> torch.Tensor:
        """The block on tokens already in :meth:`window_order` (what a stage passes); same order out."""
        bias = self.attn.attention_bias(self.attn_mask, compute_dtype(x))
        y = self.attn.forward_windows(self.norm1(x), self.num_windows, bias)
        x = self.drop_path.residual(x, y)
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Row-major tokens ``(B, H*W, C)`` in and out."""
        h, w = self.input_resolution
        if x.shape[1] != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {x.shape[1]}")
        order = self.window_order().to(x.device)
        return self.forward_windowed(x[:, order])[:, torch.argsort(order)]

    def flops(self) -> int:
        h, w = self.input_resolution
        num_windows = h * w // (self.window_size * self.window_size)
        return (2 * self.dim * h * w + num_windows * self.attn.flops(self.window_size * self.window_size)
                + int(2 * h * w * self.dim * self.dim * self.mlp_ratio))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')


class SwinTransformer(HierarchicalClassifierMixin, nn.Module):
    """Swin Transformer classifier: patch embedding, 4 stages (patch merging at the end of the first
    three), final LayerNorm, average pooling, linear ``head``.

    Arguments keep the official names. ``fused_window_process`` is accepted for compatibility with
    official configs: what the official fused CUDA kernel did (shift and partition in one pass) every
    stage here does always, on any device, by keeping its tokens in window order
    (:class:`~models.layers.WindowOrder`); the flag changes nothing.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_layer: type = LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.init_stem(img_size, patch_size, in_chans, num_classes, embed_dim, depths, window_size, mlp_ratio,
                       drop_rate, norm_layer, ape, patch_norm)

        dpr = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            res = (self.patches_resolution[0] // 2 ** i, self.patches_resolution[1] // 2 ** i)
            first = sum(depths[:i])
            blocks = [SwinTransformerBlock(dim, res, num_heads[i], window_size=window_size,
                                           shift_size=0 if j % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                           qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                                           attn_drop=attn_drop_rate, drop_path=dpr[first + j], norm_layer=norm_layer)
                      for j in range(depth)]
            downsample = PatchMerging(res, dim, norm_layer) if i < self.num_layers - 1 else None
            self.layers.append(BasicLayer(blocks, downsample, use_checkpoint=use_checkpoint))

        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        return {'relative_position_bias_table'}


def _swin(name: str, default_img_size: int, **defaults):
    """Register ``name`` as a SwinTransformer with these defaults (any argument can be overridden)."""
    def fn(**kwargs) -> SwinTransformer:
        return SwinTransformer(**{'img_size': default_img_size, **defaults, **kwargs})
    fn.__name__ = name
    fn.__doc__ = f"Swin Transformer {name} (official configuration; keyword arguments override it)."
    return register_model(fn)


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2)
for _size, _arch in (('tiny', _T), ('small', _S), ('base', _B), ('large', _L)):
    _swin(f'swin_{_size}_patch4_window7_224', 224, window_size=7, **_arch)
    _swin(f'swin_{_size}_patch4_window12_384', 384, window_size=12, **_arch)
    _swin(f'swin_{_size}_patch4_window7_224_22k', 224, window_size=7, num_classes=21841,
          **{**_arch, 'drop_path_rate': 0.1 if _size == 'tiny' else 0.2})
