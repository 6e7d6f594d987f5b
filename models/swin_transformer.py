"""Swin Transformer (V1): hierarchical vision transformer with shifted windows.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
Parameter and buffer names follow the official release, so its checkpoints load unchanged.

A forward pass, top to bottom: :class:`SwinTransformer` embeds 4x4 patches, then runs four stages
(:class:`~models.layers.BasicLayer`) of :class:`SwinTransformerBlock`; each block cuts its map into windows
(shifted by half a window in every second block), runs :class:`WindowAttention` inside each window, and puts
the map back together; a stage ends with patch merging; the head averages the last stage's tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .layers import (BasicLayer, DerivedBuffersMixin, DropPath, HierarchicalClassifierMixin, Mlp, PatchMerging,
                     clip_window, derived_on, drop_path_rates, held_window_rule, init_weights, merge_windows,
                     relative_position_index, ShiftedWindowMixin, map_size, shifted_windows, to_2tuple, trunc_normal_,
                     window_attention)
from .features import BackboneMixin
from .registry import register_model

__all__ = ['WindowAttention', 'SwinTransformerBlock', 'SwinTransformer']


class WindowAttention(DerivedBuffersMixin, nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias.

    The bias comes from ``relative_position_bias_table`` ((2Wh-1)*(2Ww-1) offsets x heads), looked up
    through the derived buffer ``relative_position_index``. A smaller window, decided at run time for a smaller map,
    looks up its own offsets in the same table: each token pair gets the bias its offset has in the built window.
    (The official code resizes a table bicubically only to start fine-tuning at another window; the trained biases
    of the offsets a smaller window has are used here as they are.)
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
        ``(nW, N, N)`` additive, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.attention_bias(mask, window_size)
        x = window_attention(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(bw, n, c)))

    def flops(self, n: int) -> int:
        """Multiply-adds for one window of ``n`` tokens (official formula)."""
        return (n * self.dim * 3 * self.dim + 2 * self.num_heads * n * (self.dim // self.num_heads) * n
                + n * self.dim * self.dim)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'


class SwinTransformerBlock(ShiftedWindowMixin, DerivedBuffersMixin, nn.Module):
    """Pre-norm block: (shifted) window attention, then an MLP, each in a residual branch.

    Where the map is no larger than ``window_size`` the window shrinks to the map and the shift is dropped (official
    rule, :func:`~models.layers.clip_window`), decided on the map that arrives: ``window_size`` and ``shift_size``
    are what it gives at the built ``input_resolution``, ``window_rule`` what it is applied with. The bias table
    holds the built window's offsets and no more, so that window is the largest the block uses
    (:func:`~models.layers.held_window_rule`). ``attn_mask`` (the built size's, where shifted) is derived, not saved.
    """

    _derived_buffers = ('attn_mask',)

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size {window_size})")
        self.window_rule = held_window_rule(self.input_resolution, window_size, shift_size)
        self.window_size, self.shift_size = clip_window(self.input_resolution, *self.window_rule)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.init_shift_mask()

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Row-major tokens ``(B, H*W, C)`` of a ``size`` map (default: the built ``input_resolution``) in and out;
        the window and shift are decided on that map, and a map the window does not tile is padded for the attention
        (see :func:`~models.layers.shifted_windows`)."""
        size = map_size(x, size, self.input_resolution)
        window, shift = self.window_at(size)
        windows = shifted_windows(self.norm1(x), size, window, shift)
        windows = self.attn(windows, self.shift_mask(size, x.device), window)
        y = merge_windows(windows, size, window, shift)
        x = self.drop_path.residual(x, y)
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))

    def flops(self) -> int:
        h, w = self.input_resolution
        num_windows = h * w // (self.window_size * self.window_size)
        return (2 * self.dim * h * w + num_windows * self.attn.flops(self.window_size * self.window_size)
                + int(2 * h * w * self.dim * self.dim * self.mlp_ratio))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')


class SwinTransformer(BackboneMixin, HierarchicalClassifierMixin, nn.Module):
    """Swin Transformer classifier: patch embedding, 4 stages (patch merging at the end of the first
    three), final LayerNorm, average pooling, linear ``head``.

    Arguments keep the official names. ``fused_window_process`` is accepted for compatibility with
    official configs (the official fused CUDA kernel for shift + partition); it changes nothing here.

    Backbone arguments (:mod:`models.features`): ``dynamic_img_size`` takes any input size, padding as the official
    detection backbone does (default: on for ``features_only``); ``features_only`` returns the ``out_indices``
    stages' maps; ``out_norm`` adds a LayerNorm ``norm{i}`` per output; ``frozen_stages`` freezes the stem and the
    first stages.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_layer: type = nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False,
                 dynamic_img_size: Optional[bool] = None, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, out_norm: bool = False, frozen_stages: int = -1):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.init_stem(img_size, patch_size, in_chans, num_classes, embed_dim, depths, window_size, mlp_ratio,
                       drop_rate, norm_layer, ape, patch_norm,
                       dynamic_img_size=features_only if dynamic_img_size is None else dynamic_img_size)

        dpr = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            res = self.stage_resolutions[i]
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
        self.init_backbone(features_only, out_indices, out_norm, frozen_stages, norm_layer)

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
