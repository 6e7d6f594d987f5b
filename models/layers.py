"""The modules every Swin family is built from: patch embedding and merging, the MLP, stochastic depth, a stage, the
shared part of every block and of the window-attention blocks, and window attention itself (one
``F.scaled_dot_product_attention`` call, :func:`window_attention`).

Tokens travel between modules as ``(B, L, C)`` with ``L = H * W`` in row-major order, as in the official
implementation; a block is told the size of the map that arrives (or uses the one it was built for) to fold them
back to ``(B, H, W, C)``. Cutting maps into windows, the window rule and the derived masks live in
:mod:`models.windows`.

Everything here is plain PyTorch. On a CPU, :func:`models.build.build_model` swaps in the versions of
:mod:`models.cpu` for :class:`Mlp`, V1's window attention and ``nn.LayerNorm``; such a module says ``impl=cpu`` in the
printed model, and its forward, not the one here, is what runs.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .windows import (clip_window, derived_on, held_window_rule, merge_windows, padded_size, register_derived_buffer,
                      shifted_window_mask, shifted_windows)

__all__ = [
    'DropPath', 'trunc_normal_', 'to_2tuple', 'Mlp', 'PatchEmbed', 'PatchMerging', 'BasicLayer', 'WindowBlock',
    'ShiftedWindowBlock', 'window_attention', 'window_attention_flops', 'drop_path_rates', 'init_weights',
    'log_spaced',
]


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Normal(0, std) truncated to [-2, 2] (official init), in place; a no-op on the meta device,
    where there are no values to set and the op-by-op emulation is slow."""
    if tensor.is_meta:
        return tensor
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


def init_weights(m: nn.Module, std: float = .02) -> None:
    """Official initialisation: Linear weights N(0, std) truncated, biases 0; LayerNorm 1 and 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def to_2tuple(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``7 -> (7, 7)``; a pair stays a pair."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list:
    """Stochastic depth rising linearly from 0 to ``drop_path_rate`` over all blocks (plain floats:
    no tensor is made, so building on the meta device works)."""
    n = sum(depths)
    if n <= 1:
        return [0.0] * n
    return [drop_path_rate * i / (n - 1) for i in range(n)]


def log_spaced(x: torch.Tensor) -> torch.Tensor:
    """SwinV2's log-spaced coordinates: ``sign(x) * log2(|x| + 1) / log2(8)``."""
    return torch.sign(x) * torch.log2(torch.abs(x) + 1.0) / math.log2(8)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's: the same draws, ``x * bernoulli(1 - p) / (1 - p)`` per sample).

    :meth:`residual` adds the branch to the residual stream: ``x + self(y)`` as one multiply-add
    pass instead of three (scale, multiply, add), and one pass in backward instead of two.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = float(drop_prob), scale_by_keep

    def _sample_scale(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample factors ``(B, 1, ...)``, or None where nothing is dropped (p = 0, evaluation)."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep = 1.0 - self.drop_prob
        scale = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            scale.div_(keep)
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._sample_scale(x)
        return x if scale is None else x * scale

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + self(y)``."""
        scale = self._sample_scale(y)
        return x + y if scale is None else torch.addcmul(x, y, scale)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'



class Mlp(nn.Module):
    """Two linear layers with an activation between them and dropout after each (``fc1``, ``fc2``)."""

    impl = 'reference'  # models.cpu.modules.Mlp, swapped in on a CPU, says 'cpu'

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: type = nn.GELU, drop: float = 0.0,
                 fc2_bias: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=fc2_bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))

    def extra_repr(self) -> str:
        return f'impl={self.impl}'


class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided convolution (``proj``), then an optional LayerNorm (``norm``).

    A fixed-size model (``dynamic=False``, the official classifier) takes exactly ``img_size``: the windows,
    masks and position tables of the stages after it are built for that size. With ``dynamic`` any size is
    taken; the image is padded right and bottom with zeros to a multiple of the patch size (official detection
    backbone), and :meth:`grid_size` says how many patches come out.
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: Union[int, Sequence[int]] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: Optional[type] = None, dynamic: bool = False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.dynamic = dynamic
        self.patches_resolution = self.grid_size(self.img_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def grid_size(self, image_size: Sequence[int]) -> Tuple[int, int]:
        """Patches ``(rows, columns)`` an image of ``(H, W)`` gives (partial patches count when dynamic)."""
        (h, w), (ph, pw) = image_size, self.patch_size
        return (-(-h // ph), -(-w // pw)) if self.dynamic else (h // ph, w // pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if self.dynamic:
            x = F.pad(x, (0, -w % self.patch_size[1], 0, -h % self.patch_size[0]))
        elif (h, w) != self.img_size:
            raise ValueError(f"input image size {h}x{w} does not match the model's img_size "
                             f"{self.img_size[0]}x{self.img_size[1]} (resize the images, build the model for this "
                             "size, or build it with dynamic_img_size=True)")
        x = self.proj(x).flatten(2).transpose(1, 2)  # B, Ph*Pw, C
        return self.norm(x) if self.norm is not None else x

    def flops(self) -> int:
        ho, wo = self.patches_resolution
        flops = ho * wo * self.embed_dim * self.in_chans * self.patch_size[0] * self.patch_size[1]
        if self.norm is not None:
            flops += ho * wo * self.embed_dim
        return flops


class PatchMerging(nn.Module):
    """Halve the resolution and double the width: 2x2 neighbours concatenated, ``norm``, ``reduction``.

    The concatenation order (top-left, bottom-left, top-right, bottom-right) is the official one,
    which released ``reduction`` weights depend on.
    """

    def __init__(self, input_resolution: Tuple[int, int], dim: int, norm_layer: type = nn.LayerNorm):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(self._norm_dim())

    def _norm_dim(self) -> int:
        return 4 * self.dim

    def merge(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 4C)``; an odd ``size`` (default: ``input_resolution``) is
        first padded right and bottom with zeros (official detection backbone)."""
        h, w = size or self.input_resolution
        b, _, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (B, H/2, row parity, W/2, column parity, C) -> column parity, then row parity, then C: the official
        # concatenation [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]] in one copy (and one in
        # backward, where the four slices would each zero-fill a full-size gradient)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)
        return x.reshape(b, -1, 4 * c)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.reduction(self.norm(self.merge(x, size)))

    def flops(self) -> int:
        h, w = self.input_resolution
        return h * w * self.dim + (h // 2) * (w // 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage: a list of ``blocks``, then an optional ``downsample`` at the END (official layout).

    With ``use_checkpoint`` each block's activations are recomputed in the backward pass instead of kept.
    """

    def __init__(self, blocks: Iterable[nn.Module], downsample: Optional[nn.Module] = None,
                 use_checkpoint: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Row-major tokens of a ``size`` map (default: the size the stage was built for) through the blocks and
        the downsampling."""
        x = self.forward_blocks(x, size)
        return x if self.downsample is None else self.downsample(x, size)

    def forward_blocks(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The blocks alone: the stage's output before its patch merging."""
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, size, use_reentrant=False)
            else:
                x = blk(x, size)
        return x

    def flops(self) -> int:
        flops = sum(blk.flops() for blk in self.blocks)
        if self.downsample is not None:
            flops += self.downsample.flops()
        return flops


class WindowBlock(nn.Module):
    """What every Swin block shares (V1, V2, Swin-MoE, Swin-MLP): its sizes, the window decided on the map that
    arrives, and the modules of its two residual branches (:meth:`add_branches`). A subclass builds its token mixer
    (window attention, or Swin-MLP's spatial MLP) and writes the forward that orders the modules.

    Where the map is no larger than ``window_size`` the window shrinks to the map and the shift is dropped (official
    rule, :func:`~models.windows.clip_window`). ``window_rule`` is the configured ``(window, shift)`` the rule is
    applied with to each map that arrives; with ``holds_window`` (a table sized by the window: V1's bias table,
    Swin-MLP's spatial MLP) it is capped by the window the block was built with
    (:func:`~models.windows.held_window_rule`). ``window_size`` and ``shift_size`` are what the rule gives at the
    built ``input_resolution``.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, holds_window: bool):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size {window_size})")
        if holds_window:
            self.window_rule = held_window_rule(self.input_resolution, window_size, shift_size)
        else:
            self.window_rule = (window_size, shift_size)
        self.window_size, self.shift_size = clip_window(self.input_resolution, *self.window_rule)

    def add_branches(self, mixer_name: str, mixer: nn.Module, mlp: nn.Module, drop_path: float,
                     norm_layer: type) -> None:
        """Register the modules of the two residual branches in the official order, which the printed model and the
        state dict follow: ``norm1``, the token mixer as ``mixer_name`` (``attn``, ``spatial_mlp``), ``drop_path``
        (one module, shared by both branches), ``norm2``, ``mlp``."""
        self.norm1 = norm_layer(self.dim)
        self.add_module(mixer_name, mixer)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(self.dim)
        self.mlp = mlp

    def window_at(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The window and shift for a ``size`` map: the official rule, decided on the map that arrives."""
        return clip_window(size, *self.window_rule)

    def mlp_flops(self) -> float:
        """Multiply-adds of the MLP over the built map (official formula)."""
        h, w = self.input_resolution
        return 2 * h * w * self.dim * self.dim * self.mlp_ratio

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')


class ShiftedWindowBlock(WindowBlock):
    """What the window-attention blocks (V1, V2, Swin-MoE) add to :class:`WindowBlock`: the shift mask, and attention
    applied within the (shifted) windows. ``attn_mask`` (where shifted) is the mask for the built size: a derived
    buffer, not saved.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, holds_window: bool):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, holds_window)
        mask = None
        if self.shift_size > 0:
            mask = shifted_window_mask(padded_size(self.input_resolution, self.window_size), self.window_size,
                                       self.shift_size)
        register_derived_buffer(self, 'attn_mask', mask)

    def shift_mask(self, size: Tuple[int, int], device: torch.device) -> Optional[torch.Tensor]:
        """The ``(nW, N, N)`` additive mask for a ``size`` map (``attn_mask`` at the built size; another size's built
        once per size and device), or None where the map is not shifted."""
        window, shift = self.window_at(size)
        if shift == 0:
            return None
        padded = padded_size(size, window)
        if self.attn_mask is not None and (padded, window, shift) == (
                padded_size(self.input_resolution, self.window_size), self.window_size, self.shift_size):
            return self.attn_mask
        return derived_on(shifted_window_mask, (padded, window, shift), torch.device(device))

    def attend_in_windows(self, attn: nn.Module, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """``attn`` within the (shifted) windows of the row-major tokens ``x`` of a ``size`` map: the map is cut into
        the windows the rule gives for it (padded where they do not tile it, see
        :func:`~models.windows.shifted_windows`), ``attn(windows, mask, window)`` mixes each, the map is put back."""
        window, shift = self.window_at(size)
        windows = attn(shifted_windows(x, size, window, shift), self.shift_mask(size, x.device), window)
        return merge_windows(windows, size, window, shift)

    def flops(self) -> int:
        """Multiply-adds at the built size by the official formula: two norms, attention in every window, the MLP."""
        h, w = self.input_resolution
        n = self.window_size * self.window_size
        attention = h * w // n * window_attention_flops(n, self.dim, self.num_heads)
        return int(2 * self.dim * h * w + attention + self.mlp_flops())


class _ImageBias(torch.autograd.Function):
    """The per-window bias ``(1, G, N, N)`` -> ``(B, G, N, N)`` in the logits' ``dtype``, the same for every image
    (a stride-0 batch: nothing is copied per image). Its gradient is summed over the images in fp32: under fp16
    a sum over the batch and all windows of one offset can overflow, and the table it reaches is fp32."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, images: int, dtype: torch.dtype) -> torch.Tensor:
        ctx.bias_dtype = bias.dtype
        _, g, n, m = bias.shape
        # rows padded to a multiple of 8 elements in memory: CUDA's memory-efficient kernel takes such a bias as it
        # is; an unaligned one it pads, which would copy the batch-expanded tensor image by image
        rows = torch.empty(1, g, n, -(-m // 8) * 8, dtype=dtype, device=bias.device)[..., :m]
        rows.copy_(bias)
        return rows.expand(images, g, n, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.sum(0, keepdim=True, dtype=torch.float32).to(ctx.bias_dtype), None, None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v for all windows of a batch: one ``F.scaled_dot_product_attention`` call.

    q, k, v: ``(B * nW, nH, N, d)``; bias: ``(nW, nH, N, N)`` (the relative position bias plus the shift mask) or
    ``(1, nH, N, N)`` (no shift), the same for every image, best kept in fp32. Returns ``(B * nW, nH, N, d)``.

    The windows of an image are folded into the head dimension, ``(B, nW * nH, N, d)``, so the bias is a 4-D
    ``attn_mask`` broadcast over images: CUDA's memory-efficient kernel takes it and returns its gradient, which
    :class:`_ImageBias` sums over the images in fp32.
    """
    bw, nh, n, d = q.shape
    nw = bias.shape[0]
    images = bw // nw
    q, k, v = (t.reshape(images, nw * nh, n, d) for t in (q, k, v))
    bias = bias.reshape(1, nw * nh, n, n)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # Export (TorchScript, ONNX): a graph of standard ops, the bias broadcast over the images by SDPA itself;
        # a custom autograd Function has no TorchScript or ONNX form.
        mask = bias.to(q.dtype)
    else:
        mask = _ImageBias.apply(bias, images, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.reshape(bw, nh, n, d)


def window_attention_flops(n: int, dim: int, num_heads: int) -> int:
    """Multiply-adds of window attention over one window of ``n`` tokens (official formula: qkv, q k^T, attn v, proj;
    the position bias is not counted)."""
    return n * dim * 3 * dim + 2 * num_heads * n * (dim // num_heads) * n + n * dim * dim
