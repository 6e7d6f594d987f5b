"""Windows: cutting a token map into (shifted) windows and back, the official window rule, and the tensors derived
from a window and a map size (shift masks, relative position indices) that blocks keep as derived buffers.

Tokens travel between modules as ``(B, L, C)`` with ``L = H * W`` in row-major order, as in the official
implementation. A block cuts its (shifted) map into windows with :func:`shifted_windows`, mixes each window, and
puts the map back together with :func:`merge_windows`. Which window and shift a block uses is the official rule,
:func:`clip_window`, decided on the map that arrives.

Derived buffers (:data:`DERIVED_BUFFERS`) are recomputed from the architecture, never saved: the one list of their
names, read wherever a state dict is filtered (model loading, checkpoint tolerance, pretrained weights, exports).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'MASK_VALUE', 'DERIVED_BUFFERS', 'is_derived_buffer', 'register_derived_buffer', 'derived_buffer', 'derived_on',
    'window_partition', 'window_reverse', 'shifted_windows', 'merge_windows', 'map_size', 'padded_size',
    'merged_size', 'stage_resolutions', 'check_resolution', 'clip_window', 'held_window_rule', 'shifted_window_mask',
    'relative_position_index',
]

# The official code masks cross-region pairs with -100 (not -inf); kept so logits match released weights.
MASK_VALUE = -100.0

# ------------------------------------------------------------------------------------------ derived buffers

# Buffers the blocks recompute from their window and map size. They are registered non-persistent, so no state dict
# of ours holds them; official checkpoints do (sized for the window they were trained with), so every load drops
# them (:meth:`models.swin_base.SwinBase` does, as do the checkpoint, pretrained-weight and export code).
DERIVED_BUFFERS: Tuple[str, ...] = ('relative_position_index', 'relative_coords_table', 'attn_mask')


def is_derived_buffer(key: str) -> bool:
    """Whether the state-dict ``key`` names a derived buffer (its last component is one of :data:`DERIVED_BUFFERS`)."""
    return key.rsplit('.', 1)[-1] in DERIVED_BUFFERS


def register_derived_buffer(module: nn.Module, name: str, tensor: Optional[torch.Tensor]) -> None:
    """Register ``tensor`` as the derived buffer ``name`` of ``module``: moved with the module, never saved."""
    if name not in DERIVED_BUFFERS:
        raise ValueError(f"{name!r} is not listed in DERIVED_BUFFERS: a load would not drop it")
    module.register_buffer(name, tensor, persistent=False)


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


@functools.lru_cache(maxsize=64)
def derived_on(builder: Callable[..., torch.Tensor], args: tuple, device: torch.device) -> torch.Tensor:
    """``builder(*args)`` on ``device``, built once per argument set and device: the derived tensors (masks, position
    indices and coordinates) of a map of another size than the built one, in a dynamic-size model.

    Built outside inference mode and autograd, so that a size first met under ``torch.inference_mode`` still trains.
    """
    with torch.inference_mode(False), torch.no_grad():
        return builder(*args, device=device)


# ------------------------------------------------------------------------------------------ cutting and merging

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


# ------------------------------------------------------------------------------------------ sizes

def map_size(x: torch.Tensor, size: Optional[Tuple[int, int]], built: Tuple[int, int]) -> Tuple[int, int]:
    """The map size of the row-major tokens ``x``: ``size``, or the ``built`` one when None, checked against them."""
    h, w = size or built
    if x.shape[1] != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} tokens, got {x.shape[1]}")
    return h, w


def padded_size(size: Tuple[int, int], multiple: int) -> Tuple[int, int]:
    """``size`` rounded up to multiples of ``multiple``: the map a block pads to before cutting windows."""
    return -(-size[0] // multiple) * multiple, -(-size[1] // multiple) * multiple


def merged_size(size: Tuple[int, int]) -> Tuple[int, int]:
    """The map size after patch merging (an odd side is padded first)."""
    return -(-size[0] // 2), -(-size[1] // 2)


def stage_resolutions(patches_resolution: Tuple[int, int], num_layers: int) -> List[Tuple[int, int]]:
    """Token map size of each stage: patch merging halves it, rounding up (odd maps are padded)."""
    sizes = [tuple(patches_resolution)]
    for _ in range(num_layers - 1):
        sizes.append(merged_size(sizes[-1]))
    return sizes


def check_resolution(img_size: Tuple[int, int], patch_size: Tuple[int, int], num_layers: int,
                     window_size: int) -> None:
    """Raise ValueError unless every stage can be cut into whole windows and merged by 2x2 (a fixed-size model)."""
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


# ------------------------------------------------------------------------------------------ the window rule

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


# ------------------------------------------------------------------------------------------ derived tensors

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
