"""Swin-MLP: the Swin layout with window attention replaced by a per-head spatial MLP.

Each window's tokens are mixed by a grouped 1x1 convolution over the ``N = ws * ws`` positions
(``spatial_mlp``, one group per head). The shifted variant pads the map with zeros, ``ws - s`` on the
top/left and ``s`` on the bottom/right, instead of rolling it, so windows never wrap around the
border and no mask is needed. The spatial MLP is sized by the window, so a block keeps the window it was built
with; whether it shifts is decided on the map that arrives (official rule: not where the map is no larger than the
window). Names follow the official release.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Mlp, PatchMerging, WindowBlock, trunc_normal_
from .registry import register_model
from .swin_base import SwinBase
from .windows import map_size, padded_size, window_partition, window_reverse

__all__ = ['SwinMLPBlock', 'SwinMLP']


class SwinMLPBlock(WindowBlock):
    """Pre-norm block: (shifted-padded) window spatial MLP, then a channel MLP, both residual.

    The spatial MLP is sized by the window, so the block holds the window it was built with
    (:class:`~models.layers.WindowBlock` with ``holds_window``): a smaller map is padded to it; the shift follows the
    arriving map.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type = nn.GELU, norm_layer: type = nn.LayerNorm):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, holds_window=True)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        n = num_heads * self.window_size ** 2
        spatial_mlp = nn.Conv1d(n, n, kernel_size=1, groups=num_heads)
        self.add_branches('spatial_mlp', spatial_mlp, Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop),
                          drop_path, norm_layer)

    def shift_at(self, size: Tuple[int, int]) -> int:
        """The shift for a ``size`` map: the official rule, decided on the map that arrives."""
        return self.window_at(size)[1]

    def spatial_mix(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``: mix positions within each (padded, shifted) window. A map the window
        does not tile is first padded right and bottom with zeros to window multiples, as in the attention models."""
        b, h, w, c = x.shape
        ws, nh, shift = self.window_size, self.num_heads, self.shift_at((h, w))
        hp, wp = padded_size((h, w), ws)
        # the shift is realised by zero padding: ws - shift on the top and left, shift on the bottom and right
        left, right, top, bottom = (ws - shift, shift, ws - shift, shift) if shift > 0 else (0, 0, 0, 0)
        if (left, right + wp - w, top, bottom + hp - h) != (0, 0, 0, 0):
            x = F.pad(x, (0, 0, left, right + wp - w, top, bottom + hp - h))
        hp, wp = x.shape[1], x.shape[2]
        # reshape: with one image and one row of windows, the partition can be a strided view no .view() can split
        win = window_partition(x, ws).reshape(-1, ws * ws, nh, c // nh).transpose(1, 2)  # B*nW, nH, N, C/nH
        win = self.spatial_mlp(win.reshape(-1, nh * ws * ws, c // nh))
        win = win.view(-1, nh, ws * ws, c // nh).transpose(1, 2).reshape(-1, ws, ws, c)
        x = window_reverse(win, ws, hp, wp)
        if (hp, wp) != (h, w):
            x = x[:, top:top + h, left:left + w, :]
        return x

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Row-major tokens of a ``size`` map (default: the built ``input_resolution``) in and out."""
        h, w = map_size(x, size, self.input_resolution)
        b, _, c = x.shape
        y = self.spatial_mix(self.norm1(x).view(b, h, w, c)).reshape(b, h * w, c)
        x = self.drop_path.residual(x, y)
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))

    def flops(self) -> int:
        """Multiply-adds by the official formula."""
        h, w = self.input_resolution
        ws = self.window_size
        if self.shift_size > 0:
            num_windows = (h / ws + 1) * (w / ws + 1)
        else:
            num_windows = h * w / ws / ws
        flops = 2 * self.dim * h * w + num_windows * self.dim * ws * ws * ws * ws
        return int(flops + self.mlp_flops())


class SwinMLP(SwinBase):
    """Swin-MLP classifier and backbone (:class:`~models.swin_base.SwinBase`, whose arguments it takes): the Swin V1
    layout built from :class:`SwinMLPBlock` and V1's patch merging."""

    def __init__(self, **kwargs):
        super().__init__(SwinMLPBlock, PatchMerging, **kwargs)

    def _init_weights(self, m: nn.Module) -> None:
        super()._init_weights(m)
        if isinstance(m, nn.Conv1d):  # the spatial MLPs start like linear layers
            trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)


def _swin_mlp(name: str, img_size: int, window_size: int, **defaults):
    """Register ``name`` as a SwinMLP with these defaults (any argument can be overridden)."""
    def fn(**kwargs) -> SwinMLP:
        return SwinMLP(**{'img_size': img_size, 'window_size': window_size, **defaults, **kwargs})
    fn.__name__ = name
    fn.__doc__ = f"Swin-MLP {name} (official configuration; keyword arguments override it)."
    return register_model(fn)


_swin_mlp('swin_mlp_base_patch4_window7_224', 224, 7, embed_dim=128, depths=(2, 2, 18, 2),
          num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
for _c, _heads in ((24, (4, 8, 16, 32)), (12, (8, 16, 32, 64)), (6, (16, 32, 64, 128))):
    # c{N}: N channels per head in the first stage (96 / heads)
    _swin_mlp(f'swin_mlp_tiny_c{_c}_patch4_window8_256', 256, 8, embed_dim=96, depths=(2, 2, 6, 2),
              num_heads=_heads, drop_path_rate=0.2)
