"""The official augmentation recipe through timm, a faster equivalent, and batch-level finishing.

Two training paths with the same distribution of crops and augmentations:

* plain (``DATA.FAST_LOADER False``): timm's ``create_transform`` exactly as the official framework
  calls it; each worker returns normalised float tensors.
* fast: the decoder draws timm's crop box from the file header and decodes only what the box
  needs (:class:`RandomResizedCropDecoder`: reduced JPEG decoding for large boxes, torch's uint8
  resize on stock Pillow, Pillow-SIMD's resize where installed); then the flip and timm's own PIL
  RandAugment / colour jitter (the same objects timm builds; faster on PIL than tensor versions),
  then a uint8 tensor out. RandAugment's shears and translations run as whole-row (or column)
  array operations (``data.augment_ops.axis_affine``: PIL's pixels, several times faster).
  :class:`BatchNormalize` turns the batch into normalised floats and applies random erasing once
  per batch, in the loader's collate (workers).

A sample's seed gives the same crop box, flip and RandAugment draws on both paths; they differ only
by resampling noise and in where random erasing draws from (per batch on the fast path).

Both paths rebind timm's posterize to ``data.augment_ops.safe_posterize``, see there.

Input other than 3-channel RGB (:class:`InputSpec`: grayscale, multi-channel, 16-bit) takes a tensor
route on both paths: :class:`~data.decode.ChannelDecoder`'s float pixels, the same crop boxes and
flips (:class:`TensorTrainTransform`), no colour augmentation; again the paths differ only in where
normalisation and random erasing happen. The settings arrive as :class:`TrainAugment` and
:class:`InputSpec`, made by ``data.build`` from the config.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from config import img_size_hw
from utils.errors import UserError

from .augment_ops import use_fast_affine, use_safe_posterize
from .decode import (PIL_SIMD, ChannelDecoder, decode_pil, decode_tensor, draft_reduce, jpeg_reduction, jpeg_size,
                     load_rgb, open_image)

_TENSOR_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest')
ImageSize = Union[int, Sequence[int]]  # a square side or (height, width)


def cifar_sized(img_size: ImageSize) -> bool:
    """Whether a model of ``img_size`` takes CIFAR-sized input (at most 32 px a side): the official framework then
    trains on padded random crops and evaluates images as they are, without resize or crop."""
    return max(img_size_hw(img_size)) <= 32


# ---------------------------------------------------------------------------------- settings
DEFAULT_CROP_PCT = 224 / 256  # the official evaluation: resize to 256 / 224 of the size, centre-crop


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: ``channels`` per pixel, normalised by per-channel ``mean`` and ``std``.

    Three channels are RGB, read through Pillow as the official framework does; any other count goes
    through :class:`~data.decode.ChannelDecoder` (float pixels in [0, 1], 16-bit files at full depth)
    and the tensor transforms here. ``data.build.input_spec`` makes it from the config.
    """
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def __post_init__(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f'mean {self.mean} and std {self.std} need {self.channels} values each')

    @property
    def rgb(self) -> bool:
        """True for the official input: 3-channel RGB through Pillow."""
        return self.channels == 3


@dataclass(frozen=True)
class TrainAugment:
    """The training augmentation: the arguments of timm's ``create_transform`` that the official recipe sets
    (AUG.*, DATA.INTERPOLATION; ``data.build.train_augment`` makes it from the config), plus the crop's
    ranges and the flips. The defaults are the official recipe's."""
    interpolation: str = 'bicubic'
    color_jitter: float = 0.4
    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'  # 'none' or None: off
    re_prob: float = 0.25
    re_mode: str = 'pixel'
    re_count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: share of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio (width / height)
    hflip: float = 0.5
    vflip: float = 0.0

    @property
    def policy(self) -> Optional[str]:
        """The RandAugment / AutoAugment policy, None when off."""
        return self.auto_augment if self.auto_augment and self.auto_augment != 'none' else None

    @property
    def colour(self) -> bool:
        """True when colour jitter or an auto-augment policy is on (both work on RGB images only)."""
        return self.color_jitter > 0 or self.policy is not None


# ---------------------------------------------------------------------------------- training
def _timm_train(img_size: tuple[int, int], aug: TrainAugment, spec: InputSpec, separate: bool):
    return create_transform(
        input_size=img_size if img_size[0] != img_size[1] else img_size[0], is_training=True,
        scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=aug.vflip,
        color_jitter=aug.color_jitter if aug.color_jitter > 0 else None, auto_augment=aug.policy,
        re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count, interpolation=aug.interpolation,
        mean=tuple(spec.mean), std=tuple(spec.std), separate=separate)


def _draw_flips(hflip: float, vflip: float) -> tuple[bool, bool]:
    """The draws of torchvision's RandomHorizontalFlip then RandomVerticalFlip, each made only where
    timm adds the transform (probability above 0), so the random stream matches the plain path's."""
    return (hflip > 0 and torch.rand(1).item() < hflip), (vflip > 0 and torch.rand(1).item() < vflip)


_PIL_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR,
                 'nearest': Image.Resampling.NEAREST}


def resized_crop_tensor(img: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int],
                        mode: str = 'bicubic') -> torch.Tensor:
    """The ``(top, left, height, width)`` box of a uint8 (3, H, W) tensor (or a float one of any channel
    count), resized to ``size``.

    Resized in channels-last layout, where torch has fast uint8 antialiased kernels (~4x faster
    than stock Pillow's resize); the result keeps that layout, so it becomes a PIL image without a
    strided copy.
    """
    top, left, h, w = box
    patch = img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    if mode == 'nearest':  # torch's 'nearest' is off by half a pixel; 'nearest-exact' is PIL's
        return F.interpolate(patch, size=size, mode='nearest-exact')[0]
    return F.interpolate(patch, size=size, mode=mode, antialias=True, align_corners=False)[0]


class TensorRandomResizedCrop:
    """RandomResizedCrop of a (C, H, W) tensor to (C, *size), boxes drawn by torchvision's
    ``RandomResizedCrop.get_params`` (for pipelines that crop after decoding, e.g. ``data.simmim``)."""

    def __init__(self, size: ImageSize, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = 'bicubic'):
        self.size, self.scale, self.ratio, self.mode = img_size_hw(size), scale, ratio, interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        box = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return resized_crop_tensor(img, box, self.size, self.mode)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, mode={self.mode})'


class RandomResizedCropDecoder:
    """bytes -> the image's random resized crop, decoding no more pixels than the crop needs.

    The box is drawn by timm's own ``RandomResizedCropAndInterpolation.get_params`` from the image
    size in the file header (the JPEG frame header, :func:`~data.decode.jpeg_size`; Pillow reads
    other formats'), before any pixel is decoded: the same draws from the same random stream as the
    plain path, so a sample's seed gives the same box on both paths. Then, the fastest way to that
    box's pixels:

    * a JPEG whose box is at least four times the output size on both sides is decoded at 1/2, 1/4
      or 1/8 scale (the largest that keeps the box at least twice the output size), and Pillow
      resizes the box, located in the reduced image to a fraction of a pixel. The crop itself is
      unchanged; the margin of two keeps its pixels within resampling noise of a full decode
      (0.3 grey levels apart on average, 1-1.5% less gradient energy; with no margin: 0.8-1.2
      levels, 4% softer). On photos of 1000-1500 px it saves ~17% of the loader's CPU time with
      Pillow-SIMD, ~3% with stock Pillow (whose resize of the reduced box is slower);
    * otherwise torchvision decodes (faster than Pillow: ~0.44 against ~0.52 ms for 300-500 px),
      then Pillow-SIMD crops and resizes (faster than torch there, and timm's operations on the
      same pixels), or, on stock Pillow, torch does (see :func:`resized_crop_tensor`; 4x faster
      than stock Pillow's resize).

    Returns a PIL image or a uint8 (3, H, W) tensor; either way RGB of ``size`` (a side or (H, W)).
    """

    def __init__(self, size: ImageSize, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = 'bicubic',
                 reduce: bool = True, pil_resize: Optional[bool] = None):
        self.size, self.scale, self.ratio, self.mode = img_size_hw(size), tuple(scale), tuple(ratio), interpolation
        self.pil_size = self.size[::-1]  # Pillow sizes are (width, height)
        self.reduce = reduce
        self.pil_resize = PIL_SIMD if pil_resize is None else pil_resize

    def __call__(self, data: bytes) -> Image.Image | torch.Tensor:
        size = jpeg_size(data)
        header = open_image(data) if size is None else None  # not a plain JPEG: Pillow reads the header
        width, height = size or header.size
        # timm's own draw, on a stand-in of the image's size: nothing is decoded yet.
        box = RandomResizedCropAndInterpolation.get_params(_size_only(width, height), self.scale, self.ratio)
        top, left, h, w = box
        if self.reduce and size is not None:
            factor = jpeg_reduction(min(h / self.size[0], w / self.size[1]) / 2)
            if factor > 1:
                return self._reduced(open_image(data), box, factor)
        pixels = decode_tensor(data)  # JPEGs through torchvision: faster than Pillow's decoder
        if self.pil_resize:  # Pillow-SIMD: crop, then resize, as timm does
            return _pil_crop(pixels, box).resize(self.pil_size, _PIL_RESAMPLE[self.mode])
        return resized_crop_tensor(pixels, box, self.size, self.mode)

    def _reduced(self, img: Image.Image, box: tuple[int, int, int, int], factor: int) -> Image.Image:
        """The box of a JPEG decoded at 1 / ``factor`` of its size, resized by Pillow."""
        top, left, h, w = box
        scale = draft_reduce(img, factor)
        img = load_rgb(img)
        if scale == 1.0:  # Pillow declined to reduce: crop, then resize
            return img.crop((left, top, left + w, top + h)).resize(self.pil_size, _PIL_RESAMPLE[self.mode])
        located = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return img.resize(self.pil_size, _PIL_RESAMPLE[self.mode], box=located)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, '
                f'mode={self.mode}, reduce={self.reduce}, pil_resize={self.pil_resize})')


def _size_only(width: int, height: int) -> torch.Tensor:
    """A (height, width) stand-in with one element of memory: what timm's box draw reads of an image."""
    return torch.zeros(()).expand(height, width)


def _pil_crop(pixels: torch.Tensor, box: tuple[int, int, int, int]) -> Image.Image:
    """The ``(top, left, height, width)`` box of a uint8 (3, H, W) tensor as a PIL image, copied once,
    straight from the decoder's row-major (H, W, 3) memory."""
    top, left, h, w = box
    rows = pixels.permute(1, 2, 0)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    row_bytes = 3 * rows.shape[1]
    flat = rows.numpy().reshape(-1)[top * row_bytes + 3 * left:]
    return Image.frombuffer('RGB', (w, h), flat, 'raw', 'RGB', row_bytes, 1)


class FastTrainTransform:
    """Cropped image (PIL or uint8 tensor) -> [crop] -> horizontal, vertical flip -> PIL RandAugment / colour
    jitter -> uint8 (3, H, W). ``crop`` is only for crops the decoder does not do (padded small images)."""

    def __init__(self, crop: Optional[Callable], secondary: Optional[Callable], hflip: float = 0.5,
                 vflip: float = 0.0):
        self.crop, self.secondary, self.hflip, self.vflip = crop, secondary, hflip, vflip

    def __call__(self, image) -> torch.Tensor:
        if self.crop is not None:
            image = self.crop(image)
        hflip, vflip = _draw_flips(self.hflip, self.vflip)
        if isinstance(image, torch.Tensor):
            if self.secondary is None:
                return _flip_tensor(image, hflip, vflip)
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        if hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if vflip:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return pil_to_uint8(self.secondary(image) if self.secondary is not None else image)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(crop={self.crop}, hflip={self.hflip}, vflip={self.vflip}, '
                f'secondary={self.secondary})')


def _flip_tensor(image: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return image.flip(dims) if dims else image


class TensorTrainTransform:
    """float (C, H, W) -> timm's random resized crop (or, for images of at most 32 px, a random crop with
    4 px of padding) -> flips: the training geometry of :func:`build_train_transform` for input of any
    channel count. Draws the RGB paths' boxes and flips from the same random streams."""

    def __init__(self, size: ImageSize, aug: TrainAugment):
        if aug.interpolation not in _TENSOR_INTERPOLATIONS + ('random',):
            raise UserError(f'DATA.INTERPOLATION {aug.interpolation!r} is for RGB images only; other input takes '
                            f'{", ".join(_TENSOR_INTERPOLATIONS)} or random')
        self.size, self.aug = img_size_hw(size), aug
        self.pad_crop = v2.RandomCrop(self.size, padding=4) if cifar_sized(self.size) else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.pad_crop is not None:
            image = self.pad_crop(image)
        else:
            box = RandomResizedCropAndInterpolation.get_params(image, self.aug.scale, self.aug.ratio)
            mode = self.aug.interpolation
            if mode == 'random':  # timm's draw, after the box: bilinear or bicubic
                mode = random.choice(('bilinear', 'bicubic'))
            image = resized_crop_tensor(image, box, self.size, mode).contiguous()
        return _flip_tensor(image, *_draw_flips(self.aug.hflip, self.aug.vflip))

    def __repr__(self) -> str:
        a = self.aug
        return (f'{type(self).__name__}(size={self.size}, scale={a.scale}, ratio={a.ratio}, mode={a.interpolation}, '
                f'hflip={a.hflip}, vflip={a.vflip}, pad_crop={self.pad_crop is not None})')


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A (3, H, W) uint8 view of an RGB image.

    Pillow packs it line-interleaved (each row as its R, G and B runs), so every row of every
    channel is contiguous: the float conversion then reads whole rows, about twice as fast as
    from the pixel-interleaved layout.
    """
    width, height = image.size
    rows = torch.frombuffer(bytearray(image.tobytes('raw', 'RGB;L')), dtype=torch.uint8)
    return rows.view(height, 3, width).permute(1, 0, 2)


class PilToUint8:
    """Transform form of :func:`pil_to_uint8` (ends the PIL pipelines of the fast path)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(image)


def build_train_transform(img_size: ImageSize, aug: Optional[TrainAugment] = None, fast: bool = True,
                          spec: Optional[InputSpec] = None, **changes: Any
                          ) -> tuple[Callable, Callable, Optional['BatchNormalize']]:
    """``(transform, decoder, batch_finish)`` for training; ``batch_finish`` is None on the plain path.

    ``img_size`` is a side or (height, width); ``aug`` the augmentation (default: the official recipe), with
    ``changes`` replacing some of its fields (``auto_augment='none'``); ``spec`` the input (default: RGB
    with ImageNet's statistics). Images of at most 32 px use a random crop with 4 px of padding instead of
    the random resized crop (as the official framework does for CIFAR-sized inputs). On the fast path the
    random resized crop happens in the decoder (:class:`RandomResizedCropDecoder`). Input other than RGB
    takes the tensor route (:func:`_channels_train`).
    """
    aug = replace(aug or TrainAugment(), **changes)
    spec = spec or InputSpec()
    img_size = img_size_hw(img_size)
    if not spec.rgb:
        return _channels_train(img_size, aug, spec, fast)
    small = cifar_sized(img_size)
    if not fast:
        transform = _timm_train(img_size, aug, spec, separate=False)
        if small:
            transform.transforms[0] = T.RandomCrop(img_size, padding=4)
        use_safe_posterize(transform)
        return transform, decode_pil, None
    primary, secondary, _ = _timm_train(img_size, aug, spec, separate=True)
    use_safe_posterize(secondary)
    use_fast_affine(secondary)
    erasing = BatchRandomErasing(aug.re_prob, aug.re_mode, aug.re_count) if aug.re_prob > 0 else None
    finish = BatchNormalize(spec.mean, spec.std, erasing=erasing, exact=False)
    secondary = secondary if secondary.transforms else None
    if small:
        transform = FastTrainTransform(v2.RandomCrop(img_size, padding=4), secondary, aug.hflip, aug.vflip)
        return transform, decode_tensor, finish
    if aug.interpolation in _TENSOR_INTERPOLATIONS:
        decoder = RandomResizedCropDecoder(img_size, aug.scale, aug.ratio, interpolation=aug.interpolation)
        return FastTrainTransform(None, secondary, aug.hflip, aug.vflip), decoder, finish
    # Interpolations only PIL has ('random', 'lanczos', ...): timm's PIL crop, uint8 output.
    return T.Compose([primary] + ([secondary] if secondary else []) + [PilToUint8()]), decode_pil, finish


def _channels_train(img_size: tuple[int, int], aug: TrainAugment, spec: InputSpec, fast: bool
                    ) -> tuple[Callable, Callable, Optional['BatchNormalize']]:
    """Training on input other than RGB: :class:`~data.decode.ChannelDecoder`'s float pixels, the crop
    and flips of :class:`TensorTrainTransform`, then normalisation and random erasing per image (plain,
    as timm's) or per batch (fast). Colour jitter and RandAugment are refused: they are RGB operations."""
    if aug.colour:
        raise UserError(f'colour jitter and auto-augment work on RGB images only, not on {spec.channels}-channel '
                        'input: set AUG.COLOR_JITTER 0 and AUG.AUTO_AUGMENT none')
    crop, decoder = TensorTrainTransform(img_size, aug), ChannelDecoder(spec.channels)
    if fast:
        erasing = BatchRandomErasing(aug.re_prob, aug.re_mode, aug.re_count) if aug.re_prob > 0 else None
        return crop, decoder, BatchNormalize(spec.mean, spec.std, erasing=erasing, exact=False)
    steps = [crop, T.Normalize(spec.mean, spec.std)]
    if aug.re_prob > 0:
        steps.append(RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device='cpu'))
    return T.Compose(steps), decoder, None


# ---------------------------------------------------------------------------------- evaluation
def build_eval_transform(img_size: ImageSize, interpolation: str = 'bicubic', crop: bool = True, fast: bool = True,
                         crop_pct: float = DEFAULT_CROP_PCT, spec: Optional[InputSpec] = None
                         ) -> tuple[Callable, Callable, Optional['BatchNormalize']]:
    """``(transform, decoder, batch_finish)``: resize to ``int(size / crop_pct)`` (official: 256 / 224 of the
    size) and centre-crop (or resize to the size when ``crop`` is off); images of at most 32 px are used as
    they are. ``spec``: the input (default: RGB with ImageNet's statistics); other than RGB, the same steps
    run on :class:`~data.decode.ChannelDecoder`'s float tensors.

    ``img_size`` is a side or (height, width). A non-square size keeps the aspect ratio as timm's
    centre crop does: the image is scaled to just cover ``1 / crop_pct`` times (H, W), then centre-cropped.

    Both paths compute the same float32 operations (``/255``, ``-mean``, ``/std``), so their batches
    are bitwise identical; the fast one runs them in the collate, on uint8 images. (Reduced JPEG
    decoding would evaluate large photos 1.6-1.9x faster, but shifts their pixels by 1-3 grey levels
    and softens them by ~2% even at twice the target size: evaluation stays exact instead.)
    """
    spec = spec or InputSpec()
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:  # e.g. timm's 'random': bilinear, as the official framework falls back to
        mode = InterpolationMode.BILINEAR
    if not spec.rgb and mode.value not in _TENSOR_INTERPOLATIONS:
        raise UserError(f'DATA.INTERPOLATION {interpolation!r} is for RGB images only; other input takes '
                        f'{", ".join(_TENSOR_INTERPOLATIONS)} or random')
    height, width = img_size_hw(img_size)
    steps: list[Callable] = []
    if not cifar_sized((height, width)):
        # int(size / 0.875) equals the official int(256 / 224 * size) for every size up to 5000 (checked)
        if not crop:
            steps += [T.Resize((height, width), interpolation=mode)]
        elif height == width:  # the official rule: the short side to int(256 / 224 * size)
            steps += [T.Resize(int(height / crop_pct), interpolation=mode), T.CenterCrop(height)]
        else:
            cover = (int(height / crop_pct), int(width / crop_pct))
            steps += [ResizeToCover(cover, interpolation=mode), T.CenterCrop((height, width))]
    if not spec.rgb:  # float tensors from the decoder; normalised as the RGB paths do, exactly alike
        decoder = ChannelDecoder(spec.channels)
        if fast:
            return T.Compose(steps), decoder, BatchNormalize(spec.mean, spec.std)
        return T.Compose(steps + [T.Normalize(spec.mean, spec.std)]), decoder, None
    if fast:
        return T.Compose(steps + [PilToUint8()]), decode_pil, BatchNormalize(spec.mean, spec.std)
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps), decode_pil, None


class ResizeToCover:
    """Resize a PIL image (or a (C, H, W) tensor), keeping its aspect ratio, to the smallest size that covers
    ``(height, width)``."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.size, self.interpolation = tuple(size), interpolation

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        width, height = T.functional.get_image_size(image)
        scale = max(self.size[0] / height, self.size[1] / width)
        # Rounded, then never below the target: a float product a hair under it must not cost a row.
        out = (max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale)))
        return T.functional.resize(image, list(out), interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})'


# ---------------------------------------------------------------------------------- batch finishing
class BatchRandomErasing:
    """timm's RandomErasing (same parameters and distribution), once over a normalised batch.

    Draws come from generators seeded per batch, not from the process's global ones, so a batch's
    erasing is reproducible from its seed alone.
    """

    def __init__(self, probability: float = 0.25, mode: str = 'pixel', max_count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.probability, self.mode = probability, mode.lower()
        self.max_count = max(1, max_count)
        self.area_range = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        # Rectangles from Python's generator, noise from one on the batch's device (no host-to-device
        # copy per rectangle): the same rectangles on any device, the noise values per device type.
        rnd, gen = random.Random(seed), torch.Generator(device=batch.device).manual_seed(seed)
        _, chans, height, width = batch.shape
        for image in batch:
            if rnd.random() > self.probability:
                continue
            count = rnd.randint(1, self.max_count) if self.max_count > 1 else 1
            for _ in range(count):
                self._erase_one(image, chans, height, width, count, rnd, gen)
        return batch

    def _erase_one(self, image, chans, height, width, count, rnd, gen) -> None:
        for _ in range(10):
            area = rnd.uniform(*self.area_range) * height * width / count
            aspect = math.exp(rnd.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
                image[:, top:top + h, left:left + w] = self._fill(chans, h, w, gen)
                return

    def _fill(self, chans: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        if self.mode == 'pixel':
            return torch.randn((chans, h, w), generator=gen, device=gen.device)
        if self.mode == 'rand':
            return torch.randn((chans, 1, 1), generator=gen, device=gen.device)
        return torch.zeros((chans, 1, 1), device=gen.device)


class BatchNormalize:
    """uint8 (B, C, H, W) -> normalised float32 on the images' device, then optional random erasing
    (seeded per batch). Float images (in [0, 1], from :class:`~data.decode.ChannelDecoder`) skip the ``/255``.

    ``exact``: the float32 operations of torchvision's ToTensor + Normalize, ``(x / 255 - mean) / std``,
    so that evaluation batches equal the plain path's bit for bit. Otherwise (training) one
    multiply-add, ``x * (1 / (255 std)) - mean / std``: within a unit in the last place of the exact
    result, two passes over the image instead of four.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 erasing: Optional[BatchRandomErasing] = None, exact: bool = True):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.shift = 1 / (255 * self.std), -self.mean / self.std
        self.erasing, self.exact = erasing, exact
        # 255 and the four above, and 1 / std (float images), per device
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], seed: int = 0,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``images`` (a batch or a list of (C, H, W) tensors) into ``out`` (or a new tensor)."""
        device = images[0].device
        if device not in self._constants:
            # 255 as a tensor on the device: CUDA would divide by a host scalar as a multiply by its
            # reciprocal, one unit in the last place away from the plain path's division
            self._constants[device] = tuple(t.to(device) for t in (torch.tensor(255.0), self.mean, self.std,
                                                                    self.scale, self.shift, 1 / self.std))
        if out is None:
            out = torch.empty((len(images), *images[0].shape), dtype=torch.float32, device=device)
        if device.type != 'cpu':  # an accelerator: whole-batch passes
            batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
            self._normalise(batch, out, self._constants[device])
        else:
            # One image at a time: its float copy stays in cache through the passes, about three
            # times faster than the same passes over a whole batch in main memory.
            for dst, src in zip(out, images):
                self._normalise(src, dst, self._constants[device])
        if self.erasing is not None:
            self.erasing(out, seed)
        return out

    def _normalise(self, src: torch.Tensor, dst: torch.Tensor, constants: tuple[torch.Tensor, ...]) -> torch.Tensor:
        levels, mean, std, scale, shift, inv_std = constants
        if src.is_floating_point():  # already in [0, 1]: torchvision's Normalize alone
            if self.exact:
                return dst.copy_(src).sub_(mean).div_(std)
            return torch.mul(src, inv_std, out=dst).add_(shift)
        if self.exact:
            return dst.copy_(src).div_(levels).sub_(mean).div_(std)
        return torch.mul(src, scale, out=dst).add_(shift)
