"""Swin Transformer V2: scaled cosine attention, log-spaced continuous position bias, post-norm.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
The position bias is an MLP (``cpb_mlp``) of log-spaced relative coordinates, so its weights do not
depend on the window size: a model built for another window loads them unchanged. Coordinates are
normalised by ``pretrained_window_size - 1`` when given (fine-tuning at a larger window), else by
``window_size - 1``. The same holds for a window decided at run time (a dynamic-size model meeting a map of
another size): its coordinates are those a model built with that window would have. Names follow the official
release.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers import Mlp, ShiftedWindowBlock, log_spaced, to_2tuple, window_attention
from .registry import register_model
from .swin_base import SwinBase
from .windows import derived_buffer, derived_on, map_size, register_derived_buffer, relative_position_index

__all__ = ['WindowAttention', 'SwinTransformerBlock', 'PatchMerging', 'SwinTransformerV2', 'relative_coords_table',
           'continuous_position_bias']

# Upper bound of the learned per-head temperature: exp(logit_scale) <= 1 / 0.01.
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


@derived_buffer
def relative_coords_table(window_size: Tuple[int, int], pretrained_window_size: Tuple[int, int] = (0, 0),
                          device=None) -> torch.Tensor:
    """``(1, 2Wh-1, 2Ww-1, 2)`` log-spaced relative offsets, the input of ``cpb_mlp``.

    Offsets are divided by ``pretrained_window_size - 1`` (or ``window_size - 1`` when that is 0),
    scaled to [-8, 8], then log-spaced. ``max(.., 1)`` avoids 0/0 for a 1-token window.
    """
    wh, ww = window_size
    ref = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32, device=device) / max(ref[0] - 1, 1)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32, device=device) / max(ref[1] - 1, 1)
    table = torch.stack(torch.meshgrid(dh, dw, indexing='ij'), dim=-1).unsqueeze(0)
    return log_spaced(table * 8)


def continuous_position_bias(cpb_mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor, n: int,
                             num_heads: int) -> torch.Tensor:
    """``(nH, N, N)``: ``cpb_mlp`` of the ``(1, 2Wh-1, 2Ww-1, 2)`` coordinates ``coords``, read for the token pairs of
    a window of ``n`` tokens through ``index``. Computed in fp32 (under autocast too: the MLP is tiny, and its
    gradient sums over every window of the batch)."""
    device = coords.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        table = cpb_mlp(coords).view(-1, num_heads)
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class WindowAttention(nn.Module):
    """Window attention with cosine similarity scaled per head (``logit_scale``) and a continuous
    relative position bias ``16 * sigmoid(cpb_mlp(relative_coords_table))``.

    The qkv projection has biases for q and v only (``q_bias``, ``v_bias``), as in the official model.
    """

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pretrained_window_size: Tuple[int, int] = (0, 0)):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        register_derived_buffer(self, 'relative_coords_table',
                                relative_coords_table(self.window_size, self.pretrained_window_size))
        register_derived_buffer(self, 'relative_position_index', relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """``(nH, N, N)`` bias in (0, 16) from the continuous position MLP for ``window_size`` windows (default: the
        built ones), in fp32 (under autocast too: the MLP is tiny, and its gradient sums over every window of the
        batch). Another window gets the coordinates a model built with it has (normalised by
        ``pretrained_window_size``, else by that window)."""
        window_size = self.window_size if window_size is None else to_2tuple(window_size)
        coords, index = self.relative_coords_table, self.relative_position_index
        if window_size != self.window_size:
            coords = derived_on(relative_coords_table, (window_size, self.pretrained_window_size), coords.device)
            index = derived_on(relative_position_index, (window_size,), index.device)
        bias = continuous_position_bias(self.cpb_mlp, coords, index, window_size[0] * window_size[1], self.num_heads)
        return 16 * torch.sigmoid(bias)

    def attention_bias(self, mask: Optional[torch.Tensor] = None,
                       window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """``(nW or 1, nH, N, N)``: the position bias for ``window_size`` windows (default: the built ones) plus the
        shift ``mask`` (``(nW, N, N)``), in fp32."""
        bias = self.relative_position_bias(window_size).unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """x: ``(B * nW, N, C)``, the tokens of each ``window_size`` window (default: the built one); mask:
        ``(nW, N, N)`` additive, or None."""
        bw, n, c = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # Cosine attention: unit q and k; the per-head temperature is folded into q.
        scale = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()
        # (autocast may run the normalisation in float32; SDPA wants one dtype)
        q = (F.normalize(q, dim=-1) * scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        bias = self.attention_bias(mask, window_size)
        x = window_attention(q, k, v, bias, 1.0, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(bw, n, c)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, '
                f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}')


class SwinTransformerBlock(ShiftedWindowBlock):
    """Res-post-norm block: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``.

    The window and shift are decided on the map that arrives (:class:`~models.layers.ShiftedWindowBlock`); the
    position MLP takes any window, so the configured window holds at every size (no built window caps it).
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm, pretrained_window_size: int = 0):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, holds_window=False)
        attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                               proj_drop=drop, pretrained_window_size=to_2tuple(pretrained_window_size))
        # the norms are post-norms here (applied to each branch's output), the same modules
        self.add_branches('attn', attn, Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop), drop_path,
                          norm_layer)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Row-major tokens of a ``size`` map (default: the built size) in and out."""
        size = map_size(x, size, self.input_resolution)
        x = self.drop_path.residual(x, self.norm1(self.attend_in_windows(self.attn, x, size)))
        return self.drop_path.residual(x, self.norm2(self.mlp(x)))

    def init_respostnorm(self) -> None:
        """Zero the post-norms so every residual branch starts as the identity (official init)."""
        for norm in (self.norm1, self.norm2):
            nn.init.constant_(norm.bias, 0)
            nn.init.constant_(norm.weight, 0)


class PatchMerging(layers.PatchMerging):
    """V2 patch merging: ``reduction`` first, then ``norm`` over the 2C outputs (post-norm)."""

    def _norm_dim(self) -> int:
        return 2 * self.dim

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.norm(self.reduction(self.merge(x, size)))

    def flops(self) -> int:
        h, w = self.input_resolution
        return (h // 2) * (w // 2) * 4 * self.dim * 2 * self.dim + h * w * self.dim // 2


class SwinTransformerV2(SwinBase):
    """Swin Transformer V2 classifier and backbone (:class:`~models.swin_base.SwinBase`, whose arguments it takes) of
    :class:`SwinTransformerBlock` and V2's :class:`PatchMerging`; no ``qk_scale`` (attention is cosine), and
    ``pretrained_window_sizes``, one per stage (0: not fine-tuned from another window)."""

    weight_decay_exempt = frozenset({'cpb_mlp', 'logit_scale', 'relative_position_bias_table'})

    def __init__(self, *, qkv_bias: bool = True, attn_drop_rate: float = 0.0,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), **kwargs):
        super().__init__(partial(SwinTransformerBlock, qkv_bias=qkv_bias, attn_drop=attn_drop_rate), PatchMerging,
                         stage_args={'pretrained_window_size': pretrained_window_sizes}, **kwargs)

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if isinstance(m, SwinTransformerBlock):  # after its norms: children are initialised first
            m.init_respostnorm()


def _swinv2(name: str, img_size: int, window_size: int, **defaults):
    """Register ``name`` as a SwinTransformerV2 with these defaults (any argument can be overridden)."""
    def fn(**kwargs) -> SwinTransformerV2:
        return SwinTransformerV2(**{'img_size': img_size, 'window_size': window_size, **defaults, **kwargs})
    fn.__name__ = name
    fn.__doc__ = f"Swin Transformer V2 {name} (official configuration; keyword arguments override it)."
    return register_model(fn)


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2)
for _size, _arch in (('tiny', _T), ('small', _S), ('base', _B)):
    for _ws in (8, 16):
        _swinv2(f'swinv2_{_size}_patch4_window{_ws}_256', 256, _ws, **_arch)
for _size, _arch in (('base', _B), ('large', _L)):
    _ft = {**_arch, 'drop_path_rate': 0.2, 'pretrained_window_sizes': (12, 12, 12, 6)}
    _swinv2(f'swinv2_{_size}_patch4_window12_192_22k', 192, 12, num_classes=21841, **{**_arch, 'drop_path_rate': 0.2})
    _swinv2(f'swinv2_{_size}_patch4_window12to16_192to256_22kto1k_ft', 256, 16, **_ft)
    _swinv2(f'swinv2_{_size}_patch4_window12to24_192to384_22kto1k_ft', 384, 24, **_ft)
