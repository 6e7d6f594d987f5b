"""Swin Transformer (V1): hierarchical vision transformer with shifted windows.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
Parameter and buffer names follow the official release, so its checkpoints load unchanged.

A forward pass, top to bottom: :class:`SwinTransformer` (a :class:`~models.swin_base.SwinBase`) embeds 4x4 patches,
then runs four stages of :class:`SwinTransformerBlock`; each block cuts its map into windows (shifted by half a
window in every second block), runs :class:`WindowAttention` inside each window, and puts the map back together; a
stage ends with patch merging; the head averages the last stage's tokens.

On a CPU, :func:`models.build.build_model` runs :class:`models.cpu.modules.WindowAttention` in place of
:class:`WindowAttention` (same parameters, same function; ``impl=cpu`` in the printed model).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .layers import Mlp, PatchMerging, ShiftedWindowBlock, to_2tuple, trunc_normal_, window_attention
from .registry import register_model
from .swin_base import SwinBase
from .windows import derived_on, map_size, register_derived_buffer, relative_position_index

__all__ = ['WindowAttention', 'SwinTransformerBlock', 'SwinTransformer']


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias.

    The bias comes from ``relative_position_bias_table`` ((2Wh-1)*(2Ww-1) offsets x heads), looked up
    through the derived buffer ``relative_position_index``. A smaller window, decided at run time for a smaller map,
    looks up its own offsets in the same table: each token pair gets the bias its offset has in the built window.
    (The official code resizes a table bicubically only to start fine-tuning at another window; the trained biases
    of the offsets a smaller window has are used here as they are.)
    """

    impl = 'reference'  # models.cpu.modules.WindowAttention, swapped in on a CPU, says 'cpu'

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
        register_derived_buffer(self, 'relative_position_index', relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def relative_position_bias(self, window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """``(nH, N, N)`` bias added to the attention logits of every window of ``window_size`` (default: the built
        window; a smaller one takes the sub-grid of the table that holds its offsets)."""
        window_size = self.window_size if window_size is None else to_2tuple(window_size)
        index = self.relative_position_index
        if window_size != self.window_size:
            index = derived_on(relative_position_index, (window_size, self.window_size), index.device)
        n = window_size[0] * window_size[1]
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def attention_bias(self, mask: Optional[torch.Tensor] = None,
                       window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """``(nW or 1, nH, N, N)``: the relative position bias for ``window_size`` windows (default: the built ones)
        plus the shift ``mask`` (``(nW, N, N)``), in the table's dtype (fp32 under autocast too)."""
        bias = self.relative_position_bias(window_size).unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """x: ``(B * nW, N, C)``, the tokens of each ``window_size`` window (default: the built one); mask:
        ``(nW, N, N)`` additive, or None. (Not what runs where ``impl=cpu``: see the module docstring.)"""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.attention_bias(mask, window_size)
        x = window_attention(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(bw, n, c)))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, impl={self.impl}'


class SwinTransformerBlock(ShiftedWindowBlock):
    """Pre-norm block: (shifted) window attention, then an MLP, each in a residual branch.

    The window and shift are decided on the map that arrives (:class:`~models.layers.ShiftedWindowBlock`). The bias
    table holds the built window's offsets and no more, so that window is the largest the block uses.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, holds_window=True)
        attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=drop)
        self.add_branches('attn', attn, Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop), drop_path,
                          norm_layer)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Row-major tokens ``(B, H*W, C)`` of a ``size`` map (default: the built ``input_resolution``) in and out."""
        size = map_size(x, size, self.input_resolution)
        x = self.drop_path.residual(x, self.attend_in_windows(self.attn, self.norm1(x), size))
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))


class SwinTransformer(SwinBase):
    """Swin Transformer classifier and backbone (:class:`~models.swin_base.SwinBase`, whose arguments it takes) of
    :class:`SwinTransformerBlock` and :class:`~models.layers.PatchMerging`.

    ``qkv_bias``, ``qk_scale`` and ``attn_drop_rate`` reach every attention. ``fused_window_process`` is accepted for
    compatibility with official configs (the official fused CUDA kernel for shift + partition); it changes nothing
    here.
    """

    def __init__(self, *, qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop_rate: float = 0.0,
                 fused_window_process: bool = False, **kwargs):
        super().__init__(partial(SwinTransformerBlock, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop_rate),
                         PatchMerging, **kwargs)


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
