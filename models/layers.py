"""Pieces shared by the Swin family: patch embedding and merging, windows, masks, window attention, MLP, stages.

Tokens travel between modules as ``(B, L, C)`` with ``L = H * W`` in row-major order, as in the official
implementation; each block knows its ``input_resolution`` to fold them back to ``(B, H, W, C)``. A block
cuts its (shifted) map into windows with :func:`window_partition`, mixes each window, and puts the map back
together with :func:`window_reverse`. Window attention is one ``F.scaled_dot_product_attention`` call
(:func:`window_attention`).

Everything here is plain PyTorch; the CPU kernels that :func:`models.build.build_model` swaps in on a CPU live
apart, in :mod:`models.cpu`.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    'DropPath', 'trunc_normal_', 'to_2tuple', 'Mlp', 'PatchEmbed', 'PatchMerging', 'BasicLayer',
    'window_partition', 'window_reverse', 'shifted_windows', 'merge_windows', 'clip_window', 'held_window_rule',
    'shifted_window_mask', 'relative_position_index', 'window_attention', 'drop_path_rates', 'check_resolution',
    'init_weights', 'DerivedBuffersMixin', 'HierarchicalClassifierMixin', 'MASK_VALUE', 'derived_buffer', 'derived_on',
    'log_spaced', 'padded_size', 'merged_size', 'map_size', 'stage_resolutions', 'ShiftedWindowMixin',
]

# The official code masks cross-region pairs with -100 (not -inf); kept so logits match released weights.
MASK_VALUE = -100.0


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Normal(0, std) truncated to [-2, 2] (official init), in place; a no-op on the meta device,
    where there are no values to set and the op-by-op emulation is slow."""
    if tensor.is_meta:
        return tensor
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


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


def to_2tuple(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``7 -> (7, 7)``; a pair stays a pair."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class DerivedBuffersMixin:
    """Drops keys of buffers we recompute (``_derived_buffers``) from a state dict being loaded.

    Our derived buffers are non-persistent, but official checkpoints carry them; dropping them here
    keeps ``load_state_dict(sd, strict=True)`` strict for every other key.
    """

    _derived_buffers: Tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._derived_buffers:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HierarchicalClassifierMixin:
    """What the three hierarchical models share once their modules exist: the classifier methods.

    Expects ``patch_embed``, ``absolute_pos_embed`` (or None), ``pos_drop``, ``layers``, ``norm``,
    ``head``, ``num_features``, ``num_classes``, ``num_layers`` and ``patches_resolution``.
    """

    def init_stem(self, img_size, patch_size, in_chans: int, num_classes: int, embed_dim: int,
                  depths: Sequence[int], window_size: int, mlp_ratio: float, drop_rate: float, norm_layer: type,
                  ape: bool, patch_norm: bool, dynamic_img_size: bool = False) -> None:
        """The sizes, patch embedding, optional absolute position embedding and dropout every variant starts with.

        A fixed-size model must tile every stage with whole windows at ``img_size``; a ``dynamic_img_size`` one
        pads instead, and ``img_size`` only sizes the parameters: the position table's grid and, where a stage is
        smaller than the window there, V1's bias tables and Swin-MLP's spatial MLPs (see :func:`held_window_rule`).
        """
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.dynamic_img_size = dynamic_img_size
        if not dynamic_img_size:
            check_resolution(to_2tuple(img_size), to_2tuple(patch_size), self.num_layers, window_size)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=norm_layer if patch_norm else None, dynamic=dynamic_img_size)
        self.patches_resolution = self.patch_embed.patches_resolution
        self.stage_resolutions = stage_resolutions(self.patches_resolution, self.num_layers)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: no head)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_weights)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images ``(B, C, H, W)`` -> patch tokens ``(B, L, embed_dim)`` (plus the position embedding, then dropout)
        and their map size."""
        size = self.patch_embed.grid_size(x.shape[-2:])
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.position_embedding(size)
        return self.pos_drop(x), size

    def position_embedding(self, size: Tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding ``(1, L, C)`` for a ``size`` map: the table itself at the built size,
        else the table resized bicubically (official detection backbone)."""
        if tuple(size) == tuple(self.patches_resolution):
            return self.absolute_pos_embed
        h, w = self.patches_resolution
        grid = self.absolute_pos_embed.reshape(1, h, w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(size), mode='bicubic', align_corners=False)
        return grid.flatten(2).transpose(1, 2).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normalised tokens of the last stage ``(B, L, num_features)``."""
        x, size = self.embed(x)
        for layer in self.layers:
            x = layer(x, size)
            if layer.downsample is not None:
                size = merged_size(size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the tokens, then classify (or return the pooled features when ``pre_logits``)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops(self) -> int:
        """Multiply-adds by the official formula (attention or spatial MLPs, linears, norms, head)."""
        flops = self.patch_embed.flops() + sum(layer.flops() for layer in self.layers)
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // 2 ** self.num_layers
        return flops + self.num_features * self.num_classes


class Mlp(nn.Module):
    """Two linear layers with an activation between them and dropout after each (``fc1``, ``fc2``)."""

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


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B * nW, ws, ws, C)``, windows in row-major order within each image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws, ws, C) -> (B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def map_size(x: torch.Tensor, size: Optional[Tuple[int, int]], built: Tuple[int, int]) -> Tuple[int, int]:
    """The map size of the row-major tokens ``x``: ``size``, or the ``built`` one when None, checked against them."""
    h, w = size or built
    if x.shape[1] != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} tokens, got {x.shape[1]}")
    return h, w


def padded_size(size: Tuple[int, int], multiple: int) -> Tuple[int, int]:
    """``size`` rounded up to multiples of ``multiple``: the map a block pads to before cutting windows."""
    return -(-size[0] // multiple) * multiple, -(-size[1] // multiple) * multiple


def shifted_windows(x: torch.Tensor, size: Tuple[int, int], window_size: int, shift_size: int) -> torch.Tensor:
    """Row-major tokens ``(B, H*W, C)`` of a ``size`` map -> windows ``(B * nW, ws*ws, C)``.

    A map that the window does not tile is padded right and bottom with zeros to window multiples (official
    detection backbone); then it is cyclically shifted up and left by ``shift_size`` (no shift: plain windows).
    """
    h, w = size
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    hp, wp = padded_size(size, window_size)
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if shift_size > 0:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    return window_partition(x, window_size).reshape(-1, window_size * window_size, c)


def merge_windows(windows: torch.Tensor, size: Tuple[int, int], window_size: int, shift_size: int) -> torch.Tensor:
    """Inverse of :func:`shifted_windows`: windows ``(B * nW, ws*ws, C)`` -> row-major tokens ``(B, H*W, C)`` of the
    ``size`` map (the padding cut off)."""
    h, w = size
    hp, wp = padded_size(size, window_size)
    c = windows.shape[-1]
    x = window_reverse(windows.view(-1, window_size, window_size, c), window_size, hp, wp)
    if shift_size > 0:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    if (hp, wp) != (h, w):
        x = x[:, :h, :w]
    return x.reshape(-1, h * w, c)


def clip_window(input_resolution: Tuple[int, int], window_size: int, shift_size: int) -> Tuple[int, int]:
    """Official rule: a stage no larger than the window gets one window of its size and no shift.

    The official classifier applies it once, to the size it is built for. Our blocks apply it to the map that
    arrives, at every forward (Hugging Face's ``SwinLayer`` decides per forward too), so a dynamic-size model gives
    the fixed-size model's result at the built size, and at another size what the rule gives there. Where the map is
    larger than the window this is also the official detection backbone's computation (the window, its shift, the
    map padded to window multiples); where it is not, that backbone keeps the window and its shift over a
    zero-padded map instead, a rule no released classifier weights were trained under.
    """
    if min(input_resolution) <= window_size:
        return min(input_resolution), 0
    return window_size, shift_size


def held_window_rule(input_resolution: Tuple[int, int], window_size: int, shift_size: int) -> Tuple[int, int]:
    """The window and shift that :func:`clip_window` is applied with, per map, by a block whose parameters are sized by
    its window (V1's relative position bias table, Swin-MLP's spatial MLP), built for an ``input_resolution`` map.

    Such a block holds parameters for the window the rule gives at the built size and no larger. Where that is the
    configured window, the configured rule holds at every size. Where the built stage was smaller than the window
    (the window shrank to it), a larger map arriving would need offsets or positions the block has no parameters
    for: the block keeps its built window as its largest, shifted by half of it, as the official model configured
    with that window would be. (V2's position MLP takes any window, so V2 keeps the configured rule.)
    """
    held, _ = clip_window(input_resolution, window_size, shift_size)
    if held == window_size:
        return window_size, shift_size
    return held, held // 2 if shift_size else 0


def stage_resolutions(patches_resolution: Tuple[int, int], num_layers: int) -> list:
    """Token map size of each stage: patch merging halves it, rounding up (odd maps are padded)."""
    sizes = [tuple(patches_resolution)]
    for _ in range(num_layers - 1):
        sizes.append(merged_size(sizes[-1]))
    return sizes


def merged_size(size: Tuple[int, int]) -> Tuple[int, int]:
    """The map size after patch merging."""
    return -(-size[0] // 2), -(-size[1] // 2)


def check_resolution(img_size: Tuple[int, int], patch_size: Tuple[int, int], num_layers: int,
                     window_size: int) -> None:
    """Raise ValueError unless every stage can be cut into whole windows and merged by 2x2."""
    res = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
    if res[0] * patch_size[0] != img_size[0] or res[1] * patch_size[1] != img_size[1]:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    for i in range(num_layers):
        ws, _ = clip_window(res, window_size, 0)
        if res[0] % ws or res[1] % ws:
            raise ValueError(f"img_size {img_size}: stage {i} has {res[0]}x{res[1]} tokens, which window_size "
                             f"{ws} does not divide (choose an img_size/window_size pair that tiles every stage)")
        if i < num_layers - 1:
            if res[0] % 2 or res[1] % 2:
                raise ValueError(f"img_size {img_size}: stage {i} has {res[0]}x{res[1]} tokens, "
                                 "which patch merging cannot halve (must be even)")
            res = (res[0] // 2, res[1] // 2)


def derived_buffer(fn):
    """Decorator for the builders of derived buffers: compute once per argument set on the CPU, then
    return a copy on ``device`` (default: the current default device, e.g. inside ``torch.device('meta')``).

    Dozens of blocks share the same few tables; building each op by op on the meta device is slow.
    """
    signature = inspect.signature(fn)
    cached = functools.lru_cache(maxsize=None)(lambda *args: fn(*args, device='cpu'))

    @functools.wraps(fn)
    def wrapper(*args, device=None, **kwargs) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments.pop('device', None)
        key = tuple(tuple(a) if isinstance(a, list) else a for a in bound.arguments.values())
        target = torch.device(device) if device is not None else torch.empty(0).device
        return cached(*key).to(target, copy=True)
    return wrapper


@derived_buffer
def shifted_window_mask(input_resolution: Tuple[int, int], window_size: int, shift_size: int,
                        device=None) -> torch.Tensor:
    """Additive mask ``(nW, N, N)`` for shifted windows: 0 within a region, ``MASK_VALUE`` across.

    After the cyclic shift, the last row/column of windows holds pieces from opposite borders;
    the mask stops tokens of different pieces (regions) from attending to each other.
    """
    h, w = input_resolution
    region = torch.zeros(1, h, w, 1, device=device)
    cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window_size).reshape(-1, window_size * window_size)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


@functools.lru_cache(maxsize=64)
def derived_on(builder: Callable[..., torch.Tensor], args: tuple, device: torch.device) -> torch.Tensor:
    """``builder(*args)`` on ``device``, built once per argument set and device: the derived tensors (masks, position
    indices and coordinates) of a map of another size than the built one, in a dynamic-size model.

    Built outside inference mode and autograd, so that a size first met under ``torch.inference_mode`` still trains.
    """
    with torch.inference_mode(False), torch.no_grad():
        return builder(*args, device=device)


class ShiftedWindowMixin:
    """For blocks that cut (shifted) windows: the window and shift for the incoming map, and the mask that fits it.

    Expects ``input_resolution``; ``window_rule``, the configured ``(window, shift)`` that :func:`clip_window` turns
    into the window and shift for each map that arrives; and ``window_size`` and ``shift_size``, what it gives at the
    built size. :meth:`init_shift_mask` registers the mask for the built size as the derived buffer ``attn_mask``;
    a map of another size gets the mask of its own window, shift and padded size, built once per size and device.
    """

    def window_at(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The window and shift for a ``size`` map: the official rule, decided on the map that arrives."""
        return clip_window(size, *self.window_rule)

    def init_shift_mask(self) -> None:
        mask = None
        if self.shift_size > 0:
            mask = shifted_window_mask(padded_size(self.input_resolution, self.window_size), self.window_size,
                                       self.shift_size)
        self.register_buffer('attn_mask', mask, persistent=False)

    def shift_mask(self, size: Tuple[int, int], device: torch.device) -> Optional[torch.Tensor]:
        """The ``(nW, N, N)`` additive mask for a ``size`` map, or None where the map is not shifted."""
        window, shift = self.window_at(size)
        if shift == 0:
            return None
        padded = padded_size(size, window)
        if self.attn_mask is not None and (padded, window, shift) == (
                padded_size(self.input_resolution, self.window_size), self.window_size, self.shift_size):
            return self.attn_mask
        return derived_on(shifted_window_mask, (padded, window, shift), torch.device(device))


@derived_buffer
def relative_position_index(window_size: Tuple[int, int], table_window: Optional[Tuple[int, int]] = None,
                            device=None) -> torch.Tensor:
    """``(N, N)`` index, for the token pairs of a ``window_size`` window, into a ``(2Th-1)*(2Tw-1)`` table of the
    relative offsets of a ``table_window`` window (default: the window itself; official ordering).

    The table holds one entry per offset, so a smaller window's offsets are a sub-grid of a larger window's table.
    """
    wh, ww = window_size
    th, tw = table_window or window_size
    if wh > th or ww > tw:
        raise ValueError(f"a {wh}x{ww} window has offsets that a table for {th}x{tw} windows does not hold")
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing='ij')).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + th - 1) * (2 * tw - 1) + (rel[..., 1] + tw - 1)


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


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list:
    """Stochastic depth rising linearly from 0 to ``drop_path_rate`` over all blocks (plain floats:
    no tensor is made, so building on the meta device works)."""
    n = sum(depths)
    if n <= 1:
        return [0.0] * n
    return [drop_path_rate * i / (n - 1) for i in range(n)]


def init_weights(m: nn.Module) -> None:
    """Official initialisation: Linear weights N(0, 0.02) truncated, biases 0; LayerNorm 1 and 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def log_spaced(x: torch.Tensor) -> torch.Tensor:
    """SwinV2's log-spaced coordinates: ``sign(x) * log2(|x| + 1) / log2(8)``."""
    return torch.sign(x) * torch.log2(torch.abs(x) + 1.0) / math.log2(8)
